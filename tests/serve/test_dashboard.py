"""The dashboard end to end in headless Chromium: send a message, see both answers and the charts update."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve.serving_helpers import make_app, serving

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


def test_chat_side_by_side_and_charts(model, artifacts):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    with serving(make_app(model, artifacts)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.querySelector('#model').textContent.includes('tiny-llama')")
            page.click("#add-steer")
            page.fill("#max-tokens", "12")
            page.fill("#input", "Hello, who are you?")
            page.click("#send")
            for column in ("uncapped", "capped"):
                page.wait_for_selector(f"#col-{column} .msg.assistant .meta", timeout=20_000)
            assert page.locator(".msg.user").count() == 2
            assert int(page.get_attribute("#tokens", "data-points")) > 0
            assert page.get_attribute("#turns", "data-points") == "2"
            assert "cap default" in page.inner_text("#col-capped .msg.assistant")
        finally:
            browser.close()
