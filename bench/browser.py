"""Headless Chromium through Debian's chromedriver (`make browser` installs both): the browser that bench/view.py and
the UI tests (tests/test_cluster.py, tests/test_view.py) drive."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from typing import Any

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class BrowserMissing(RuntimeError):
    """Chromium or its driver is not installed."""


@contextlib.contextmanager
def chromium(window: str = "1600,1100") -> Iterator[Any]:
    """Yield a headless Chromium WebDriver with a `window`-sized window; quit it at the end."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        raise BrowserMissing("Debian packages chromium and chromium-driver are missing: `make test` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as Driver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Driver(CHROMEDRIVER), options=options)
    try:
        yield browser
    finally:
        browser.quit()
