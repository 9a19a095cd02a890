"""The web page end to end in headless Chromium (Debian's `chromium`, driven by Playwright):
upload a DICOM and a PNG, ask, watch the streamed answer and the routing bar.

Skips cleanly when /usr/bin/chromium or the playwright package is missing. CI installs both:
    apt-get install -y chromium && pip install playwright   (never `playwright install`)
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("MEDMOE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Flags that work on machines with no network and as root (see the env notes).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=FLAGS,
                                                       bypass_csp=True)  # lets the test evaluate its checks
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@pytest.fixture
def base_url():
    from medmoe.model.pretrained import build_model
    from medmoe.serving.server import Limits, create_app, serve_in_thread

    model, processor = build_model("tiny")
    model.upcycle()
    with serve_in_thread(create_app(model, processor, Limits(max_tokens=128))) as base:
        yield base


def test_upload_ask_stream_and_routing_bar(browser_page, base_url, tmp_path):
    from PIL import Image
    from test_medical_images import hu_phantom, write_dicom

    page = browser_page
    page.set_default_timeout(60_000)
    page.goto(base_url + "/")
    assert page.title() == "medmoe"

    # DICOM: the server renders the windowed slice as the preview, then the answer streams in.
    dicom = write_dicom(tmp_path / "chest.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024)
    page.select_option("#window", "lung")
    page.set_input_files("#file", dicom)
    page.wait_for_function("document.getElementById('previewNote').textContent.includes('window: lung')")
    assert page.locator("#preview").is_visible()
    page.fill("#question", "Which organ is shown?")
    page.click("#ask")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")
    segments = page.locator("#routing .seg")
    assert segments.count() >= 1
    experts = {segments.nth(i).get_attribute("data-expert") for i in range(segments.count())}
    assert experts <= {"CT", "MRI", "X-Ray", "Pathology"}
    widths = sum(float(segments.nth(i).evaluate("e => parseFloat(e.style.width)")) for i in range(segments.count()))
    assert abs(widths - 100) < 1.0  # the bar is the whole of the image-token routing
    assert "Expert routing" in page.inner_text("#routingNote")
    page.screenshot(path=str(tmp_path / "web.png"), full_page=True)

    # A plain PNG too, and an error is shown, not swallowed.
    png = tmp_path / "x.png"
    Image.new("RGB", (64, 48), (30, 120, 200)).save(png)
    page.select_option("#window", "")
    page.set_input_files("#file", str(png))
    page.wait_for_function("document.getElementById('previewNote').textContent.startsWith('64x48')")
    page.click("#ask")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 50)
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('status').className === 'error'")
    assert "broken.dcm" in page.inner_text("#status")
