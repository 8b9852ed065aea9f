"""objret: object-level retrieval and failure-driven data mining.

The library is plain Python (numpy, torch, faiss): no Prefect and no MLflow in here, so every method
is a function a notebook can call. Orchestration lives in ``tasks/`` and ``flows/``.
"""

import os

# PyTorch backs its CPU buffers of 2 MB and more with transparent huge pages when this is set (read at its first
# allocation, so it must be set before one; a user's own value wins). The backbone's activations are such
# buffers: the forward ran 1.6x faster with it on a 2-core AVX-512 CPU (benchmarks/results/feature_caching.json).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
