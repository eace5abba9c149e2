"""The `mmlm serve` web page in a real browser: upload, zero-shot bars, streamed chat, search, errors, API key.

Playwright drives Debian's `chromium` (apt-get install chromium; `make install` does it as root) through
`executable_path`; no browser is downloaded.
"""

import base64
import json
import queue
import shutil
import threading
import time

import pytest
import uvicorn
from PIL import Image, ImageDraw

import mmlm
from fixtures_vlm import write_tiny_llava
from mmlm.index import ImageIndex, build_index
from mmlm.serve.app import create_app
from mmlm.serve.config import ServeConfig
from mmlm.serve.engine import Engine
from system_programs import needs_program

sync_api = pytest.importorskip("playwright.sync_api")  # the [dev] extra; CI fails where it is missing

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = needs_program("chromium", "chromium", "chromium-browser")

API_KEY = "test-key-123"
LABELS = ["a red circle", "a blue square", "a green bar"]

# ---- the real app on tiny random models, served by uvicorn in a thread -----------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Three shape images and a manifest captioning them, for the page's upload and the search index."""
    folder = tmp_path_factory.mktemp("shapes")
    rows = []
    for name, colour, draw in [
        ("red-circle", "red", "ellipse"),
        ("blue-square", "blue", "rectangle"),
        ("green-bar", "green", "rectangle"),
    ]:
        image = Image.new("RGB", (64, 64), "white")
        box = (12, 12, 52, 52) if name != "green-bar" else (8, 24, 56, 40)
        getattr(ImageDraw.Draw(image), draw)(box, fill=colour)
        image.save(folder / f"{name}.png")
        rows.append(json.dumps({"image": f"{name}.png", "text": f"a {name.replace('-', ' ')}"}))
    (folder / "shapes.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def engine_parts(model_dir, shapes, tmp_path_factory):
    """A tiny LLaVA (chat), the tiny CLIP of conftest (classify, search) and the folder of a shapes index."""
    vlm_dir = tmp_path_factory.mktemp("llava")
    write_tiny_llava(vlm_dir)
    embedder = mmlm.load(model_dir)
    build_index(embedder, model_dir, shapes / "shapes.jsonl", shapes / "index")
    return mmlm.load(vlm_dir), embedder, shapes / "index"


def serve(engine_parts, api_key):
    """Start `create_app` on 127.0.0.1 in a thread; return its base URL and a function that stops it."""
    vlm, embedder, index_dir = engine_parts
    config = ServeConfig(model_id="tiny-llava", embed_model_id="tiny-clip", api_key=api_key)
    started: queue.Queue = queue.Queue()

    def run():
        # The index's SQLite connection may only be used by the thread that opened it: the event loop's.
        with ImageIndex.open(index_dir) as index:
            app = create_app(Engine(vlm=vlm, embedder=embedder, index=index), config)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
            started.put(server)
            server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    server = started.get(timeout=10)
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def image_path(shapes):
    return shapes / "red-circle.png"


@pytest.fixture
def open_server(engine_parts):
    url, stop = serve(engine_parts, api_key=None)
    yield url
    stop()


@pytest.fixture
def keyed_server(engine_parts):
    url, stop = serve(engine_parts, api_key=API_KEY)
    yield url
    stop()


def record_answer_states(page):
    """Keep every distinct text #answer shows while it streams, in window.answerStates."""
    page.evaluate(
        """() => {
            window.answerStates = [];
            const answer = document.getElementById("answer");
            new MutationObserver(() => {
                const text = answer.textContent;
                if (text && text !== window.answerStates.at(-1)) window.answerStates.push(text);
            }).observe(answer, {childList: true, characterData: true, subtree: true});
        }"""
    )


def seeded(route):
    """Add a seed to the page's chat request, so the random tiny LLaVA samples the same answer every run."""
    body = json.loads(route.request.post_data)
    route.continue_(post_data=json.dumps({**body, "seed": 0}))


def ask_and_wait(page, question):
    """Ask `question`; return the final answer and the distinct texts the page showed on the way."""
    record_answer_states(page)
    page.route("**/v1/chat/completions", seeded)
    # The tiny model writes its whole answer in milliseconds, so on loopback all its events can land in one
    # read. A slow link (16 kB/s, about 0.3 s for the answer's ~5 kB of events) makes them arrive apart, as
    # a real model's tokens do, so the page must show the answer growing.
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    network.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": 16_000, "uploadThroughput": -1},
    )
    page.fill("#max-tokens", "24")  # the tiny LLaVA's context is 128 positions
    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_function(
        "() => !document.getElementById('answer').classList.contains('streaming') && "
        "document.getElementById('answer').textContent.length > 0"
    )
    network.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    network.detach()
    return page.inner_text("#answer"), page.evaluate("window.answerStates")


def classify_and_read_bars(page, labels):
    """Classify with `labels`; return {label: (probability, fill width / track width)} from the bars."""
    page.fill("#labels", ", ".join(labels))
    page.click("#classify")
    page.wait_for_function(f"document.querySelectorAll('#bars .bar-row').length === {len(labels)}")
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#bars .bar-row')].map(row => [
            row.dataset.label,
            [Number(row.dataset.probability),
             row.querySelector('.bar-fill').getBoundingClientRect().width /
             row.querySelector('.bar-track').getBoundingClientRect().width],
        ]))"""
    )


# ---- tests --------------------------------------------------------------------------------------


def test_page_classifies_streams_searches_and_shows_errors(browser, open_server, image_path, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(open_server)
    page.set_input_files("#file", str(image_path))
    page.wait_for_selector("#preview:not([hidden])")

    bars = classify_and_read_bars(page, LABELS)
    assert sorted(bars) == sorted(LABELS)
    assert sum(p for p, _ in bars.values()) == pytest.approx(1.0, abs=1e-4)
    for probability, width in bars.values():
        assert width == pytest.approx(probability, abs=0.01)

    answer, states = ask_and_wait(page, "What shape is this?")
    assert answer.strip()
    assert len(states) > 1, f"the answer arrived in one piece: {states}"
    assert all(answer.startswith(state) for state in states), "each streamed state extends the last"

    page.fill("#search-text", "a red circle")
    page.click("#search")
    page.wait_for_selector("#results .result")
    scores = [float(s) for s in page.locator("#results .result-score").all_inner_texts()]
    assert scores and scores == sorted(scores, reverse=True)
    assert all(caption.strip() for caption in page.locator("#results .result-caption").all_inner_texts())
    page.wait_for_function(  # each result shows its indexed image's thumbnail, decoded by the browser
        "[...document.querySelectorAll('#results .result')].every(card => {"
        " const img = card.querySelector('img.result-thumbnail');"
        " return img && !img.hidden && img.complete && img.naturalWidth > 0; })"
    )
    assert page.locator("#results img.result-thumbnail").count() == len(scores)

    page.click("#search-image")  # the uploaded image is itself in the index: it must come first
    page.wait_for_function("document.querySelector('#results .result-score').textContent.startsWith('1.00')")
    assert page.locator("#results .result-caption").first.inner_text() == "a red circle"

    assert page.is_hidden("#error")
    screenshot = tmp_path / "serve-page.png"  # docs/images/serve-page.png comes from the demo models instead
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:4] == b"\x89PNG"

    page.fill("#labels", " , ")
    page.click("#classify")
    page.wait_for_selector("#error:not([hidden])")
    error = page.inner_text("#error")
    assert error.startswith("Error 4") and "label" in error.lower()
    assert "{" not in error and "[object" not in error, f"raw body shown: {error}"
    page.close()


def test_page_asks_for_the_api_key_once(browser, keyed_server, image_path):
    context = browser.new_context()  # a fresh sessionStorage
    page = context.new_page()
    page.add_init_script(
        """window.keyFormShown = 0;
        document.addEventListener('DOMContentLoaded', () => {
            const form = document.getElementById('key-form');
            new MutationObserver(() => { if (!form.hidden) window.keyFormShown += 1; })
                .observe(form, {attributes: true, attributeFilter: ['hidden']});
        });"""
    )
    page.goto(keyed_server)
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#api-key", API_KEY)
    page.click("#api-key-save")
    page.wait_for_selector("#key-form", state="hidden")
    assert page.evaluate("sessionStorage.getItem('mmlm-api-key')") == API_KEY

    # this time the image is dropped on #drop, as a user drags a file from their desktop
    png = base64.b64encode(image_path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """png => {
            const bytes = Uint8Array.from(atob(png), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            return transfer;
        }""",
        png,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    page.wait_for_selector("#preview:not([hidden])")
    bars = classify_and_read_bars(page, LABELS[:2])
    assert len(bars) == 2
    answer, _ = ask_and_wait(page, "What shape is this?")
    assert answer.strip()
    page.fill("#search-text", "a blue square")
    page.click("#search")  # the thumbnails are fetched with the key too: an <img src> could not send it
    page.wait_for_function(
        "(() => { const img = document.querySelector('#results img.result-thumbnail');"
        " return img && !img.hidden && img.complete && img.naturalWidth > 0; })()"
    )
    assert page.is_hidden("#error")
    assert page.evaluate("window.keyFormShown") == 1
    context.close()


def test_page_sends_an_audio_clip_as_an_input_audio_part(browser, open_server, tmp_path):
    import numpy as np
    import soundfile

    soundfile.write(tmp_path / "tone.wav", np.zeros(8000, dtype=np.float32), 16000)
    (tmp_path / "notes.txt").write_text("not audio")
    page = browser.new_page()
    page.goto(open_server)
    page.set_input_files("#audio-file", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#error:not([hidden])")
    assert "not a WAV, MP3, FLAC or OGG file" in page.inner_text("#error")
    page.set_input_files("#audio-file", str(tmp_path / "tone.wav"))
    page.wait_for_selector("#audio-name:not([hidden])")
    assert page.is_hidden("#error")
    requests = []
    page.on(
        "request",
        lambda r: requests.append(r.post_data_json) if r.url.endswith("/chat/completions") else None,
    )
    page.fill("#question", "What is said?")
    page.click(
        "#ask"
    )  # the served tiny LLaVA has no audio tower: the server's 400 reaches the page in one line
    page.wait_for_selector("#error:not([hidden])")
    assert "no audio tower" in page.inner_text("#error")
    part = requests[0]["messages"][0]["content"][0]
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    assert base64.b64decode(part["input_audio"]["data"]) == (tmp_path / "tone.wav").read_bytes()
    page.close()
