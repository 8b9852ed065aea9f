"""A temporary Prefect API server for one `objret` command, tied to that command's process.

Without PREFECT_API_URL, Prefect starts a temporary server itself and stops it at exit, but only at a normal
exit: a command killed by SIGTERM or SIGKILL leaves that server running, orphaned. Here the command starts the
same server (uvicorn on Prefect's app factory, 127.0.0.1, a free port) as its child, with the kernel told to send
it SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG, which holds even for SIGKILL; a SIGTERM to the command
ends it by default, after Prefect has marked its flow run crashed), and points Prefect at it for the command's
flows.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from objret.errors import ObjretError

PR_SET_PDEATHSIG = 1   # prctl option (linux/prctl.h)
STARTUP_TIMEOUT_S = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def temporary_prefect_server():
    """Run the block against PREFECT_API_URL when set, else against a temporary server tied to this process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    import prefect

    port = _free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
               "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    # As Prefect runs its own temporary server: no UI, no background services (PREFECT__SERVER_EPHEMERAL).
    server = subprocess.Popen(command, env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"},
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    url = f"http://127.0.0.1:{port}/api"
    # Stopped at interpreter exit, after Prefect's log and event workers have sent what they hold to it.
    atexit.register(_stop, server)
    _wait_until_healthy(server, url)
    os.environ["PREFECT_API_URL"] = url   # for the processes the flows start (Dask workers, DVC stages)
    with temporary_settings({PREFECT_API_URL: url}):
        yield url


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _wait_until_healthy(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ObjretError(f"the temporary Prefect server exited with status {server.returncode} at start-up")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise ObjretError(f"the temporary Prefect server did not answer on {url} within {STARTUP_TIMEOUT_S:.0f} s")
