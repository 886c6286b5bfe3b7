"""The web page in a real browser: Debian's chromium, driven by Playwright, against the app under uvicorn."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import uvicorn
from PIL import Image

from cirlab.index.build import list_images
from cirlab.serve.app import GALLERY_PAGE, create_app

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
VIEWPORT = {"width": 1024, "height": 900}
REFERENCE, TEXT, K = "css_test_000001.png", "remove object", 5


def _unavailable(reason: str) -> None:
    """Without CI a machine lacking the browser skips; under CI that would hide the page's only test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the browser test must run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Python playwright is missing: pip install -c constraints.txt -e '.[test]'")
    if not CHROMIUM.is_file():
        _unavailable(f"no chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def base_url(tiny_index) -> Iterator[str]:
    """The app under uvicorn in a background thread, on a loopback port the OS picked (no race for it)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_index.index, tiny_index.checkpoint), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    listener.close()


def _api_search(base_url: str, text: str, **reference) -> httpx.Response:
    """The same search the page makes, straight to the API: `upload=bytes` or `image_id=...`."""
    upload = reference.pop("upload", None)
    files = {"image": (REFERENCE, upload, "image/png")} if upload is not None else None
    return httpx.post(f"{base_url}/api/search", data={"text": text, "k": str(K), **reference}, files=files)


def _shown(page) -> list[tuple[str, float]]:
    rows = page.locator("#results li").evaluate_all(
        "items => items.map(item => [item.dataset.id, item.querySelector('.score').textContent])")
    return [(name, float(score)) for name, score in rows]


def test_search_heatmaps_and_refinement(browser, base_url, tiny_index, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport=VIEWPORT)
    crashes: list[str] = []
    blocked: list[str] = []  # anything the page's Content-Security-Policy refused to load
    page.on("pageerror", lambda error: crashes.append(str(error)))
    page.on("console", lambda message: blocked.append(message.text) if "Content Security Policy" in message.text
            else None)
    page.goto(base_url)
    gallery_ids = list_images(tiny_index.gallery)
    first_page = gallery_ids[:GALLERY_PAGE]
    expect(page.locator("#gallery li .id")).to_have_text(first_page)
    expect(page.locator("#gallery-range")).to_have_text(f"1–{len(first_page)} of {len(gallery_ids)}")

    # Upload a reference, type the change, search: the grid shows what the API answers.
    upload = tiny_index.gallery / REFERENCE
    page.get_by_label("Upload a reference image").set_input_files(upload)
    expect(page.locator("#reference-caption")).to_have_text(f"Reference: {REFERENCE} (uploaded)")
    page.get_by_label("Change").fill(TEXT)
    page.get_by_label("Number of results").fill(str(K))
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#results li")).to_have_count(K)
    expected = _api_search(base_url, TEXT, upload=upload.read_bytes()).json()["results"]
    shown = _shown(page)
    assert [name for name, _ in shown] == [hit["id"] for hit in expected]
    assert all(abs(score - hit["score"]) <= 5e-4 for (_, score), hit in zip(shown, expected, strict=True))

    # Heat-maps: one loaded overlay per result, the API's 256 x 256 PNG for these 64 px images.
    page.get_by_label("Show heat-maps").check()
    page.wait_for_function("k => [...document.querySelectorAll('#results .overlay')]"
                           ".filter(image => !image.hidden && image.complete && image.naturalWidth > 0).length === k",
                           arg=K)
    sizes = page.locator("#results .overlay").evaluate_all("images => images.map(i => [i.naturalWidth, "
                                                            "i.naturalHeight])")
    assert sizes == [[256, 256]] * K

    # A model that cannot be explained (the server crashes: a plain-text 500) gets a message, no broken image.
    page.route("**/api/explain", lambda route: route.fulfill(status=500, content_type="text/plain",
                                                             body="Internal Server Error"))
    page.get_by_label("computed with").select_option("mmgrad")
    notes = page.locator("#results .note")
    expect(notes).to_have_text(["Heat-map unavailable: 500 Internal Server Error"] * K)
    expect(page.locator("#results .overlay:visible")).to_have_count(0)
    page.unroute("**/api/explain")
    page.get_by_label("Show heat-maps").uncheck()
    expect(page.locator("#results .note:visible")).to_have_count(0)

    # The API's error detail reaches the user.
    page.get_by_label("Change").fill("a" * 301)
    page.get_by_role("button", name="Search").click()
    detail = _api_search(base_url, "a" * 301, upload=upload.read_bytes()).json()["detail"]
    expect(page.get_by_role("alert")).to_have_text(f"Search failed: {detail}")

    # Iterative refinement: a clicked result becomes the reference of the next search.
    chosen = shown[1][0]
    page.get_by_role("button", name=f"Use {chosen} as the next reference").click()
    expect(page.locator("#reference-caption")).to_have_text(f"Reference: {chosen}")
    expect(page.get_by_alt_text(f"Reference image {chosen}")).to_have_attribute("src",
                                                                               f"/api/images/{chosen}?thumb=1")
    expect(page.get_by_label("Change")).to_be_focused()
    page.get_by_label("Change").fill("add red circle")
    page.get_by_role("button", name="Search").click()
    refined = [hit["id"] for hit in _api_search(base_url, "add red circle", image_id=chosen).json()["results"]]
    expect(page.locator("#results li .id")).to_have_text(refined)  # waits for the new grid
    expect(page.get_by_role("alert")).to_be_hidden()
    assert len(refined) == K and chosen not in refined

    screenshot = tmp_path / "page.png"
    page.screenshot(path=screenshot)
    with Image.open(screenshot) as picture:
        assert picture.format == "PNG" and picture.size == (VIEWPORT["width"], VIEWPORT["height"])
    assert crashes == [] and blocked == []


def test_a_rotated_phone_photo_is_searched_through_the_page(browser, base_url, tmp_path):
    """A 1200 x 800 JPEG with EXIF orientation 6 (as phones write), uploaded through the page's control."""
    import numpy as np
    from playwright.sync_api import expect

    pixels = np.random.default_rng(7).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels).resize((1200, 800), Image.Resampling.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    photo.save(path, "JPEG", quality=90, exif=exif)
    page = browser.new_page(viewport=VIEWPORT)
    crashes: list[str] = []
    page.on("pageerror", lambda error: crashes.append(str(error)))
    page.goto(base_url)
    page.get_by_label("Upload a reference image").set_input_files(path)
    expect(page.locator("#reference-caption")).to_have_text("Reference: phone.jpg (uploaded)")
    page.get_by_label("Change").fill(TEXT)
    page.get_by_label("Number of results").fill(str(K))
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#results li")).to_have_count(K)
    files = {"image": ("phone.jpg", path.read_bytes(), "image/jpeg")}
    expected = httpx.post(f"{base_url}/api/search", data={"text": TEXT, "k": str(K)}, files=files).json()["results"]
    assert [name for name, _ in _shown(page)] == [hit["id"] for hit in expected]
    assert not crashes
    page.close()
