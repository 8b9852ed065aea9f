"""pytest set-up: Prefect and DVC logging bound to the session's streams, the fixtures of tests/fixtures, thread limits."""

from __future__ import annotations


import pytest

# Prefect binds its console log handler to the streams present when it is first imported: import it now,
# on pytest's session-long streams, not inside a test whose captured streams are closed afterwards.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()

# DVC does the same on import (dvc.logger.setup): import it on the session's streams too.
import dvc  # noqa: E402,F401

from tests.fixtures.data import bench_dir, real_bench, tud_campus_bench  # noqa: E402,F401
from tests.fixtures.services import (  # noqa: E402,F401
    faulty_s3, faulty_s3_server, fiftyone_db, mlflow_server, prefect_api, prefect_server, s3_server, s3_store,
    start_tracking_server,
)


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
