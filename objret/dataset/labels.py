"""What a report's mined frames become in the retraining dataset, by the kind of failure it reports.

A false negative's frames are boxed under its class: the detector missed such objects. A misclassification's are
boxed under the true class (the report's ``class_name``); the class the detector gave is kept beside it. A false
positive's frames are hard negatives: the detector called such an object ``class_name`` and it is not one, so
boxing them under that class would teach the very mistake; their regions are kept as ``hard_negatives`` for the
labeller, under no category. Exports and the review page read this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetLabel:
    class_name: str               # the category mined boxes go under, or (hard negative) the class they are not
    hard_negative: bool
    predicted_class: str | None   # misclassification: the class the detector gave (None when the report predates it)

    def describe(self) -> str:
        if self.hard_negative:
            return f"hard negatives: not {self.class_name} (no box under {self.class_name})"
        if self.predicted_class:
            return f"boxes of {self.class_name} (the detector said {self.predicted_class})"
        return f"boxes of {self.class_name}"


def dataset_label(report: Any) -> DatasetLabel:
    """The label of a report: a FailureReport or its JSON data (as mined.json and the ledger hold it)."""
    get = report.get if isinstance(report, dict) else lambda key: getattr(report, key, None)
    return DatasetLabel(class_name=get("class_name"), hard_negative=get("failure_kind") == "false_positive",
                        predicted_class=get("predicted_class"))
