"""Credentials inside URLs (``scheme://user:secret@host``) never shown: not on the console, not in logs (those
Prefect sends to its server included: flows.log_records), not in Prefect flow parameters.

A ``--set`` override whose URL carries credentials reaches the flows as a parameter with the credentials as ``***``;
the real one travels in the OBJRET_SECRET_OVERRIDES environment variable of this process and its children
(objret.config.load_params applies it last), so Prefect stores only the redacted form.
"""

from __future__ import annotations

import json
import os
import sys

from objret.config import SECRET_OVERRIDES_ENV, redact_credentials


class RedactingStream:
    """A text stream that writes through to ``stream`` with URL credentials replaced by ``***``."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_credentials(text))
        return len(text)

    def __getattr__(self, name):   # flush, fileno, isatty, encoding, ... of the real stream
        return getattr(self._stream, name)


def keep_credentials_out_of_parameters(overrides: list[str]) -> list[str]:
    """The overrides to pass as flow parameters; the ones with URL credentials go to OBJRET_SECRET_OVERRIDES."""
    shown = [redact_credentials(override) for override in overrides]
    secret = [override for override, clean in zip(overrides, shown) if override != clean]
    if secret:
        os.environ[SECRET_OVERRIDES_ENV] = json.dumps(secret)
    return shown


def redact_console() -> None:
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
