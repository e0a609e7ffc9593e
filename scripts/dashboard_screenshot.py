"""Saves a PNG of the running dashboard, as a headless Debian chromium renders it.

    python -m scripts.dashboard_screenshot http://127.0.0.1:8080 docs/dashboard.png

Waits until the page has rendered data from /dashboard/data (``--polls`` times,
so the charts have filled), then photographs the whole page. Uses the system's
chromium and chromedriver (scripts/install_browser.sh installs Debian's); it never
lets selenium download a browser or a driver. tests/integration/test_dashboard.py
drives the browser through the same functions.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Optional

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
WIDTH, HEIGHT = 1400, 1000


def _which(names: tuple) -> Optional[str]:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    # Debian's chromium-driver puts the driver here; not always on PATH.
    return "/usr/lib/chromium/chromedriver" if "chromedriver" in names and \
        os.path.exists("/usr/lib/chromium/chromedriver") else None


def headless_chromium(width: int = WIDTH, height: int = HEIGHT):
    """A selenium driver of the system's chromium in headless mode. Raises RuntimeError when
    chromium or chromedriver is not installed (run scripts/install_browser.sh)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = _which(BROWSERS), _which(DRIVERS)
    if not browser or not driver:
        raise RuntimeError("chromium and chromedriver are needed: run scripts/install_browser.sh "
                           f"(found browser={browser}, driver={driver})")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run",
                "--disable-extensions", f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def polls(driver) -> int:
    """How many times the page has rendered /dashboard/data (body[data-polls])."""
    return int(driver.execute_script("return document.body.dataset.polls || '0'"))


def wait_for_polls(driver, at_least: int, timeout: float = 60.0) -> int:
    """Waits until the page rendered data ``at_least`` times; returns the count. Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        n = polls(driver)
        if n >= at_least:
            return n
        if time.monotonic() > deadline:
            raise TimeoutError(f"the dashboard rendered {n} times, not {at_least}, within {timeout:.0f}s")
        time.sleep(0.2)


def save_page(driver, path: str, width: int = WIDTH) -> str:
    """The whole page (not just the window) as a PNG at ``path``; returns the path."""
    for _ in range(3):  # the window's outer size includes what is not page; grow until the page fits
        page, inner = driver.execute_script(
            "return [document.documentElement.scrollHeight, window.innerHeight]")
        if inner >= page:
            break
        outer = driver.get_window_size()["height"]
        driver.set_window_size(width, outer + page - inner)
        time.sleep(0.3)  # one layout at the new size
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not driver.save_screenshot(path):
        raise RuntimeError(f"chromium could not save the screenshot to {path}")
    return path


def screenshot(url: str, path: str, width: int = WIDTH, renders: int = 2, timeout: float = 60.0) -> str:
    """Opens the dashboard at ``url``, waits for ``renders`` renders of live data, saves a PNG at ``path``."""
    driver = headless_chromium(width)
    try:
        driver.get(url.rstrip("/") + "/")
        wait_for_polls(driver, renders, timeout)
        return save_page(driver, path, width)
    finally:
        driver.quit()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.dashboard_screenshot", description=__doc__.split("\n\n")[0])
    ap.add_argument("url", nargs="?", default="http://127.0.0.1:8080", help="the service's address")
    ap.add_argument("path", nargs="?", default="docs/dashboard.png", help="where to write the PNG")
    ap.add_argument("--width", type=int, default=WIDTH, help="the page's width in pixels")
    ap.add_argument("--renders", type=int, default=2, help="renders of live data to wait for first")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for them")
    args = ap.parse_args(argv)
    try:
        saved = screenshot(args.url, args.path, args.width, args.renders, args.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"dashboard screenshot: {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
