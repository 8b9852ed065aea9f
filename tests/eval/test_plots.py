"""The evaluation's plots: the numbers each plot is drawn from, and the PNGs. (Written by a real `objret eval`:
tests/flows/test_cli.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from objret.eval.plots import PLOTS, draw, plot_data
from objret.eval.metrics import EvalReport, GroupStats, QueryResult


def _query(qid: str, kind: str, bucket: str, ap: float) -> QueryResult:
    return QueryResult(qid, kind, "s", "person", 0.02, bucket, 3, ap, {10: ap, 50: ap, 100: ap}, None, 10, False)


def _report(aps: dict[str, float]) -> EvalReport:
    queries = [_query("q1", "instance", "area<1%", aps["q1"]), _query("q2", "instance", ">=5%", aps["q2"]),
               _query("q3", "class", "1-5%", aps["q3"])]
    groups = [GroupStats(f"{q.kind}/{q.size_bucket}", q.id, q.kind, 1, q.ap, q.recall, None, 0) for q in queries]
    return EvalReport(queries, groups)


def test_plot_data_is_what_the_reports_say():
    reports = {"fused": _report({"q1": 0.9, "q2": 0.5, "q3": 0.2}), "gem": _report({"q1": 0.1, "q2": 0.6, "q3": 0.3})}
    curves = {"fused": [(1, 0.4), (2, 0.7)], "gem": [(1, 0.1), (2, 0.3)]}
    data = plot_data(reports, curves)

    assert data["recall_at_k"]["methods"] == {"fused": [[1, 0.4], [2, 0.7]], "gem": [[1, 0.1], [2, 0.3]]}
    by_size = data["map_by_size"]
    assert by_size["buckets"] == ["area<1%", "1-5%", ">=5%"]
    assert by_size["kinds"]["instance"] == {"fused": [0.9, None, 0.5], "gem": [0.1, None, 0.6]}
    assert by_size["kinds"]["class"] == {"fused": [None, 0.2, None], "gem": [None, 0.3, None]}
    scatter = data["ap_scatter"]
    assert (scatter["x_method"], scatter["y_method"]) == ("fused", "gem")
    assert {(p["id"], p["x"], p["y"]) for p in scatter["points"]} == {("q1", 0.9, 0.1), ("q2", 0.5, 0.6),
                                                                      ("q3", 0.2, 0.3)}
    for name in PLOTS:
        png = draw(name, data[name])
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (640, 420)
        assert len(np.unique(np.asarray(image.convert("L")))) > 8   # something is drawn

    one = plot_data({"fused": reports["fused"]}, curves)
    assert "ap_scatter" not in one   # a scatter needs two methods
    with pytest.raises(ValueError):
        draw("pie", {})
