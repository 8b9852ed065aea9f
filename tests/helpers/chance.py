"""What a ranking without any signal scores on a bench: the baseline a retrieval test's mAP must beat.

On a small gallery most frames can be positives (a person seen in every frame of a short clip), where any
ranking, even a random one, has a high AP; a test that only asks for mAP > 0 then proves nothing."""

from __future__ import annotations


def chance_ap(n: int, positives: int) -> float:
    """The expected AP (objret.eval.metrics.average_precision) of a uniformly random order of ``n`` gallery items of
    which ``positives`` are positives: the positive at rank r has 1 + (r - 1)(P - 1)/(n - 1) positives up to it
    on average, and each rank holds a positive with probability P / n."""
    if positives == 0:
        return 0.0
    if n == 1:
        return 1.0
    return sum((1 + (r - 1) * (positives - 1) / (n - 1)) / r for r in range(1, n + 1)) / n


def chance_map(bench, queries) -> float:
    """The mean chance AP of ``queries`` over their scored galleries (Bench.gallery_keys)."""
    queries = list(queries)
    return sum(chance_ap(len(bench.gallery_keys(q)), len(bench.positives(q))) for q in queries) / len(queries)
