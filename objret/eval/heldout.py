"""Leave-one-set-out model selection: a parameter chosen from data is never chosen on the set it is reported on.

The candidates are the points of a grid over parameters (params' ``eval.tune``: each key's listed values, every
combination). The default method ranks every bench query once per candidate. For each set s, the candidate that
scores best on the other sets is the one s's queries are ranked with; together these held-out rankings are scored
as one run, beside the in-sample run (the candidate best on every set, the figure a tuned bench shows). The score
a candidate is chosen by is the mean over query kinds (class, instance) of their mAP on the sets it may see, so the
595 class queries do not drown the 84 instance ones; ties go to the earlier candidate (the grid's first values).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from objret.errors import ObjretError
from objret.eval.bench import Bench
from objret.eval.metrics import EvalReport, QueryResult, evaluate, paired_table


def tune_grid(tune: dict[str, list]) -> list[dict[str, object]]:
    """Every combination of the listed values, the first values first: [{key: value, ...}, ...]."""
    for key, values in tune.items():
        if not values:
            raise ObjretError(f"eval.tune.{key} lists no value to try")
    keys = list(tune)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(tune[k] for k in keys))] or [{}]


def as_overrides(setting: dict[str, object]) -> list[str]:
    """A candidate as ``--set`` overrides (values written as YAML reads them back)."""
    def text(value: object) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return [f"{key}={text(value)}" for key, value in setting.items()]


def selection_score(queries: list[QueryResult], sets: set[str]) -> float:
    """Mean over the query kinds present in ``sets`` of their mAP."""
    by_kind: dict[str, list[float]] = {}
    for q in queries:
        if q.set in sets:
            by_kind.setdefault(q.kind, []).append(q.ap)
    return float(np.mean([np.mean(aps) for aps in by_kind.values()])) if by_kind else float("-inf")


def localization_score(queries: list[QueryResult], sets: set[str]) -> float:
    """Mean Loc@10 of the instance queries in ``sets`` that have one (for parameters that move boxes only)."""
    located = [q.loc10 for q in queries if q.set in sets and q.loc10 is not None]
    return float(np.mean(located)) if located else float("-inf")


@dataclass
class HeldOut:
    settings: list[dict[str, object]]   # the candidates, in grid order
    chosen: dict[str, int]              # set -> the candidate chosen on the other sets
    in_sample: int                      # the candidate chosen on every set
    held_out_report: EvalReport         # every set's queries ranked by the candidate chosen without that set
    in_sample_report: EvalReport
    held_out_results: dict[str, list[dict]]   # those rankings, in the bench README's results format


def leave_one_set_out(bench: Bench, results: list[dict[str, list[dict]]], settings: list[dict[str, object]],
                      score: Callable[[list[QueryResult], set[str]], float] = selection_score) -> HeldOut:
    """``results[i]``: every query ranked with ``settings[i]``; a candidate is chosen by ``score`` on the sets
    it may see."""
    if len(results) != len(settings) or not results:
        raise ObjretError(f"leave-one-set-out needs one ranking per candidate: {len(results)} for {len(settings)}")
    reports = [evaluate(bench, r) for r in results]
    sets = {q.set for q in bench.queries}
    if len(sets) < 2:
        raise ObjretError(f"leave-one-set-out needs queries in at least two sets, {bench.root} has {sorted(sets)}")

    def best(on: set[str]) -> int:
        scores = [score(r.queries, on) for r in reports]
        return int(np.argmax(scores))   # the first of equal scores

    chosen = {s: best(sets - {s}) for s in sorted(sets)}
    merged = {q.id: results[chosen[q.set]].get(q.id, []) for q in bench.queries}
    in_sample = best(sets)
    return HeldOut(settings, chosen, in_sample, evaluate(bench, merged), reports[in_sample], merged)


def held_out_table(result: HeldOut) -> str:
    """The shown groups with in-sample and held-out mAP (and Loc@10 for instance groups) side by side, then which
    candidate each set was ranked with."""
    lines = paired_table(result.in_sample_report, result.held_out_report, ("in-sample", "held-out"))
    lines.append("")
    lines.append(f"in-sample: {_setting(result.settings[result.in_sample])}")
    for s, i in result.chosen.items():
        lines.append(f"held-out {s}: {_setting(result.settings[i])} (chosen on the other sets)")
    return "\n".join(lines)


def _setting(setting: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "params as given"
