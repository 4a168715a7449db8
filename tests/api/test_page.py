"""The web page in a real browser: Debian's chromium, driven by playwright, against the real server.

Screenshots go to /tmp/captioner-page-*.png for a person to look at.
"""

import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from api.app import create_app

from .helpers import free_port, picture

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]


@pytest.fixture
def live_server(make_settings):
    """The app under uvicorn in a thread, on a free loopback port."""

    def start(**overrides):
        port = free_port()
        config = uvicorn.Config(
            create_app(make_settings(**overrides)), host="127.0.0.1", port=port, log_level="warning"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail("the server did not become ready")
        servers.append((server, thread))
        return base

    servers = []
    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def shapes_png(tmp_path) -> Path:
    path = tmp_path / "shapes.png"
    picture((224, 224)).save(path)
    return path


def canvas_pixels(page) -> list[int]:
    return page.evaluate("""() => {
        const c = document.getElementById('view');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 97 === 0));
    }""")


def test_caption_a_picture_and_see_where_each_word_looked(live_server, browser, shapes_png):
    from playwright.sync_api import expect  # waits that need no eval: the page's CSP forbids it

    base = live_server()
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    card = page.locator("#model-card .lead")
    card.wait_for()
    assert "trained on tests" in card.inner_text()

    page.check("input[name=method][value=beam]")
    page.fill("input[name=beam_size]", "4")
    page.fill("input[name=num_captions]", "3")
    page.fill("input[name=max_length]", "8")
    page.set_input_files("#file", str(shapes_png))
    page.locator("#captions li").nth(2).wait_for(timeout=30_000)
    items = page.locator("#captions li")
    assert items.count() == 3
    for i in range(3):
        text = items.nth(i).inner_text()
        assert "log p = -" in text
        assert 1 <= items.nth(i).locator(".word").count() <= 8
    assert "3 captions by beam" in page.inner_text("#status")

    page.locator("#view").wait_for(state="visible")  # the picture has loaded
    plain = canvas_pixels(page)
    word = items.nth(0).locator(".word").nth(0)
    word.hover()
    assert word.evaluate("el => el.classList.contains('active')")
    hovered = canvas_pixels(page)
    assert hovered != plain, "hovering a word drew no heatmap"
    assert "where the model looked" in page.inner_text("#view-label")
    page.screenshot(path="/tmp/captioner-page-beam.png", full_page=True)

    word.click()  # pinned: the heatmap stays when the mouse leaves
    page.mouse.move(5, 5)
    assert canvas_pixels(page) == hovered
    assert word.evaluate("el => el.classList.contains('pinned')")

    page.check("input[name=method][value=sample]")
    assert page.is_visible("input[name=temperature]") and not page.is_visible("input[name=beam_size]")
    page.fill("input[name=temperature]", "0.7")
    page.fill("input[name=top_k]", "5")
    page.fill("input[name=num_captions]", "2")
    page.click("#run")
    expect(page.locator("#status")).to_contain_text("by sample")
    assert page.locator("#captions li").count() == 2
    page.screenshot(path="/tmp/captioner-page-sample.png", full_page=True)
    assert errors == []


def test_the_page_explains_errors_and_asks_for_the_key(live_server, browser, tmp_path):
    from playwright.sync_api import expect

    base = live_server(api_key="let-me-in")
    page = browser.new_page()
    page.goto(base + "/")
    expect(page.locator("#model-card")).to_contain_text("API key")
    page.fill("#api-key", "let-me-in")
    page.press("#api-key", "Enter")
    page.locator("#model-card .lead").wait_for()

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a picture")
    page.set_input_files("#file", str(text_file))
    expect(page.locator("#status")).to_have_class(re.compile(r"\berror\b"))
    assert "notes.txt: not an image" in page.inner_text("#status")
    page.screenshot(path="/tmp/captioner-page-error.png", full_page=True)
