"""From regions to frames: a frame's score for a query is its best region's similarity.

``FrameScoring`` is the frame side of objret.index.region_index.RegionIndex (and of the sharded index): the top
frames of a query, the best region of given frames, and each frame's regions. It reads what a region index
gives: ``search`` (nearest regions), ``vectors`` (stored vectors of regions), ``owner`` (frame row of each region),
``boxes``, ``frame_ids``, ``active`` (flat | ivfpq | hnsw) and ``refine_k_factor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from objret.errors import ObjretError


@dataclass(frozen=True)
class FrameHit:
    frame_id: str
    score: float                             # the best region's similarity
    region_id: int                           # that region
    box: tuple[float, float, float, float]   # its box (x, y, w, h in frame pixels; NaN when not given)


class FrameScoring:
    """Frame-level answers over a region index (mixed into RegionIndex)."""

    _frame_starts: np.ndarray | None = None   # regions_of's frame -> region ranges, built on first use
    _region_order: np.ndarray | None = None

    def best_frames(self, query: np.ndarray, k_frames: int, k_regions: int | None = None,
                    candidates: int | None = None) -> list[FrameHit]:
        """Top frames by best region, best first.

        The frames come from the nearest regions: without k_regions the search starts at 8*k_frames regions and
        widens while fewer than k_frames distinct frames turn up (flat: to the whole index, exact; approximate:
        to 32*k_frames, as millions of candidates cost GBs); with k_regions given it searches exactly that many.
        IVF-PQ ranks the regions by PQ codes alone, then scores the first ``candidates`` frames (default
        refine_k_factor * k_frames, 256 at least) by the best of all their regions' stored (refine) vectors,
        read frame by frame: a frame's regions are neighbours on disk, so a memory-mapped index reads a few
        pages a frame instead of one per candidate region (100k-frame lake: the refined top 150 frames are
        99.7% among the PQ codes' first 1,000, so mining asks for its shortlist with no further margin).
        """
        if np.asarray(query).ndim != 1:
            raise ObjretError("best_frames takes one query vector")
        if k_frames <= 0 or not len(self):
            return []
        rescore = self.active == "ivfpq"
        # As the refine rule in _search_index: at small k, refine_k_factor*k PQ candidates miss true ones.
        wanted = max(k_frames, candidates or max(self.refine_k_factor * k_frames, 256)) if rescore else k_frames
        k, limit = min(len(self), k_regions or 8 * wanted), min(len(self), 32 * wanted)
        limit = len(self) if self.active == "flat" else limit
        owner = self.owner
        while True:
            ids, sims = self.search(query, k, refine=not rescore)
            found = ids >= 0
            ids, sims = ids[found], sims[found]
            # Sims come sorted, so a frame's first occurrence is its best region.
            _, first = np.unique(owner[ids], return_index=True)
            first.sort()
            if len(first) >= wanted or k_regions is not None or k >= limit:
                break
            k = min(limit, 4 * k)
        if rescore:
            best, region = self.best_regions(query, owner[ids[first[:wanted]]])
            order = np.argsort(-best, kind="stable")[:k_frames]
            ids, sims = region[order], best[order]
        else:
            first = first[:k_frames]
            ids, sims = ids[first], sims[first]
        boxes = self.boxes
        return [FrameHit(self.frame_ids[owner[r]], float(v), int(r), tuple(float(c) for c in boxes[r]))
                for r, v in zip(ids, sims)]

    def frame_scores(self, query: np.ndarray, frame_ids: Sequence[str]) -> np.ndarray:
        """Best-region score of each given frame, from the stored vectors (see ``vectors``: exact for flat and
        hnsw, ~1e-3 for ivfpq with refine, the PQ approximation without); frames not held score -inf."""
        rows = self.rows_of(frame_ids)
        best, _ = self.best_regions(query, rows[rows >= 0])
        out = np.full(len(rows), -np.inf, np.float32)
        out[rows >= 0] = best
        return out

    def best_regions(self, query: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each frame row: its best region's similarity to ``query`` (from ``vectors``) and that region's id."""
        q = np.asarray(query, np.float32).reshape(self.dim)
        region_ids, position = self.regions_of(rows)
        sims = (self.vectors(region_ids) @ q) if len(region_ids) else np.zeros(0, np.float32)
        best = np.full(len(rows), -np.inf, np.float32)
        np.maximum.at(best, position, sims)
        hit = np.flatnonzero(sims == best[position])
        region = np.full(len(rows), -1, np.int64)
        region[position[hit[::-1]]] = region_ids[hit[::-1]]   # reversed: the first best region wins ties
        return best, region

    def regions_of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The regions of the frames at ``rows``, frame by frame: (region ids, position of their frame in rows)."""
        rows = np.asarray(rows, np.int64)
        if self._frame_starts is None or len(self._frame_starts) != self.n_frames + 1:
            owner = self.owner
            # Regions are added frame by frame, so owners are usually sorted and a frame's regions a range.
            ordered = bool(np.all(owner[1:] >= owner[:-1]))
            self._region_order = None if ordered else np.argsort(owner, kind="stable")
            sorted_owner = owner if ordered else owner[self._region_order]
            self._frame_starts = np.searchsorted(sorted_owner, np.arange(self.n_frames + 1))
        start, stop = self._frame_starts[rows], self._frame_starts[rows + 1]
        counts = stop - start
        # Positions start[i] .. stop[i] of every row, without a Python loop over the frames.
        at = np.repeat(start - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        region_ids = at if self._region_order is None else self._region_order[at]
        return region_ids.astype(np.int64), np.repeat(np.arange(len(rows)), counts)
