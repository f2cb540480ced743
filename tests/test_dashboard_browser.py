"""GET /dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Skipped, with the reason, when the browser, the driver or selenium is missing (.ci/run installs them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
# bench/out is not tracked; AFRAMP_DOCS_SCREENSHOT=1 refreshes the screenshot in docs/ instead
SCREENSHOT = ROOT / ("docs" if os.environ.get("AFRAMP_DOCS_SCREENSHOT") else "bench/out") / "dashboard.png"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1440,1000",
)


def _browser_or_skip() -> Any:
    try:
        from selenium import webdriver  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            pytest.skip(f"{what} not found at {path} (apt-get install -y chromium chromium-driver)")


def _drive(url: str, expect: dict[str, str], deadline_s: float, screenshot: Path) -> dict[str, Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        selector = "g[data-type='exchange_rate']" + "".join(f"[data-{k}='{v}']" for k, v in expect.items())
        # one synchronous read of the page (the charts are redrawn on every refresh)
        read = """
            const row = document.querySelector(arguments[0]);
            const ratio = document.getElementById('kpi-ratio');
            return {
              row_text: row ? row.textContent : null,
              status: document.getElementById('status').dataset.status,
              updates: Number(document.body.dataset.updates || 0),
              ratio: ratio.textContent, ratio_hits: ratio.dataset.hits,
              tiers: Object.fromEntries([...document.querySelectorAll('#latency g[data-tier]')]
                       .map(g => [g.dataset.tier, g.dataset.count])),
              checks: [...document.querySelectorAll('.chip')].map(c => c.textContent),
              errors: document.getElementById('fetch-error').textContent,
              external: [...document.querySelectorAll('script[src],link[href],img[src]')].map(e => e.outerHTML),
            };"""
        deadline = time.monotonic() + deadline_s
        while True:  # poll the page until the charts show this instance's numbers
            out = driver.execute_script(read, selector)
            if out["row_text"] is not None and out["status"] == "ok" and out["tiers"]:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"dashboard never showed {selector}: {out}")
            time.sleep(0.05)  # the poll interval of a synchronous browser driver, bounded by the deadline
        first = out["updates"]
        while out["updates"] < first + 2 and time.monotonic() < deadline:  # two more points on the time series
            time.sleep(0.05)
            out = driver.execute_script(read, selector)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        return out
    finally:
        driver.quit()


async def test_dashboard_in_a_real_browser_shows_this_instances_numbers(make_client: Any) -> None:
    _browser_or_skip()
    a = await make_client()
    b = await make_client()
    assert (await b.get("/v1/rates/USD/CNGN")).headers["X-Cache"] == "MISS"
    for expected in ("L2", "L1", "L1"):
        assert (await a.get("/v1/rates/USD/CNGN")).headers["X-Cache"] == expected
    assert (await a.get("/v1/rates/CNGN/USD")).headers["X-Cache"] == "MISS"
    assert (await a.get("/v1/fees/onramp")).headers["X-Cache"] == "MISS"
    assert (await a.get("/v1/fees/onramp")).headers["X-Cache"] == "L1"

    page = await a.get("/dashboard")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html

    url = str(a.make_url("/dashboard?interval=400"))
    out = await asyncio.to_thread(_drive, url, {"l1-hits": "2", "l2-hits": "1", "misses": "1"}, 20.0, SCREENSHOT)
    assert out["errors"] == ""
    assert out["external"] == []
    assert "exchange rate" in out["row_text"] and "75.0 %" in out["row_text"]  # 3 hits of 4 lookups
    assert out["ratio_hits"] == "4" and out["ratio"] == "66.7 %"  # with the fee: 4 hits of 6 lookups
    # L2 lookups: one Redis round trip per L1 miss (the L2 hit and the two misses)
    assert out["tiers"]["l2"] == "3" and out["tiers"]["origin"] == "2"
    assert any(c.startswith("invalidation") and "subscribed" in c for c in out["checks"])
    assert SCREENSHOT.stat().st_size > 10_000
