"""One simulated review round (objret.eval.review_round) on the test bench, with rankings whose outcome is known:
the verdicts are the first frames' labels, judged frames leave both rankings and the positives (residual
collection), and a second ranking that puts the remaining positives first scores 1."""

from __future__ import annotations

import pytest

from objret.eval.bench import load_bench
from objret.eval.review_round import review_round, review_table, simulated_review


def ranked(bench, q, positives_first: bool) -> list[dict]:
    positives = bench.positives(q)
    keys = sorted(bench.gallery_keys(q), key=lambda k: ((k in positives) != positives_first, k))
    return [{"set": s, "image_id": i, "score": float(len(keys) - r), "bbox": [r, 0, 10, 10]}
            for r, (s, i) in enumerate(keys)]


def test_a_review_round_judges_the_first_frames_and_scores_what_is_left(bench_dir):
    bench = load_bench(bench_dir)
    frame_of = {key: f"{key[0]}/{key[1]}" for key in bench.images}
    worst = {q.id: ranked(bench, q, positives_first=False) for q in bench.queries}
    seen = {}

    def rank_again(q, feedback):
        seen[q.id] = feedback
        return ranked(bench, q, positives_first=True)

    done = review_round(bench, frame_of, worst, rank_again, judged=3)
    # Negatives come first in `worst`: the reviewer rejects three frames of every query and accepts none.
    assert seen and all(not f.accepted and len(f.rejected) == 3 for f in seen.values())
    assert set(done.verdicts) == set(seen) and set(seen) | set(done.exhausted) == {q.id for q in bench.queries}
    assert done.after.group("class/all").mAP == pytest.approx(1.0)
    assert done.before.group("class/all").mAP < 0.5
    table = review_table(done)
    assert "class/all" in table and "mAP before" in table

    # The best first ranking: its first three frames are positives, accepted with the box they were ranked with.
    q = next(q for q in bench.queries if len(bench.positives(q)) > 3)
    entries = ranked(bench, q, positives_first=True)
    feedback, keys = simulated_review(bench, q, frame_of, entries, 3)
    assert keys == {(e["set"], e["image_id"]) for e in entries[:3]} and not feedback.rejected
    assert feedback.accepted == {frame_of[(e["set"], e["image_id"])]: tuple(map(float, e["bbox"])) for e in entries[:3]}
    # Judged positives leave the collection: the second ranking is scored on the rest only, and a query whose
    # positives were all judged is left out.
    best = {q.id: ranked(bench, q, positives_first=True) for q in bench.queries}
    again = review_round(bench, frame_of, best, lambda q, f: ranked(bench, q, True), judged=3)
    assert again.before.group("class/all").mAP == pytest.approx(1.0) == again.after.group("class/all").mAP
    few = {q.id for q in bench.queries if len(bench.positives(q)) <= 3}
    assert set(again.exhausted) == few
