"""The review page of a real mining run in a real browser (headless Chromium): every mined frame with its box
inside its image, heat maps and near-duplicate groups that open, decisions exported as the file `objret review
apply` reads; applied, and a re-mine that leaves the rejected frames out. Also: a 500-frame page loads fast."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import pytest
from tests.helpers.headless_chromium import headless_chromium

from flows.cli import main

pytestmark = pytest.mark.slow

SMALL = ["features.backbone=efficientnet_lite0", "features.max_side=640", "mining.top_k=8",
         "mining.scales=[0.75,1.0,1.5]", "lake.video_every_n=1"]


@pytest.fixture(scope="module")
def mined_run(prefect_server, bench_dir, tmp_path_factory):
    """A real mining run: 24 PETS 2009 frames (MOT frames 101..147, every 2nd) as a video, a pedestrian missed on
    one of them; returns the work folder, the report file and the mine flow's result."""
    from flows.build_index import build_index_flow
    from flows.mine import mine_flow

    root = tmp_path_factory.mktemp("review")
    video = root / "pets.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 7, (768, 576))
    for n in range(101, 149, 2):
        writer.write(cv2.imread(str(bench_dir / "pets09_s2l1" / "images" / f"{n:06d}.jpg")))
    writer.release()
    ann = json.loads((bench_dir / "pets09_s2l1" / "annotations.json").read_text())
    box = next(a["bbox"] for a in ann["annotations"] if a["image_id"] == 121 and a["track_id"] == 19)
    report = root / "report.json"
    report.write_text(json.dumps({"report_id": "review-1", "detector": {"name": "det", "version": "1"},
                                  "frame": {"uri": "pets.avi", "frame_index": 10}, "box": box,
                                  "class_name": "person", "failure_kind": "false_negative",
                                  "notes": "missed <b>pedestrian</b> & co"}))
    workdir = root / "work"
    build_index_flow(sources=[str(video)], overrides=SMALL, workdir=str(workdir))
    return workdir, report, mine_flow(report_path=str(report), overrides=SMALL, workdir=str(workdir))


def _wait(condition, timeout: float = 20.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def _press(driver, element) -> None:
    """Click as a person would: the element in the middle of the window (not under the sticky header)."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def _load_every_thumbnail(driver) -> None:
    """Scroll every card into view (thumbnails load lazily) and wait until each has decoded."""
    driver.execute_script("document.querySelectorAll('article.card').forEach(c => c.scrollIntoView())")
    for card in driver.find_elements("css selector", "article.card"):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
    _wait(lambda: driver.execute_script(
        "return Array.from(document.querySelectorAll('article.card img.frame'))"
        ".every(i => i.complete && i.naturalWidth > 0)"), what="the thumbnails")


def test_the_review_page_of_a_real_run_in_chromium(mined_run, tmp_path):
    import mlflow

    workdir, report_path, result = mined_run
    page = Path(result["review_page"])
    assert page == workdir / "datasets" / "reviews" / "review-1.html"
    assert page.read_bytes() == Path(result["review_page_run"]).read_bytes()
    run_artifacts = {a.path for a in mlflow.tracking.MlflowClient(result["tracking_uri"])
                     .list_artifacts(result["mlflow_run_id"])}
    assert "review.html" in run_artifacts
    mined = json.loads(Path(result["mined_json"]).read_text())["mined"]
    assert len(mined) == result["mined"] == 8
    grouped = [m for m in mined if m["duplicates"]]
    assert grouped, "the run collapsed no near-duplicates: the page's groups are not exercised"

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with headless_chromium(downloads) as driver:
        driver.get(page.as_uri())
        cards = driver.find_elements("css selector", "article.card")
        assert [c.get_attribute("data-frame-id") for c in cards] == [m["frame_id"] for m in mined]
        assert [c.get_attribute("data-rank") for c in cards] == [str(m["rank"]) for m in mined]
        assert "missed <b>pedestrian</b> & co" in driver.find_element("css selector", "#report").text

        _load_every_thumbnail(driver)
        for card in cards:   # each box drawn inside its image
            image = driver.execute_script("return arguments[0].querySelector('img.frame').getBoundingClientRect()",
                                          card)
            box = driver.execute_script("return arguments[0].querySelector('svg.box rect').getBoundingClientRect()",
                                        card)
            assert box["width"] > 2 and box["height"] > 2
            assert image["left"] - 0.5 <= box["left"] and box["right"] <= image["right"] + 0.5
            assert image["top"] - 0.5 <= box["top"] and box["bottom"] <= image["bottom"] + 0.5

        # Heat maps: one frame's toggle, then all of them.
        first = cards[0]
        heat = first.find_element("css selector", ".thumb > img.heat")
        assert not heat.is_displayed()
        _press(driver, first.find_element("css selector", "button.heat-toggle"))
        assert heat.is_displayed()
        _press(driver, first.find_element("css selector", "button.heat-toggle"))
        assert not heat.is_displayed()
        _press(driver, driver.find_element("id", "heat-all"))
        assert all(c.find_element("css selector", ".thumb > img.heat").is_displayed() for c in cards)
        _press(driver, driver.find_element("id", "heat-all"))
        assert not any(c.find_element("css selector", ".thumb > img.heat").is_displayed() for c in cards)

        # A near-duplicate group: collapsed, then open with its frames.
        card = next(c for c, m in zip(cards, mined) if m["duplicates"])
        group = next(m for m in mined if m["duplicates"])
        figures = card.find_elements("css selector", "details.dups figure")
        assert len(figures) == len(group["duplicates"]) and not any(f.is_displayed() for f in figures)
        _press(driver, card.find_element("css selector", "details.dups summary"))
        assert all(f.is_displayed() for f in figures)
        assert [f.get_attribute("data-frame-id") for f in figures] == group["duplicates"]
        _wait(lambda: driver.execute_script("return Array.from(arguments[0].querySelectorAll('details img'))"
                                            ".every(i => i.complete && i.naturalWidth > 0)", card),
              what="the near-duplicates' thumbnails")

        # Decisions: accept #1, reject #2 and #3, accept #4 and take it back; then export.
        def click(i: int, button: str) -> None:
            _press(driver, cards[i].find_element("css selector", f"button.{button}"))

        click(0, "accept")
        click(1, "reject")
        click(2, "reject")
        click(3, "accept")
        click(3, "accept")
        assert "1 accepted, 2 rejected, 5 undecided" in driver.find_element("id", "counts").text
        assert "reject" in cards[1].get_attribute("class").split()
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(tmp_path / "review_page.png"))
        _press(driver, driver.find_element("id", "export"))
        exported = _wait(lambda: list(downloads.glob("decisions-review-1.json")), what="the download")[0]
        decisions = json.loads(_wait(lambda: exported.read_text(), what="the downloaded file"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors   # no script error, nothing blocked by the page's Content-Security-Policy
    assert (tmp_path / "review_page.png").stat().st_size > 10_000

    assert decisions["report_id"] == "review-1" and decisions["format"] == "objret-review-decisions/1"
    assert decisions["run"]["mlflow_run_id"] == result["mlflow_run_id"]
    assert decisions["run"]["dataset_dvc_md5"] == result["dataset"]["dvc_md5"]
    assert decisions["decisions"] == [{"frame_id": mined[0]["frame_id"], "decision": "accept"},
                                      {"frame_id": mined[1]["frame_id"], "decision": "reject"},
                                      {"frame_id": mined[2]["frame_id"], "decision": "reject"}]

    # Applied: the two rejected frames leave the dataset as a new version ...
    overrides = [arg for o in SMALL for arg in ("--set", o)]
    assert main(["review", "apply", str(exported), "--workdir", str(workdir), *overrides]) == 0
    coco = json.loads((workdir / "datasets" / "retraining" / "annotations.json").read_text())
    frames = {i["frame_id"] for i in coco["images"]}
    assert frames == {m["frame_id"] for m in mined[3:]} | {mined[0]["frame_id"]}
    # ... and a re-mine of the report learns from the review (objret.mining.feedback): the judged frames are not
    # ranked again (the rejected ones never come back), the accepted one stays, and the run says what it learned.
    from flows.mine import mine_flow

    again = mine_flow(report_path=str(report_path), overrides=SMALL, workdir=str(workdir))
    remined = json.loads(Path(again["mined_json"]).read_text())
    judged = {m["frame_id"] for m in mined[:3]}
    assert not judged & {m["frame_id"] for m in remined["mined"]}
    assert remined["provenance"]["feedback"] == {"judged": 3, "accepted": 1, "rejected": 2, "accepted_used": 1,
                                                 "rejected_used": 2, "templates": 1}
    coco_again = json.loads((workdir / "datasets" / "retraining" / "annotations.json").read_text())
    kept = {i["frame_id"] for i in coco_again["images"]}
    assert frames <= kept and not {mined[1]["frame_id"], mined[2]["frame_id"]} & kept
    assert again["dataset"]["added"] == len(kept - frames) and again["dataset"]["rejected"] == 0


def test_a_page_of_500_frames_loads_fast(mined_run, tmp_path):
    """500 mined frames (the run's frames repeated, each with its heat map and near-duplicates): the page's size,
    how long it takes to make, and how long Chromium takes to show it."""
    from objret.dataset.review_page import review_page

    _, _, result = mined_run
    run = json.loads(Path(result["mined_json"]).read_text())
    base = run["mined"]
    run["mined"] = [{**base[i % len(base)], "frame_id": f"{base[i % len(base)]['frame_id'][:40]}-{i}", "rank": i + 1}
                    for i in range(500)]
    start = time.perf_counter()
    html = review_page(run, {"mlflow_run_id": result["mlflow_run_id"]})
    build_s = time.perf_counter() - start
    page = tmp_path / "review-500.html"
    page.write_text(html)
    size_mb = page.stat().st_size / 1e6

    with headless_chromium(tmp_path) as driver:
        start = time.perf_counter()
        driver.get(page.as_uri())   # returns once the page has loaded
        load_s = time.perf_counter() - start
        timing = driver.execute_script("const n = performance.getEntriesByType('navigation')[0];"
                                       "return {dom: n.domContentLoadedEventEnd, load: n.loadEventEnd};")
        assert len(driver.find_elements("css selector", "article.card")) == 500
        decoded = driver.execute_script("return document.querySelectorAll('article.card img.frame[src]').length")
        driver.execute_script("document.querySelector('article.card:last-of-type').scrollIntoView()")
        _wait(lambda: driver.execute_script("const i = document.querySelector('article.card:last-of-type img.frame');"
                                            "return i.complete && i.naturalWidth > 0"), what="the last thumbnail")
        scrolled_s = time.perf_counter() - start
    print(f"\n500-frame review page: {size_mb:.1f} MB, built in {build_s:.1f} s; Chromium: DOMContentLoaded "
          f"{timing['dom'] / 1000:.2f} s, load {timing['load'] / 1000:.2f} s, get() {load_s:.2f} s, last thumbnail "
          f"shown {scrolled_s:.2f} s after the start; {decoded} of 500 thumbnails decoded at load")
    assert decoded < 100   # lazy: only the cards near the viewport
    assert size_mb < 25 and timing["load"] < 10_000
