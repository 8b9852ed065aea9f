"""Real kills for crash tests: the code under test runs in a forked child that is SIGKILLed at a chosen call.

A kill simulated by raising an exception is not a kill: on its way out it runs every ``finally``, ``except
BaseException`` and ``__exit__`` (storage.write_bytes deletes its temp file, a sqlite connection is closed, a
``with conn`` rolls back), which a ``kill -9`` never runs. Here the child kills itself with SIGKILL, so nothing of
its Python runs after that moment, and the parent checks that SIGKILL is what ended it.

    def body():
        sigkill_at_call(FeatureCache, "write_shard", 3)   # patched in the child only
        cache_features(...)
    run_killed(body)

Forking is cheap (the child shares torch and the loaded backbone) and safe with one torch / faiss thread and
OpenCV's pthreads pool, as in the tests that use it.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Callable


def die() -> None:
    """SIGKILL this process now; never returns."""
    os.kill(os.getpid(), signal.SIGKILL)
    while True:   # not reached: the signal is delivered before kill() returns to a single-threaded process
        signal.pause()


def sigkill_at_call(owner, name: str, n: int, note: Callable[[], None] | None = None) -> None:
    """In this process, SIGKILL it at the ``n``-th call of ``owner.<name>``, before that call runs (``note()``
    first, if given)."""
    real = getattr(owner, name)
    count = 0

    def dying(*args, **kwargs):
        nonlocal count
        count += 1
        if count == n:
            if note is not None:
                note()
            die()
        return real(*args, **kwargs)

    setattr(owner, name, dying)


def run_killed(body: Callable[[], None]) -> int:
    """Run ``body()`` in a forked child that must end by SIGKILL (``body`` arranges it, e.g. with sigkill_at_call);
    returns the child's pid. AssertionError when the child ended any other way (body returned or raised)."""
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: never returns into the caller
        code = 3   # body returned: the kill did not happen
        try:
            body()
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"the child was not SIGKILLed: wait status {status} (exit 3: not killed, 4: it raised)"
    return pid
