"""One simulated review round on a labelled bench: what relevance feedback (objret.mining.feedback) is worth.

Each query's first ``judged`` gallery frames of the default ranking are reviewed as a labeller would on the
review page: the positives accepted (with the box the method gave them, as the dataset holds it), the others
rejected. The query is then mined again with those verdicts, and both rankings are scored on the residual
collection (Salton and Buckley 1990): the judged frames count as junk in both, removed from the ranking and
from the positives, so the second round is not credited for frames the reviewer already saw and the two
figures compare the same frames. A query whose positives were all judged has nothing left to find and is
left out of both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from objret.eval.bench import Bench, Key, Query
from objret.eval.metrics import EvalReport, evaluate, paired_table
from objret.mining.feedback import Feedback


@dataclass
class ReviewRound:
    judged: int                                 # frames judged per query
    before: EvalReport                          # the first ranking, on the residual collection
    after: EvalReport                           # the ranking after one review, on the same collection
    results: dict[str, list[dict]]              # the second round's rankings (bench results format)
    verdicts: dict[str, tuple[int, int]]        # query id -> (accepted, rejected)
    exhausted: list[str]                        # queries whose positives were all judged (left out)


def simulated_review(bench: Bench, q: Query, frame_of: dict[Key, str], entries: list[dict],
                     judged: int) -> tuple[Feedback, set[Key]]:
    """The verdicts on the first ``judged`` of ``entries`` (the query's gallery ranking, best first): positives
    accepted with their predicted box, the rest rejected; and the judged images."""
    positives = bench.positives(q)
    accepted, rejected, keys = {}, set(), set()
    for entry in entries[:judged]:
        key = (entry["set"], entry["image_id"])
        keys.add(key)
        if key in positives:
            accepted[frame_of[key]] = tuple(float(v) for v in entry["bbox"])
        else:
            rejected.add(frame_of[key])
    return Feedback(accepted, frozenset(rejected)), keys


def review_round(bench: Bench, frame_of: dict[Key, str], first: dict[str, list[dict]],
                 rank_again: Callable[[Query, Feedback], list[dict]], judged: int = 10,
                 progress: Callable | None = None) -> ReviewRound:
    """``first``: every query's ranking (bench results format); ``rank_again(q, feedback)``: the query mined again
    with the verdicts, as gallery entries. Both scored on the residual collection (see the module's docstring)."""
    residual, second, verdicts, exhausted = [], {}, {}, []
    queries = progress(bench.queries) if progress else bench.queries
    for q in queries:
        feedback, keys = simulated_review(bench, q, frame_of, first.get(q.id, []), judged)
        rest = dataclasses.replace(q, junk=q.junk | keys, num_positives=None)
        if not bench.positives(rest):
            exhausted.append(q.id)
            continue
        second[q.id] = rank_again(q, feedback)
        verdicts[q.id] = (len(feedback.accepted), len(feedback.rejected))
        residual.append(rest)
    rest = dataclasses.replace(bench, queries=residual)
    return ReviewRound(judged, evaluate(rest, first), evaluate(rest, second), second, verdicts, exhausted)


def review_table(result: ReviewRound) -> str:
    """mAP (and Loc@10 for instance groups) before and after the review round, per shown group."""
    lines = [f"one review round: each query's first {result.judged} frames judged (positives accepted, the rest "
             "rejected); residual collection", *paired_table(result.before, result.after, ("before", "after"))]
    accepted = sum(a for a, _ in result.verdicts.values())
    rejected = sum(r for _, r in result.verdicts.values())
    lines.append(f"\nverdicts: {accepted} accepted, {rejected} rejected over {len(result.verdicts)} queries "
                 f"({len(result.exhausted)} left out: every positive judged)")
    return "\n".join(lines)
