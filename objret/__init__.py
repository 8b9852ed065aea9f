"""objret: object-level retrieval and failure-driven data mining.

The library is plain Python (numpy, torch, faiss): no Prefect and no MLflow in here, so every method
is a function a notebook can call. Orchestration lives in ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"
