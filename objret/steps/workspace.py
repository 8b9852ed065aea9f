"""Where a run's artifacts live under the work folder, derived from params.yaml in one place."""

from __future__ import annotations

import os
import threading
from functools import cached_property
from pathlib import Path

from objret.config import Params
from objret.features.backbone import Backbone, build_backbone
from objret.features.cache import FeatureCache
from objret.ingest.lake import Lake


class Workspace:
    def __init__(self, params: Params, root: str | Path | None = None):
        self.params = params
        self.root = Path(root or params.workdir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._detector_lock = threading.Lock()   # a cv2.dnn net is not thread-safe

    @cached_property
    def lake(self) -> Lake:
        return Lake(self.root / "lake")

    @cached_property
    def backbone(self) -> Backbone:
        f = self.params.features
        return build_backbone(f.backbone, tuple(f.layers), f.max_side, f.resnet50_weights)

    def detect(self, image):
        """The region detector's detections in an RGB ``image`` (params' regions.detector: the same boxes and
        classes as the lake frames' detector regions). One detector a workspace, used by one thread at a time."""
        with self._detector_lock:
            return self._detector.propose(image)

    @cached_property
    def _detector(self):
        from objret.regions.detector import BoxProposer

        d = self.params.regions.detector
        return BoxProposer(score_threshold=d.score_threshold, max_boxes=d.max_boxes)

    @cached_property
    def cache(self) -> FeatureCache:
        return FeatureCache(self.root / "features", self.backbone.spec.cache_key())

    @property
    def index_dir(self) -> Path:
        return self.root / "index" / self.backbone.spec.cache_key()

    @property
    def region_store(self):
        from objret.regions.store import RegionStore, params_key

        key = params_key(self.params.regions.store_key())
        return RegionStore(self.root / "regions" / f"{self.backbone.spec.cache_key()}-{key}")

    @property
    def whitening_path(self) -> Path:
        w = self.params.regions.whitening
        return self.root / "whitening" / f"{self.region_store.dir.name}-d{w.dim}-s{w.shrinkage}.npz"

    def load_whitening(self):
        """The fitted whitening when enabled (None when disabled); enabled but not fitted is an error."""
        from objret.errors import ObjretError
        from objret.regions.whitening import Whitening

        if not self.params.regions.whitening.enabled:
            return None
        if not self.whitening_path.exists():
            raise ObjretError("whitening is enabled but not fitted: run build-index")
        return Whitening.load(str(self.whitening_path))

    def current_index_dir(self) -> Path:
        """The region index matching the current regions and whitening parameters."""
        whitening = self.load_whitening()
        return self.index_dir / f"regions-{self.region_store.dir.name}-{whitening.version() if whitening else 'l2'}"

    def index_recipe(self) -> dict:
        """How the region index's vectors are made, written into its manifest and checked when it is opened."""
        whitening = self.load_whitening()
        rp = self.params.regions
        return {"backbone": self.backbone.spec.cache_key(), "layer": rp.layer, "pooling": rp.pooling,
                "regions": self.region_store.dir.name, "whitening": whitening.version() if whitening else None}

    @cached_property
    def map_store(self):
        """The mining store of the current backbone, mining.layer and code size."""
        from objret.index.map_store import MapStore

        layer, pq_m = self.params.mining.layer, self.params.index.map_store.pq_m
        return MapStore(self.root / "store" / f"{self.backbone.spec.cache_key()}-{layer}-m{pq_m}")

    def cells_dir(self) -> Path:
        """The cell index of the current backbone and cell parameters."""
        c = self.params.index.cells
        return self.root / "cells" / f"{self.backbone.spec.cache_key()}-{c.layer}-n{c.per_frame}"

    def cells_recipe(self) -> dict:
        """How the cell index's vectors are made (checked when it is opened, like the region index's recipe)."""
        c = self.params.index.cells
        return {"backbone": self.backbone.spec.cache_key(), "layer": c.layer, "per_frame": c.per_frame}

    def graph_dir(self) -> Path:
        """The region graph of the current region index: the same sub-path under ``graph/`` as under ``index/``."""
        return self.root / "graph" / self.current_index_dir().relative_to(self.root / "index")

    def run_path(self, name: str) -> Path:
        """The run folder ``name`` (not created)."""
        from objret.errors import ObjretError

        # Names come from report ids (schema-checked file names): anything that could climb out is refused.
        if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
            raise ObjretError(f"{name!r} cannot name a run folder")
        return self.root / "runs" / name

    def run_dir(self, name: str) -> Path:
        path = self.run_path(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def dataset_registry(self):
        """The DVC repository that versions the retraining dataset (its working copy is the dataset folder)."""
        from objret.dataset.registry import DatasetRegistry

        dp = self.params.dataset
        return DatasetRegistry(dp.registry or self.root / "datasets", remote=dp.dvc_remote,
                               endpoint_url=self.s3_endpoint_url)

    @property
    def dataset_root(self) -> str:
        """Where the dataset's users read it: dataset.root (each version published there), else the registry's
        working copy."""
        return self.params.dataset.root or str(self.dataset_registry.dataset_dir)

    @property
    def reviews_root(self) -> str:
        """Where mining runs' review pages go, beside the dataset: <dataset.root>/reviews, else <registry>/reviews
        (beside the registry's working copy, not in it: a page is no part of the versioned dataset)."""
        from objret import storage

        root = self.params.dataset.root
        return storage.join(root, "reviews") if root else str(self.dataset_registry.root / "reviews")

    @property
    def s3_endpoint_url(self) -> str | None:
        return self.params.lake.s3_endpoint_url

    @property
    def tracking_uri(self) -> str:
        """tracking.mlflow_uri, else the MLFLOW_TRACKING_URI environment variable, else the work folder's SQLite."""
        return (self.params.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.root / 'mlflow.db'}")

    @property
    def artifact_root(self) -> str:
        return (self.root / "mlartifacts").as_uri()
