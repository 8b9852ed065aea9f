"""A screenshot of a review page in headless Chromium, as the README shows it (docs/review_page.png).

    .venv/bin/objret demo --workdir /tmp/demo
    .venv/bin/python scripts/review_screenshot.py /tmp/demo/datasets/reviews/pets-demo-0001.html docs/review_page.png

The first frame's near-duplicates are opened, its heat map shown, and two frames marked (accept, reject), so the
picture shows what a reviewer sees mid-review. The PNG is stored with 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the tests' Chromium launcher (tests.helpers)
from tests.helpers.headless_chromium import headless_chromium, save_screenshot  # noqa: E402

MID_REVIEW = """
const cards = document.querySelectorAll('article.card');
const group = Array.from(cards).find(c => c.querySelector('details.dups'));
if (group) { group.querySelector('details.dups').open = true; group.querySelector('button.heat-toggle').click(); }
if (cards[1]) { cards[1].querySelector('button.accept').click(); }
if (cards[2]) { cards[2].querySelector('button.reject').click(); }
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", help="a review page (HTML)")
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as downloads, headless_chromium(downloads, args.width, args.height) as driver:
        driver.get(Path(args.page).resolve().as_uri())
        driver.execute_script(MID_REVIEW)
        time.sleep(1.0)   # the lazily decoded thumbnails of the opened group
        png = driver.get_screenshot_as_png()
    print(save_screenshot(png, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
