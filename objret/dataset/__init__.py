"""Dataset: ranked frames with boxes and provenance enter; a versioned retraining dataset (COCO json, DVC
registry, publishing), the review page, review decisions and contact sheets leave.
"""
