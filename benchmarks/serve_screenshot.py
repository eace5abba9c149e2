"""Screenshot of `mmlm serve`'s page on the demo models (docs/images/serve-page.png), driven by Playwright.

Needs `make demo` (runs/demo/vlm, runs/demo/model, runs/demo/index) and Debian's chromium.

    .venv/bin/python benchmarks/serve_screenshot.py
"""

import shutil
import sys
from pathlib import Path

from bench_serve import free_port, start_server
from playwright.sync_api import sync_playwright

OUT = Path("docs/images/serve-page.png")


def main() -> None:
    """Serve the demo VLM, CLIP and index; classify, ask and search on the page; save the screenshot."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs chromium (apt-get install chromium)")
    port = free_port()
    server = start_server(
        "runs/demo/vlm", port, ["--embed-model", "runs/demo/model", "--index", "runs/demo/index"]
    )
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 1100, "height": 780})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#file", "runs/demo/vlm_example.png")
            page.fill("#labels", "the word cake, a red circle, a bar chart, a blue square")
            page.click("#classify")
            page.wait_for_selector("#bars .bar-row")
            page.fill("#question", "What word is written?")
            page.click("#ask")
            page.wait_for_function("document.querySelector('#answer').textContent.trim().length > 0")
            page.wait_for_timeout(500)
            page.fill("#search-text", "the word cake written in orange")
            page.click("#search")
            page.wait_for_selector("#results .result")
            OUT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(OUT), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
