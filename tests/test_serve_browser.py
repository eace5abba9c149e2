"""The `mmlm serve` web page in a real browser: upload, zero-shot bars, streamed chat, search, errors, API key.

Playwright drives Debian's `chromium` (apt-get install chromium; `make install` does it as root) through
`executable_path`; no browser is downloaded.
"""

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs the playwright package (pip install -e .[dev])"
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium: apt-get install chromium (make install does it as root)",
)

STATIC = Path(__file__).resolve().parents[1] / "src" / "mmlm" / "serve" / "static"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "serve-page.png"
API_KEY = "test-key-123"
LABELS = ["a red circle", "a blue square", "a green triangle"]

# ---- a stand-in server with the API's shapes (until src/mmlm/serve/app.py lands) ------------------


class FakeAPI(BaseHTTPRequestHandler):
    api_key: str | None = None

    def log_message(self, *args):
        pass

    def _json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status, message, code):
        self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

    def _authorised(self):
        if self.api_key and self.headers.get("Authorization") != f"Bearer {self.api_key}":
            self._error(401, "missing or wrong API key", "invalid_api_key")
            return False
        return True

    def do_GET(self):
        if self.path.startswith("/v1/"):
            if self._authorised() and self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": "tiny-vlm", "object": "model"}]})
            return
        name = "index.html" if self.path == "/" else self.path.lstrip("/")
        file = STATIC / name
        if not file.is_file():
            self._error(404, f"no file {name}", "not_found")
            return
        types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", types.get(file.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/classify":
            if not body.get("labels"):
                self._error(400, "labels: expected a non-empty list of strings", "invalid_labels")
                return
            weights = list(range(len(body["labels"]), 0, -1))
            self._json(200, {"labels": body["labels"], "probabilities": [w / sum(weights) for w in weights]})
        elif self.path == "/v1/search":
            rows = [
                {"path": f"img{i}.png", "caption": f"shape {i}", "score": 0.9 - 0.1 * i} for i in range(4)
            ]
            self._json(200, {"results": rows[: body.get("k", 4)]})
        elif self.path == "/v1/chat/completions":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for token in ["A", " red", " circle", " on", " white", "."]:
                chunk = {
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": token}}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.03)
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            self._error(404, f"no route {self.path}", "not_found")


def serve(api_key):
    """Start a server on 127.0.0.1 in a thread; return its base URL and a function that stops it."""
    handler = type("Handler", (FakeAPI,), {"api_key": api_key})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server.shutdown


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "red-circle.png"
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="red")
    image.save(path)
    return path


@pytest.fixture
def open_server():
    url, stop = serve(api_key=None)
    yield url
    stop()


@pytest.fixture
def keyed_server():
    url, stop = serve(api_key=API_KEY)
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


def ask_and_wait(page, question):
    """Ask `question`; return the final answer and the distinct texts the page showed on the way."""
    record_answer_states(page)
    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_function(
        "() => !document.getElementById('answer').classList.contains('streaming') && "
        "document.getElementById('answer').textContent.length > 0"
    )
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


def test_page_classifies_streams_searches_and_shows_errors(browser, open_server, image_path):
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

    assert page.is_hidden("#error")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

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

    page.set_input_files("#file", str(image_path))
    page.wait_for_selector("#preview:not([hidden])")
    bars = classify_and_read_bars(page, LABELS[:2])
    assert len(bars) == 2
    answer, _ = ask_and_wait(page, "What shape is this?")
    assert answer.strip()
    assert page.is_hidden("#error")
    assert page.evaluate("window.keyFormShown") == 1
    context.close()
