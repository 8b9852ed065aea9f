"""The region graph and its centrality on disk: one version folder per build, a CURRENT pointer switched last.

Layout of a graph folder (``Workspace.graph_dir``, beside the region index it belongs to)::

    CURRENT                 the name of the current version folder
    g-<ns>-<pid>/
        knn.npz             the k-NN lists (objret.graph.knn.KnnLists; what an incremental refresh extends)
        matrix.npz          S = D^-1/2 W D^-1/2 (003 eq. 11), scipy sparse CSR, no pickle
        centrality.npy      Katz centrality g* per node (003 eq. 12-13)
        check.npz           a few node ids and their vectors: a refresh checks that old nodes are unchanged
        manifest.json       written last: format, the index version it belongs to, parameters, figures, sizes

Saved by objret.versions (a temporary folder renamed whole, then named by CURRENT in one os.replace), as
the region index is: a reader (or a crash) sees the previous graph or the new one, never a half-written one. Node i is region i of the index the manifest names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy import sparse

from objret.errors import ObjretError
from objret.graph.diffusion import GraphDiffusion
from objret.graph.knn import KnnLists, RegionGraph
from objret.versions import current_version, load_manifest, save_version

FORMAT = 1


@dataclass
class StoredGraph:
    """One saved graph version; arrays load on first use."""

    directory: Path        # the version folder
    manifest: dict

    @property
    def version(self) -> str:
        return self.directory.name

    @cached_property
    def matrix(self) -> sparse.csr_matrix:
        matrix = sparse.load_npz(self.directory / "matrix.npz").tocsr()
        if matrix.shape != (self.nodes, self.nodes):
            raise self._bad(f"matrix of shape {matrix.shape} for {self.nodes} nodes")
        return matrix

    @cached_property
    def knn(self) -> KnnLists:
        return KnnLists.load(self.directory / "knn.npz")

    @cached_property
    def centrality(self) -> np.ndarray:
        values = np.load(self.directory / "centrality.npy", allow_pickle=False)
        if values.shape != (self.nodes,):
            raise self._bad(f"{len(values)} centrality values for {self.nodes} nodes")
        return values

    def check(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.directory / "check.npz", allow_pickle=False) as data:
            return data["ids"], data["vectors"]

    @property
    def nodes(self) -> int:
        return int(self.manifest["stats"]["nodes"])

    def _bad(self, why: str) -> ObjretError:
        return ObjretError(f"region graph in {self.directory} is unusable ({why}): run build-index again")


def load_graph(directory: str | Path) -> StoredGraph | None:
    """The current graph of ``directory``; None when none was saved; ObjretError when it is damaged."""
    found = load_manifest(directory, "region graph", FORMAT)
    return None if found is None else StoredGraph(*found)


def save_graph(directory: str | Path, graph: RegionGraph, centrality: np.ndarray, check_ids: np.ndarray,
               check_vectors: np.ndarray, manifest: dict) -> StoredGraph:
    """Write a new version (arrays, then the manifest), then point CURRENT at it; older versions are removed."""
    def write(folder: Path) -> None:
        graph.knn.save(folder / "knn.npz")
        sparse.save_npz(folder / "matrix.npz", graph.matrix.tocsr(), compressed=False)
        np.save(folder / "centrality.npy", np.asarray(centrality, np.float64), allow_pickle=False)
        with open(folder / "check.npz", "wb") as handle:
            np.savez(handle, ids=np.asarray(check_ids, np.int64), vectors=np.asarray(check_vectors, np.float32))

    save_version(directory, "g", write, {"format": FORMAT, **manifest})
    return load_graph(directory)


def open_diffusion(graph_dir: str | Path, index_dir: str | Path, index, *, k: int, alpha: float,
                   max_iter: int) -> GraphDiffusion:
    """Diffusion over the stored graph of ``index`` (a RegionIndex loaded from ``index_dir``), with the query
    side's ``k``, ``alpha`` and ``max_iter`` (mining.diffusion); ObjretError when there is no graph for it."""
    stored = load_graph(graph_dir)
    if stored is None:
        raise ObjretError(f"diffusion needs the region graph and there is none in {graph_dir}: run build-index "
                          "(with graph.enabled: true)")
    current = current_version(index_dir)
    if stored.manifest["index"]["current"] != current or stored.nodes != len(index):
        raise ObjretError(f"the region graph in {graph_dir} was built for another version of the region index "
                          f"({stored.manifest['index']['current']}, {stored.nodes} regions; the index is {current}, "
                          f"{len(index)} regions): run build-index")
    return GraphDiffusion(stored.matrix, index.owner, list(index.frame_ids), index.search,
                          k=k, beta=float(stored.manifest["settings"]["knn"]["beta"]), alpha=alpha, max_iter=max_iter,
                          version=stored.version)
