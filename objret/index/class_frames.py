"""Frames by detector class: for each class the region detector names (objret.regions.detector), the lake frames
it found an object of that class in, with its most confident detection there. The fused method re-ranks, beside
its shortlist, the frames of highest class agreement with the query box (objret.mining.class_agreement,
objret.mining.shortlist): objects of the class that look too unlike the query for its region or cell vectors to
find them.

Built from the region index's per-region meta (``class``, ``class_score``) in one sort, when a LakeSearch first
needs it, and held in memory: one (frame, class) pair per class a frame holds, 8 bytes each. Bench: 1,526 frames,
5.3 pairs a frame (SSD score >= 0.05, 30 boxes at most); at 1M frames ~47 MB, built in ~5 s (one sort of ~30M
detector regions, 0.7 GB passing: benchmarks/class_frames_scale.py). A query reads the lists of its box's classes
only: one weighted bincount over their frames (15 ms at 1M). The same lists say how much of the lake holds a
class (``share``), by which mining discounts the query's classes (``discounted``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassFrames:
    labels: np.ndarray    # K distinct class ids, ascending
    starts: np.ndarray    # K + 1 offsets: class labels[i]'s frames are rows[starts[i]:starts[i + 1]]
    rows: np.ndarray      # frame rows (the region index's), grouped by class
    scores: np.ndarray    # the frame's most confident detection of the class
    n_frames: int

    @classmethod
    def from_regions(cls, owner: np.ndarray, classes: np.ndarray, class_scores: np.ndarray,
                     n_frames: int) -> "ClassFrames":
        """From one row per region (``owner``: its frame row; ``classes``: the detector's class id, -1 for a
        region of another source; ``class_scores``: its confidence)."""
        classes, scores = np.asarray(classes), np.asarray(class_scores)
        # The detector's regions picked first, so that every array below is theirs only (bench-like lakes: 3 of
        # every 5 regions): the build runs in a mining process and adds its transient to that process's peak.
        labelled = np.flatnonzero((classes >= 0) & (scores > 0))
        key = classes[labelled].astype(np.int64) * n_frames + np.asarray(owner)[labelled]   # (class, frame) pairs
        pair_scores = scores[labelled].astype(np.float32)
        del labelled
        order = np.argsort(key)
        key, pair_scores = key[order], pair_scores[order]
        del order
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
        best = np.maximum.reduceat(pair_scores, first) if len(key) else np.zeros(0, np.float32)
        pair_class, rows = np.divmod(key[first], n_frames)
        labels, class_start = np.unique(pair_class, return_index=True)
        return cls(labels, np.r_[class_start, len(rows)].astype(np.int64), rows.astype(np.int32), best,
                   int(n_frames))

    def __len__(self) -> int:
        return len(self.rows)

    def share(self, label: int) -> float:
        """How much of the lake holds the class: the mean over every frame of its most confident detection of
        it (0 for a frame without it), in [0, 1]."""
        i = int(np.searchsorted(self.labels, label))
        if i == len(self.labels) or self.labels[i] != label or not self.n_frames:
            return 0.0
        return float(self.scores[self.starts[i]:self.starts[i + 1]].sum(dtype=np.float64) / self.n_frames)

    def discounted(self, query_classes: dict[int, float]) -> dict[int, float]:
        """The query box's class weights, each times the share of the lake that does not hold the class (1 -
        ``share``): a class in nearly every frame cannot tell the frames apart, and its detector's confidence
        would only add noise to them (bench lake: person 0.66, car 0.30, the other classes under 0.1)."""
        return {label: weight * (1.0 - self.share(label)) for label, weight in query_classes.items()}

    def agreement(self, query_classes: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
        """(frame rows, their class agreement with a query box of ``query_classes`` {class id: weight}): the
        frames holding at least one of the classes, each scoring the sum over them of weight x its most confident
        detection of the class (objret.mining.class_agreement.class_agreement, over every frame)."""
        rows, weights = [], []
        for label, weight in query_classes.items():
            i = int(np.searchsorted(self.labels, label))
            if i < len(self.labels) and self.labels[i] == label and weight > 0:
                span = slice(self.starts[i], self.starts[i + 1])
                rows.append(self.rows[span])
                weights.append(weight * self.scores[span].astype(np.float64))
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        total = np.bincount(np.concatenate(rows), np.concatenate(weights), minlength=self.n_frames)
        held = np.flatnonzero(total > 0)   # every listed score is > 0
        return held, total[held]
