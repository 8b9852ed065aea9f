"""objret.index.class_frames: the lake's frames by detector class, the class queries' third shortlist."""

from __future__ import annotations

import numpy as np
import pytest

from objret.index.class_frames import ClassFrames


def _regions(seed: int, n_frames: int, per_frame: int):
    """Random regions as the region index's meta holds them: a third from other sources (class -1, score 0)."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_frames), per_frame)
    classes = rng.choice([1, 3, 6, 10], len(owner)).astype(np.float32)   # meta is stored as float32
    scores = rng.uniform(0.05, 1.0, len(owner)).astype(np.float32)
    other = rng.random(len(owner)) < 1 / 3
    classes[other], scores[other] = -1, 0.0
    return owner, classes, scores


@pytest.mark.parametrize("query", [{1: 1.0}, {6: 0.75, 3: 0.25}, {10: 0.5, 1: 0.3, 99: 0.2}])
def test_agreement_is_each_frames_weighted_best_detection_of_the_query_classes(query):
    owner, classes, scores = _regions(0, 200, 12)
    frames = ClassFrames.from_regions(owner, classes, scores, 200)
    rows, agreement = frames.agreement(query)
    every = np.zeros(200)   # by hand: per frame, each query class's weight x its most confident detection
    for frame in range(200):
        for label, weight in query.items():
            mine = (owner == frame) & (classes == label)
            every[frame] += weight * (scores[mine].max() if mine.any() else 0.0)
    np.testing.assert_array_equal(rows, np.flatnonzero(every > 0))   # every frame holding a class, no other
    np.testing.assert_allclose(agreement, every[rows], rtol=1e-6)
    # One pair per (frame, class) held, far fewer than the regions.
    held = {(int(o), int(c)) for o, c, s in zip(owner, classes, scores) if c >= 0}
    assert len(frames) == len(held) < len(owner)


def test_each_frame_keeps_its_most_confident_detection_of_a_class():
    owner = np.array([0, 0, 0, 1, 1, 2])
    classes = np.array([6, 6, 3, 3, -1, 1], np.float32)
    scores = np.array([0.4, 0.9, 0.8, 0.5, 0.0, 0.7], np.float32)
    frames = ClassFrames.from_regions(owner, classes, scores, 4)
    assert len(frames) == 4   # (0, bus), (0, car), (1, car), (2, person)
    rows, agreement = frames.agreement({6: 0.5, 3: 0.5})
    np.testing.assert_array_equal(rows, [0, 1])
    np.testing.assert_allclose(agreement, [0.5 * 0.9 + 0.5 * 0.8, 0.5 * 0.5])   # the bus at 0.9, not at 0.4
    rows, agreement = frames.agreement({1: 1.0})
    np.testing.assert_array_equal(rows, [2])
    assert agreement[0] == pytest.approx(0.7)


def test_no_detection_or_no_known_class_finds_nothing():
    owner, classes, scores = _regions(1, 10, 4)
    empty = ClassFrames.from_regions(owner, np.full_like(classes, -1), np.zeros_like(scores), 10)
    assert len(empty) == 0 and len(empty.agreement({1: 1.0})[0]) == 0
    frames = ClassFrames.from_regions(owner, classes, scores, 10)
    assert len(frames.agreement({})[0]) == 0 and len(frames.agreement({42: 1.0})[0]) == 0


def test_a_class_is_discounted_by_how_much_of_the_lake_holds_it():
    # Four frames: a person in every one (best detections 0.9, 0.8, 0.7, 0.6), a bus in one (0.5), no car.
    owner = np.array([0, 0, 1, 2, 3, 3, 0])
    classes = np.array([1, 1, 1, 1, 1, 6, 6], np.float32)
    scores = np.array([0.9, 0.2, 0.8, 0.7, 0.6, 0.5, 0.1], np.float32)
    frames = ClassFrames.from_regions(owner, classes, scores, 4)
    assert frames.share(1) == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)
    assert frames.share(6) == pytest.approx((0.1 + 0.5) / 4)   # frame 0's bus at 0.1, frame 3's at 0.5
    assert frames.share(3) == 0.0
    weights = frames.discounted({1: 0.5, 6: 0.3, 3: 0.2})
    assert weights == pytest.approx({1: 0.5 * 0.25, 6: 0.3 * 0.85, 3: 0.2})
    # The rarer class now leads a frame's agreement: frame 3 (person 0.6, bus 0.5) above frame 0 (0.9, 0.1).
    rows, agreement = frames.agreement(weights)
    assert agreement[list(rows).index(3)] > agreement[list(rows).index(0)]
    # A class in every frame at full confidence tells no frame apart.
    every = ClassFrames.from_regions(np.arange(3), np.ones(3, np.float32), np.ones(3, np.float32), 3)
    assert every.discounted({1: 1.0}) == {1: 0.0}
