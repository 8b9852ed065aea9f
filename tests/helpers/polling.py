"""Waiting for something another process does, for tests and benchmarks that drive real services."""

from __future__ import annotations

import time


def wait_until(condition, timeout: float, every: float = 0.5):
    """``condition()``'s first truthy value, polled every ``every`` seconds; None once ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return None
