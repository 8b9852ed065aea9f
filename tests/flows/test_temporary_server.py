"""A flow command's temporary Prefect server dies with the command: `objret build-index` killed mid-run by SIGKILL
or SIGTERM leaves no Prefect server behind (it did: Prefect's own temporary server is stopped only at a normal
exit)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers.figures import record_figures

from flows.temporary_server import temporary_prefect_server

pytestmark = pytest.mark.slow
SERVER = "prefect.server.api.server:create_app"


def _server_of(command: psutil.Process, timeout: float) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in command.children(recursive=True) if SERVER in " ".join(p.cmdline())]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError("the command started no Prefect server")


def _gone(process: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:   # exited; only its reaping is left to init
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_build_index_leaves_no_prefect_server(tmp_path, bench_dir, signum):
    lake, work = tmp_path / "lake", tmp_path / "work"
    lake.mkdir()
    for image in sorted((bench_dir / "pets09_s2l1" / "images").glob("*.jpg"))[:6]:
        shutil.copy(image, lake)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}   # the embedded default
    command = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "build-index", str(lake), "--workdir", str(work),
         "--set", "features.backbone=efficientnet_lite0", "--set", "features.max_side=320"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = _server_of(psutil.Process(command.pid), 120)
        deadline = time.monotonic() + 120
        while not any(c.laddr and c.status == psutil.CONN_LISTEN for c in server.net_connections()):
            assert command.poll() is None and time.monotonic() < deadline, "build-index ended before it was killed"
            time.sleep(0.2)
        time.sleep(1.0)   # the flow run is starting on it
        os.kill(command.pid, signum)
        command.wait(timeout=60)
        # SIGTERM: Prefect marks the flow run crashed and the command ends by the signal; rarely Python drops it
        # (it lands in a destructor: "Exception ignored") and the build completes. Either way it ends.
        assert command.returncode in ((-signum,) if signum == signal.SIGKILL else (-signum, 0))
        died = time.monotonic()
        assert _gone(server, 20), f"the Prefect server {server.pid} outlived `objret build-index` killed by {signum!r}"
        record_figures(f"no_stray_server_{signal.Signals(signum).name}", {
            "server_gone_after_command_s": round(time.monotonic() - died, 2), "stray_processes": 0})
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()


def test_with_a_prefect_server_named_no_temporary_one_is_started():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    children = set(psutil.Process().children())
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), temporary_prefect_server() as url:
        assert url is None and set(psutil.Process().children()) == children
