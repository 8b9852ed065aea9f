"""What `objret ui` opens, in headless Chromium, as the README shows it (docs/mlflow_runs.png).

    .venv/bin/objret demo --workdir /tmp/demo
    .venv/bin/python scripts/mlflow_screenshot.py --workdir /tmp/demo docs/mlflow_runs.png

Runs `objret ui` as a user would, opens the URL it prints and waits for the experiment's runs table. Exits 1,
naming what is missing, when the page is not the *Training runs* table with the Dataset column showing the
retraining dataset (e.g. MLflow's GenAI overview instead). The PNG is stored with 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the tests' Chromium launcher (tests.helpers)
from tests.helpers.headless_chromium import headless_chromium, save_screenshot  # noqa: E402

EXPECTED = ("Training runs", "Dataset", "retraining")   # the runs table, its Dataset column, the mined dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _printed_url(ui: subprocess.Popen) -> str:
    for line in ui.stdout:
        if line.startswith("open "):
            return line.split(" ", 1)[1].strip()
    raise SystemExit("objret ui printed no URL to open")


def _wait_for_server(home: str, deadline: float) -> None:
    while True:
        try:
            urllib.request.urlopen(home, timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"the MLflow UI at {home} did not answer")
            time.sleep(1)


def _close_assistant(driver) -> None:
    """Close the MLflow Assistant side panel: it covers the table's right-hand columns."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        button.click()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("--workdir", default=None, help="the work folder of the runs (default: params workdir)")
    parser.add_argument("--width", type=int, default=1900)
    parser.add_argument("--height", type=int, default=700)
    args = parser.parse_args()
    command = [sys.executable, "-m", "flows.cli", "ui", "--port", str(_free_port())]
    command += ["--workdir", args.workdir] if args.workdir else []
    ui = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True)
    try:
        url = _printed_url(ui)
        with tempfile.TemporaryDirectory() as downloads, \
                headless_chromium(downloads, args.width, args.height) as driver:
            deadline = time.monotonic() + 120
            _wait_for_server(url.split("#")[0], deadline)
            driver.get(url)
            missing = EXPECTED
            while missing and time.monotonic() < deadline:
                time.sleep(2)
                text = driver.execute_script("return document.body.innerText")
                missing = [word for word in EXPECTED if not re.search(rf"\b{word}\b", text)]
            if missing:
                raise SystemExit(f"{url} does not show {', '.join(missing)}")
            _close_assistant(driver)
            time.sleep(2)   # the table's last cells
            png = driver.get_screenshot_as_png()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    print(f"{url} -> {save_screenshot(png, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
