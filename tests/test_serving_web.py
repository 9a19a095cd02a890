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


def test_labels_classify_the_image_instead(browser_page, base_url, tmp_path):
    from PIL import Image

    page = browser_page
    page.set_default_timeout(60_000)
    page.goto(base_url + "/")
    page.fill("#labels", "normal, pneumonia")
    page.click("#ask")
    assert "Choose an image" in page.inner_text("#status")  # nothing to classify yet
    png = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (90, 90, 90)).save(png)
    page.set_input_files("#file", str(png))
    page.wait_for_function("document.getElementById('previewNote').textContent.startsWith('40x40')")
    page.fill("#question", "Which class?")
    page.click("#ask")
    page.wait_for_function("document.getElementById('status').textContent === 'done'")
    assert page.inner_text("#answer") in ("normal", "pneumonia")
    shown = page.inner_text("#confidence")
    assert shown.startswith("normal ") and "pneumonia " in shown and "calibrated" in shown


def test_page_asks_for_the_api_key_once(browser_page, tmp_path):
    from PIL import Image

    from medmoe.model.pretrained import build_model
    from medmoe.serving.server import Limits, create_app, serve_in_thread

    model, processor = build_model("tiny")
    asked = []
    page = browser_page
    page.set_default_timeout(60_000)
    page.on("dialog", lambda dialog: asked.append(dialog.message) or dialog.accept("s3cret"))
    with serve_in_thread(create_app(model, processor, Limits(max_tokens=8), api_key="s3cret")) as base:
        page.goto(base + "/")
        png = tmp_path / "x.png"
        Image.new("RGB", (64, 48), (30, 120, 200)).save(png)
        page.set_input_files("#file", str(png))  # the preview gets 401, the page asks, then retries
        page.wait_for_function("document.getElementById('previewNote').textContent.startsWith('64x48')")
        page.fill("#question", "What is it?")
        page.click("#ask")
        page.wait_for_function("document.getElementById('status').textContent === 'done'")
        assert len(asked) == 1 and "API key" in asked[0]
        assert page.evaluate("sessionStorage.getItem('medmoe-api-key')") == "s3cret"


# The page's postJson run by Node against a fake fetch (no browser needed): the key is asked once,
# kept in sessionStorage and sent from then on.
KEY_CHECK_JS = r"""
// Runs the page's postJson against a fake fetch: the key is asked once, kept, and sent.
const fs = require("fs");
const html = fs.readFileSync(process.argv[2], "utf8");
const script = html.slice(html.indexOf("<script>") + 8, html.indexOf("</script>"));
const store = {};
global.sessionStorage = { getItem: (k) => (k in store ? store[k] : null), setItem: (k, v) => { store[k] = String(v); }, removeItem: (k) => { delete store[k]; } };
let prompts = 0;
global.window = { prompt: (m) => { prompts++; console.log("prompt:", m); return "s3cret"; } };
const calls = [];
global.fetch = async (path, opts) => {
  calls.push(opts.headers["Authorization"] || null);
  const ok = opts.headers["Authorization"] === "Bearer s3cret";
  return { ok, status: ok ? 200 : 401, statusText: ok ? "OK" : "Unauthorized", json: async () => (ok ? {} : { error: { message: "invalid API key" } }) };
};
const elements = {};
global.document = { getElementById: (id) => (elements[id] ||= { addEventListener() {}, style: {}, value: "", files: [], textContent: "" }) };
eval(script + "\n;globalThis.postJson = postJson;");
(async () => {
  await postJson("/v1/preview", {});
  await postJson("/v1/chat/completions", {});
  console.log("prompts", prompts, "calls", JSON.stringify(calls), "stored", store["medmoe-api-key"]);
  if (prompts !== 1 || calls.length !== 3 || calls[0] !== null || calls[2] !== "Bearer s3cret") process.exit(1);
})();
"""


def test_page_key_logic_in_node(tmp_path):
    import subprocess

    from medmoe.serving.server import WEB_PAGE

    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    script = tmp_path / "check.js"
    script.write_text(KEY_CHECK_JS)
    run = subprocess.run([node, str(script), str(WEB_PAGE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "prompts 1" in run.stdout and "stored s3cret" in run.stdout
