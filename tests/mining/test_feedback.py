"""objret.mining.feedback: the query box's detector classes moved by a review's accepted boxes (the vectors and
templates a review teaches are tested with the fused method in tests/mining/test_fusion.py)."""

from __future__ import annotations

import numpy as np
import pytest

from objret.mining.feedback import frame_box_classes, moved_classes
from objret.mining.lakemaps import LakeMaps
from objret.regions.encoding import RegionVectors


def test_moved_classes_adds_the_accepted_boxes_classes_by_the_positive_weight():
    moved = moved_classes({3: 1.0}, [{6: 1.0}, {6: 0.5, 3: 0.5}], 0.75)
    total = 1.0 + 0.75
    assert moved == pytest.approx({3: (1.0 + 0.75 * 0.25) / total, 6: 0.75 * 0.75 / total})
    # A query box the detector saw nothing in takes the accepted boxes' classes; nothing accepted: unchanged.
    assert moved_classes({}, [{6: 1.0}, {}], 0.75) == pytest.approx({6: 1.0})
    assert moved_classes({3: 1.0}, [], 0.75) == {3: 1.0} and moved_classes({}, [{}], 0.75) == {}


def test_frame_box_classes_reads_the_frames_stored_detections():
    owner = np.array([0, 0, 0, 1])
    boxes = np.array([[0, 0, 100, 100], [10, 10, 20, 20], [12, 12, 20, 18], [10, 10, 20, 20]], np.float32)
    classes = np.array([-1, 6, 3, 1])          # a whole-frame region, a bus and a car on the box, another frame's
    scores = np.array([0.0, 0.9, 0.3, 0.8], np.float32)
    regions = RegionVectors(np.zeros((4, 8), np.float32), owner, boxes, "stride32", "avg", None, classes, scores)
    never = lambda: pytest.fail("no map is read")   # noqa: E731
    lake = LakeMaps(never, np.zeros((2, 8), np.float32), regions, frame_ids=["a", "b"],
                    image_sizes=np.array([[100, 100], [100, 100]]))
    found = frame_box_classes(lake, 0, (10.0, 10.0, 20.0, 20.0))
    assert set(found) == {6, 3} and found[6] > found[3] and sum(found.values()) == pytest.approx(1.0)
    assert frame_box_classes(lake, 0, (60.0, 60.0, 20.0, 20.0)) == {}   # nothing detected there
    unknown = RegionVectors(regions.vectors, owner, boxes, "stride32", "avg")
    lake.regions = unknown   # an index built before regions carried detector classes
    assert frame_box_classes(lake, 0, (10.0, 10.0, 20.0, 20.0)) == {}
