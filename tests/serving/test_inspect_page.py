"""The /inspect page in headless Chromium (Debian's ``chromium`` driven by Playwright, no browser download):
it loads, asks the server for a text, draws the retrieval view, shows what a clicked token retrieved, and a
screenshot is written. Skips, saying why, where Chromium or Playwright is missing (.ci/run installs
Chromium on Debian)."""
from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from longmem.serving.config import ServeConfig  # noqa: E402
from longmem.serving.server import create_app  # noqa: E402

from conftest import live_server, make_tiny_run  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_thread")]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (Debian: apt-get install -y chromium; .ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_the_page_renders_the_retrieval_view_of_a_text(browser, tmp_path):
    run = make_tiny_run(tmp_path / "KNN", kind="knn", mem_len=16)
    text = "The passkey is 4711. Grass is green, the sky is blue. Grass is green. The passkey is"
    with live_server(create_app(run, ServeConfig(sessions_dir=str(tmp_path / "sessions"), api_key="k3y"))) as url:
        context = browser.new_context(http_credentials={"username": "me", "password": "k3y"},   # basic auth
                                      viewport={"width": 1150, "height": 1300})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url.removesuffix("/v1") + "/inspect")
        assert page.title() == "longmem · memory inspector"
        page.fill("#text", text)
        page.click("#run")
        page.wait_for_selector("#retrieval-map circle", timeout=30_000)
        assert page.inner_text("#status") == f"{len(text)} tokens in {-(-len(text) // 8)} segments (memory: knn)"
        assert page.locator("#tokens .tok").count() == len(text)
        assert page.locator("#retrieval-map circle").count() > len(text)            # per token, head, entry
        assert page.locator("#distance-map rect").count() > 0
        page.click('.tok[data-i="60"]')                                               # what this token retrieved
        rows = page.locator("#retrieved-table tr")
        assert rows.count() == 3                                                      # a header and 2 heads
        assert "token 60" in page.inner_text("#details")
        assert page.locator("#tokens .tok.retrieved").count() > 0
        assert "no memory tokens" in page.inner_text("#memtokens")
        shot = tmp_path / "inspect.png"
        page.screenshot(path=str(shot), full_page=True)
        context.close()
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors == []
