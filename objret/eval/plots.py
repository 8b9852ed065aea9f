"""The plots of an evaluation, as PNGs: a change to a method is judged at a glance.

- ``recall_at_k``: mean Recall@K over K, one line per method;
- ``map_by_size``: mAP by query-size bucket (objret.eval.metrics.SIZE_BUCKETS), class and instance queries apart;
- ``ap_scatter``: each query's AP under the first method against the second's (points above the diagonal: the
  second does better on that query).

``plot_data`` gathers what each plot shows from the evaluation's reports; ``draw`` turns that into PNG bytes.
"""

from __future__ import annotations

import io

from objret.eval.metrics import SIZE_BUCKETS, EvalReport

PLOTS = ("recall_at_k", "map_by_size", "ap_scatter")


def plot_data(reports: dict[str, EvalReport], curves: dict[str, list[tuple[int, float]]]) -> dict[str, dict]:
    """Per plot, the numbers it shows: ``reports`` and ``curves`` (objret.eval.metrics.recall_curve) by method, the
    first method first. ``ap_scatter`` needs two methods (absent with one)."""
    methods = list(reports)
    buckets = [label for label, *_ in SIZE_BUCKETS]
    by_size = {}
    for kind in ("class", "instance"):
        rows = {m: [_map(reports[m], f"{kind}/{b}") for b in buckets] for m in methods}
        if any(v is not None for values in rows.values() for v in values):
            by_size[kind] = rows
    data = {"recall_at_k": {"methods": {m: [[k, r] for k, r in curves.get(m, [])] for m in methods}},
            "map_by_size": {"buckets": buckets, "kinds": by_size}}
    if len(methods) >= 2:
        first, second = methods[:2]
        ap_second = {q.id: q.ap for q in reports[second].queries}
        points = [{"id": q.id, "kind": q.kind, "x": q.ap, "y": ap_second[q.id]}
                  for q in reports[first].queries if q.id in ap_second]
        data["ap_scatter"] = {"x_method": first, "y_method": second, "points": points}
    return data


def _map(report: EvalReport, group: str) -> float | None:
    g = report.group(group)
    return None if g is None else g.mAP


def draw(name: str, data: dict) -> bytes:
    """The PNG of plot ``name`` (one of PLOTS) from its ``plot_data`` entry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)   # the Agg backend for this figure alone: no display, no global pyplot state
    ax = fig.add_subplot()
    if name == "recall_at_k":
        for method, points in data["methods"].items():
            if points:
                ax.plot([k for k, _ in points], [r for _, r in points], label=method)
        ax.set_xscale("log")
        ax.set(xlabel="K", ylabel="mean Recall@K", title="Recall@K", ylim=(0, 1.02))
    elif name == "map_by_size":
        groups = [(kind, m, values) for kind, rows in data["kinds"].items() for m, values in rows.items()]
        width = 0.8 / max(1, len(groups))
        for i, (kind, method, values) in enumerate(groups):
            xs = [b + (i - (len(groups) - 1) / 2) * width for b in range(len(data["buckets"]))]
            ax.bar(xs, [v or 0.0 for v in values], width, label=f"{method} ({kind})")
        ax.set_xticks(range(len(data["buckets"])), [f"box {b} of frame" for b in data["buckets"]])
        ax.set(ylabel="mAP", title="mAP by query size", ylim=(0, 1.02))
    elif name == "ap_scatter":
        for kind in sorted({p["kind"] for p in data["points"]}):
            points = [p for p in data["points"] if p["kind"] == kind]
            ax.scatter([p["x"] for p in points], [p["y"] for p in points], s=14, alpha=0.7, label=f"{kind} queries")
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
        ax.set(xlabel=f"AP, {data['x_method']}", ylabel=f"AP, {data['y_method']}",
               title="AP per query", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
    else:
        raise ValueError(f"unknown plot {name!r}: one of {', '.join(PLOTS)}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
