"""Whitening step: the region store's descriptors -> a PCA-whitening fit (when enabled), refitted as the lake grows."""

from __future__ import annotations

import json

import numpy as np

from objret import storage
from objret.regions.whitening import Whitening, fit_whitening
from objret.steps.workspace import Workspace


def whitening(ws: Workspace) -> str | None:
    """Fit PCA-whitening on the lake's region descriptors (when enabled); returns its version.

    Fitted once, and fitted again when the regions grew by ``refit_growth`` since (a new whitening is a new
    index: build_index then rebuilds it).
    """
    w = ws.params.regions.whitening
    if not w.enabled:
        (ws.root / "whitening").mkdir(exist_ok=True)   # the folder all the same: a DVC stage's output
        return None
    table = ws.region_store.load()
    storage.remove_stale_temps(ws.whitening_path.parent)
    fit_record = ws.whitening_path.with_suffix(".json")
    record = json.loads(fit_record.read_text()) if fit_record.exists() else None
    if ws.whitening_path.exists():
        current = Whitening.load(str(ws.whitening_path))
        # The record is written before the whitening: one that names another version is a fit a kill cut short.
        if record is None or record.get("version") == current.version():
            fitted_on = record["regions"] if record else len(table.descriptors)
            growth = w.refit_growth
            if growth is None or len(table.descriptors) < fitted_on * (1 + growth):
                return current.version()
    sample = table.descriptors
    limit = w.max_samples
    if len(sample) > limit:  # a seeded sample: the fit is stable long before millions of regions
        sample = sample[np.random.default_rng(0).choice(len(sample), limit, replace=False)]
    fitted = fit_whitening(sample, w.dim, w.shrinkage)
    # Record first, whitening second: a kill in between leaves a record the whitening does not match (refitted
    # next time), never a whitening without its record.
    storage.write_bytes(str(fit_record), json.dumps({"regions": len(table.descriptors),
                                                     "version": fitted.version()}).encode())
    return fitted.save(str(ws.whitening_path))
