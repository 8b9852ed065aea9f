"""A screenshot of a mining run in the FiftyOne App, in headless Chromium, as the README shows it
(docs/fiftyone_app.png).

    .venv/bin/objret demo --workdir /tmp/demo
    .venv/bin/python scripts/fiftyone_screenshot.py --workdir /tmp/demo pets-demo-0001 docs/fiftyone_app.png

Needs the fiftyone extra (`pip install -e '.[fiftyone]'`). What `objret fiftyone REPORT_ID` loads goes into a
FiftyOne database in a temporary folder, its App is served on 127.0.0.1 (FiftyOne's own server, nothing fetched),
and the grid of the query and the mined frames, boxes and heat maps drawn, is captured once its thumbnails have
loaded. The PNG is stored with 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the tests' Chromium launcher (tests.helpers)
from tests.helpers.headless_chromium import headless_chromium, save_screenshot  # noqa: E402

THUMBNAILS_DRAWN = "return document.querySelectorAll('canvas').length"
SHOWN_FIELDS = ("heatmap", "sample tags")   # the boxes (mined, hard_negatives) are shown by default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _show_fields_and_dismiss_offers(driver) -> None:
    """Tick the sidebar's checkboxes of SHOWN_FIELDS and close the App's "Explore Enterprise" card."""
    from selenium.webdriver.common.by import By

    for name in SHOWN_FIELDS:
        row = driver.find_element(By.XPATH, f"//span[text()='{name}']/ancestor::*[.//input[@type='checkbox']][1]")
        driver.execute_script("arguments[0].click()", row.find_element(By.XPATH, ".//input[@type='checkbox']"))
    for button in driver.find_elements(By.XPATH, "//*[text()='Dismiss']"):
        driver.execute_script("arguments[0].click()", button)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_id")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--workdir", default=None, help="the work folder of the mining run (default: params workdir)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as database, tempfile.TemporaryDirectory() as downloads:
        os.environ.update({"FIFTYONE_DATABASE_DIR": database, "FIFTYONE_DO_NOT_TRACK": "true"})
        import fiftyone as fo

        from objret.config import load_params
        from objret.steps.dataset import mining_run_in_fiftyone
        from objret.steps.workspace import Workspace

        dataset = mining_run_in_fiftyone(Workspace(load_params(), args.workdir), args.report_id)
        session = fo.launch_app(dataset, remote=True, address="127.0.0.1", port=_free_port())
        try:
            with headless_chromium(downloads, args.width, args.height) as driver:
                driver.get(session.url)
                deadline = time.monotonic() + 120
                while driver.execute_script(THUMBNAILS_DRAWN) < min(8, len(dataset)):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the FiftyOne App at {session.url} drew no grid within 120 s")
                    time.sleep(1)
                _show_fields_and_dismiss_offers(driver)
                time.sleep(3)   # the last thumbnails and their overlays
                png = driver.get_screenshot_as_png()
        finally:
            session.close()
            fo.delete_dataset(dataset.name)
    print(save_screenshot(png, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
