"""Headless Chromium for tests and screenshots: Debian's chromium driven through its chromedriver by selenium.

scripts/setup.sh installs both. The explicit driver and browser paths keep selenium-manager from running (it
would download a driver); the flags keep Chromium from calling home, which the closed network refuses.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


@contextlib.contextmanager
def headless_chromium(download_dir: str | Path, width: int = 1400, height: int = 1000):
    """A selenium WebDriver on a fresh profile; downloads land in ``download_dir``; the browser's console is
    readable with ``driver.get_log("browser")``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver_path:
        raise RuntimeError("chromium and chromedriver are missing: run scripts/setup.sh (it installs Debian's "
                           "chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def save_screenshot(png: bytes, out: str | Path) -> str:
    """A browser screenshot stored with 256 colours (small enough for a README); a line saying where and how big."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
    return f"{out}: {image.width}x{image.height}, {Path(out).stat().st_size / 1000:.0f} kB"
