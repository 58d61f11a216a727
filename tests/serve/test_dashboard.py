"""The dashboard end to end in headless Chromium: send a message, see both answers and the charts update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve.serving_helpers import make_app, serving

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")

# what the page shows while a reply streams, recorded as it changes: a reply to a tiny model is over in a blink
WATCH_BUSY = """() => {
  window.busySeen = [];
  const note = () => window.busySeen.push([document.body.dataset.busy || "", document.querySelector("#send").innerText,
    document.querySelectorAll(".msg.assistant.streaming").length]);
  new MutationObserver(note).observe(document.body, { attributes: true, subtree: true, childList: true,
    characterData: true });
}"""

PLACEHOLDER_FITS = """() => {
  const box = document.querySelector(".steer .layer"), style = getComputedStyle(box);
  const pen = document.createElement("canvas").getContext("2d");
  pen.font = style.font;
  const room = box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  return [box.placeholder, pen.measureText(box.placeholder).width <= room];
}"""


def test_chat_side_by_side_and_charts(model, artifacts):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    with serving(make_app(model, artifacts)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page()
            sent: list[dict] = []
            page.on(
                "request",
                lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None,
            )
            page.goto(url)
            page.wait_for_function("document.querySelector('#model').textContent.includes('tiny-llama')")
            # no persona space was given: the page says how to add one, with the option's real name
            assert "personaxis serve ... --space RUN_DIR/space.json" in page.inner_text("#space-note")
            page.click("#add-steer")
            slider = page.locator(".steer input[type=range]")
            assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("step")) == (
                "-1",
                "1",
                "0.01",
            )
            assert page.inner_text(".steer .unit") == "× mean norm"  # the unit next to the number
            placeholder, fits = page.evaluate(PLACEHOLDER_FITS)
            assert placeholder == "layer 2" and fits  # the vector's own layer, legible in full
            page.fill("#max-tokens", "12")

            page.fill(".steer .coef", "lots")  # a strength typed as text is refused in the page
            page.fill("#input", "Hello, who are you?")
            page.click("#send")
            assert page.is_visible("#steer-error") and "not a number" in page.inner_text("#steer-error")
            assert page.inner_text("#status") == "not sent: fix the strength"
            page.fill(".steer .coef", "1.5")  # beyond the slider's range: refused too
            assert page.is_visible("#steer-error")
            assert not sent

            page.fill(".steer .coef", "0.1")
            assert not page.is_visible("#steer-error") and slider.input_value() == "0.1"
            page.evaluate(WATCH_BUSY)
            page.fill("#input", "Hello, who are you?")
            page.click("#send")
            for column in ("uncapped", "capped"):
                page.wait_for_selector(f"#col-{column} .msg.assistant .meta", timeout=20_000)
            page.wait_for_function("document.querySelector('#send').textContent === 'Send'")
            assert page.locator(".msg.user").count() == 2
            assert int(page.get_attribute("#tokens", "data-points")) > 0
            assert page.get_attribute("#turns", "data-points") == "2"
            assert "cap default" in page.inner_text("#col-capped .msg.assistant")

            assert len(sent) == 2  # one request per column, each with the strength set in the page
            for body in sent:
                assert body["personaxis"]["steer"] == [{"vector": "axis", "coef": 0.1, "units": "relative"}], body
            busy = page.evaluate("window.busySeen")
            assert ["1", "Generating…", 2] in busy, busy  # both replies shown as generating while they stream
            assert page.locator(".msg.assistant.streaming").count() == 0 and page.inner_text("#status") == ""
        finally:
            browser.close()
