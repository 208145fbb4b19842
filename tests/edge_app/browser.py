"""Headless Chromium from Debian's packages, driven by Selenium with the driver path given
explicitly: nothing is downloaded (no Selenium Manager), no background network traffic."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(paths: tuple[str, ...], name: str) -> str | None:
    for p in paths:
        if Path(p).is_file():
            return p
    return shutil.which(name)


def artifacts_dir() -> Path:
    """Screenshots land here (LINEINSPECT_TEST_ARTIFACTS, default test-artifacts/ in the checkout)."""
    d = Path(os.environ.get("LINEINSPECT_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def make_driver(width: int = 1400, height: int = 1000):
    binary = _first(CHROMIUM, "chromium")
    driver_path = _first(DRIVER, "chromedriver")
    if not binary or not driver_path:
        msg = "browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium fetch a driver or a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--metrics-recording-only",
        "--safebrowsing-disable-auto-update",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=ChromeService(executable_path=driver_path), options=opts)


def screenshot(driver, name: str) -> Path:
    """A full-page screenshot (the window grown to the page's height) under the artifacts folder."""
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 600)")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, min(int(height) + 120, 4000))
    path = artifacts_dir() / name
    driver.save_screenshot(str(path))
    return path
