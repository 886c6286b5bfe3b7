"""The HTTP API (`cirlab.serve.app`) on a tiny trained checkpoint and its index."""

import io
import re
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cirlab.checkpoint import load_checkpoint
from cirlab.index.build import build_index, list_images, model_identity
from cirlab.index.faiss_index import FaissIndex
from cirlab.index.search import search_index
from cirlab.serve.app import MAX_GALLERY_PAGE, PAGE_POLICY, STATIC, create_app, thumbnail_png

REFERENCE, TARGET, TEXT = "css_test_000001.png", "css_test_000002.png", "remove object"
MAX_UPLOAD, MAX_K, MAX_PIXELS = 64 * 1024, 200, 512 * 512


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*")}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tiny_index):
    """(client, checkpoint, index folder, gallery, listings before any request)."""
    checkpoint, index, gallery = tiny_index
    app = create_app(index, checkpoint, max_upload_bytes=MAX_UPLOAD, max_k=MAX_K, max_pixels=MAX_PIXELS)
    before = {"gallery": _listing(gallery), "index": _listing(index)}
    with TestClient(app) as client:
        yield client, checkpoint, index, gallery, before


@pytest.fixture(scope="module")
def client(served) -> TestClient:
    return served[0]


def _search(client: TestClient, k: int, **reference) -> list[dict]:
    files = {"image": ("ref.png", reference.pop("upload"), "image/png")} if "upload" in reference else None
    response = client.post("/api/search", data={"text": TEXT, "k": str(k), **reference}, files=files)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_health_counts_the_indexed_images(served):
    client, checkpoint, _, gallery, _ = served
    assert client.get("/health").json() == {"status": "ok", "images": len(list_images(gallery)),
                                            "model_id": model_identity(checkpoint)}


def test_search_by_id_equals_search_index(served):
    client, checkpoint, index_folder, _, _ = served
    response = client.post("/api/search", data={"text": TEXT, "k": "5", "image_id": REFERENCE})
    assert response.json()["reference"] == REFERENCE
    results = response.json()["results"]
    scores = [hit["score"] for hit in results]
    assert len(results) == 5 and REFERENCE not in [hit["id"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    assert all(hit["url"] == f"/api/images/{hit['id']}" for hit in results)
    model = load_checkpoint(checkpoint).model
    with FaissIndex.open(index_folder) as index:
        direct = search_index(index, model, REFERENCE, TEXT, k=5)
    assert [(hit["id"], hit["score"]) for hit in results] == direct


def test_upload_of_a_gallery_image_ranks_like_its_id_but_keeps_itself(served):
    # The server cannot tell that an upload is a gallery image, so the reference is not left out:
    # asking for the whole gallery, it must appear, and without it the ranking is the by-id one.
    client, _, _, gallery, _ = served
    everything = len(list_images(gallery))
    by_id = _search(client, everything, image_id=REFERENCE)
    by_upload = _search(client, everything, upload=(gallery / REFERENCE).read_bytes())
    upload_ids = [hit["id"] for hit in by_upload]
    assert len(by_id) == everything - 1 and len(by_upload) == everything and REFERENCE in upload_ids
    assert [name for name in upload_ids if name != REFERENCE] == [hit["id"] for hit in by_id]
    assert _search(client, 5, upload=(gallery / REFERENCE).read_bytes()) == by_upload[:5]


def test_images_are_served_as_stored_and_as_thumbnails(served):
    client, _, _, gallery, _ = served
    response = client.get(f"/api/images/{REFERENCE}")
    assert response.status_code == 200 and response.content == (gallery / REFERENCE).read_bytes()
    assert response.headers["content-type"] == "image/png"
    thumb = client.get(f"/api/images/{REFERENCE}", params={"thumb": "1"})
    assert thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == Image.open(gallery / REFERENCE).size  # 64 px: kept


def test_gallery_faults_are_json_errors(served, tmp_path):
    # A gallery of its own: one file is corrupted after indexing, another is a link out of the folder.
    _, checkpoint, _, gallery, _ = served
    (tmp_path / "gallery").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "gallery" / name).write_bytes((gallery / REFERENCE).read_bytes())
    (tmp_path / "outside.png").write_bytes((gallery / REFERENCE).read_bytes())
    (tmp_path / "gallery" / "link.png").symlink_to(tmp_path / "outside.png")
    build_index(checkpoint, tmp_path / "gallery", tmp_path / "index", progress=False).close()
    (tmp_path / "gallery" / "b.png").write_bytes(b"\x89PNG broken")
    with TestClient(create_app(tmp_path / "index", checkpoint)) as faulty:
        assert faulty.get("/health").json()["images"] == 3
        assert faulty.get("/api/images/a.png").status_code == 200
        link = faulty.get("/api/images/link.png")
        assert link.status_code == 404 and "missing from the gallery" in link.json()["detail"]
        broken = faulty.get("/api/images/b.png", params={"thumb": "1"})
        assert broken.status_code == 500 and broken.json()["detail"].startswith("gallery image unreadable: b.png")
        assert str(tmp_path) not in broken.json()["detail"]


def test_gallery_pages_through_the_ids_in_indexing_order(served):
    client, _, _, gallery, _ = served
    ids = list_images(gallery)  # the index was built from this sorted list
    first = client.get("/api/gallery").json()
    assert first == {"total": len(ids), "offset": 0,
                     "images": [{"id": name, "url": f"/api/images/{name}"} for name in ids[:24]]}
    pages = [client.get("/api/gallery", params={"offset": offset, "limit": 7}).json()["images"]
             for offset in range(0, len(ids), 7)]
    assert [image["id"] for page in pages for image in page] == ids and len(pages[-1]) == (len(ids) - 1) % 7 + 1
    assert client.get("/api/gallery", params={"offset": len(ids) + 5}).json() == {
        "total": len(ids), "offset": len(ids) + 5, "images": []}


def test_page_and_its_assets_come_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == PAGE_POLICY
    assert re.findall(r'(?:src|href)="([^"]*)"', page.text) == ["/static/style.css", "/static/app.js"]
    for asset, media_type in (("style.css", "text/css"), ("app.js", "text/javascript")):
        response = client.get(f"/static/{asset}")
        assert response.headers["content-type"].split(";")[0] == media_type
        assert response.content == (STATIC / asset).read_bytes()
    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}


def test_openapi_documents_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/api/search", "/api/images/{image_id}", "/api/explain", "/api/gallery"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_thumbnail_shrinks_to_256_keeping_the_aspect(tmp_path):
    Image.new("RGB", (600, 300), "red").save(tmp_path / "wide.png")
    assert Image.open(io.BytesIO(thumbnail_png(tmp_path / "wide.png"))).size == (256, 128)


def test_explain_is_a_deterministic_png_at_least_256_wide(served):
    client, _, _, gallery, _ = served
    form = {"text": TEXT, "image_id": REFERENCE, "target_id": TARGET}
    first, second = (client.post("/api/explain", data=form) for _ in range(2))
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(first.content)).size == (256, 256)  # a 64 px image enlarged 4 times
    assert first.content == second.content
    uploaded = client.post("/api/explain", data={"text": TEXT, "target_id": TARGET, "method": "gradcam",
                                                 "side": "target"},
                           files={"image": ("ref.png", (gallery / REFERENCE).read_bytes(), "image/png")})
    assert uploaded.status_code == 200 and Image.open(io.BytesIO(uploaded.content)).size == (256, 256)
    assert uploaded.content != first.content


def _bad_requests(gallery: Path, png: bytes) -> dict[str, tuple]:
    """name -> (method, url, form, upload bytes or None, status, fragment of the detail)."""
    bomb = _png_bytes(Image.new("L", (1024, 1024)))  # a few kB that would decode to 1 M pixels
    by_id = {"text": TEXT, "image_id": REFERENCE}
    explain = {"text": TEXT, "image_id": REFERENCE, "target_id": TARGET}
    return {
        "upload over the cap": ("post", "/api/search", {"text": TEXT}, b"x" * (MAX_UPLOAD + 1), 413,
                                "image upload is larger"),
        "body far over the cap": ("post", "/api/search", {"text": TEXT}, b"x" * (3 * MAX_UPLOAD), 413, "request body"),
        "decompression bomb": ("post", "/api/search", {"text": TEXT}, bomb, 413, "1024 x 1024 pixels"),
        "not an image": ("post", "/api/search", {"text": TEXT}, b"hello, world", 400, "not a readable"),
        "truncated image": ("post", "/api/search", {"text": TEXT}, png[: len(png) // 2], 400, "not a readable"),
        "empty upload": ("post", "/api/search", {"text": TEXT}, b"", 400, "empty"),
        "blank text": ("post", "/api/search", {**by_id, "text": "  "}, None, 422, "text is empty"),
        "missing text": ("post", "/api/search", {"image_id": REFERENCE}, None, 422, "text: Field required"),
        "overlong text": ("post", "/api/search", {**by_id, "text": "a" * 301}, None, 422, "text: String should"),
        "k zero": ("post", "/api/search", {**by_id, "k": "0"}, None, 422, "k: Input should be greater"),
        "k over max": ("post", "/api/search", {**by_id, "k": str(MAX_K + 1)}, None, 422, "k: Input should be less"),
        "k not a number": ("post", "/api/search", {**by_id, "k": "ten"}, None, 422, "k: Input should be a valid"),
        "unknown id": ("post", "/api/search", {**by_id, "image_id": "nope.png"}, None, 404, "not in the index"),
        "id with ..": ("post", "/api/search", {**by_id, "image_id": "../images/x.png"}, None, 400, "without '..'"),
        "both references": ("post", "/api/search", by_id, png, 400, "exactly one reference"),
        "no reference": ("post", "/api/search", {"text": TEXT}, None, 400, "exactly one reference"),
        "image path ..": ("get", f"/api/images/%2e%2e/{REFERENCE}", None, None, 400, "without '..'"),
        "image path absolute": ("get", f"/api/images/{gallery / REFERENCE}", None, None, 400, "relative"),
        "image not indexed": ("get", "/api/images/nope.png", None, None, 404, "not in the index"),
        "thumb not a flag": ("get", f"/api/images/{REFERENCE}?thumb=big", None, None, 422, "thumb: Input"),
        "explain method": ("post", "/api/explain", {**explain, "method": "lime"}, None, 422, "method: Input"),
        "explain side": ("post", "/api/explain", {**explain, "side": "both"}, None, 422, "side: Input"),
        "explain target": ("post", "/api/explain", {**explain, "target_id": "nope.png"}, None, 404, "nope.png"),
        "explain bad upload": ("post", "/api/explain", {"text": TEXT, "target_id": TARGET}, b"GIF89a", 400,
                               "not a readable"),
        "gallery offset negative": ("get", "/api/gallery?offset=-1", None, None, 422,
                                    "offset: Input should be greater than or equal to 0"),
        "gallery limit zero": ("get", "/api/gallery?limit=0", None, None, 422,
                               "limit: Input should be greater than or equal to 1"),
        "gallery limit over cap": ("get", f"/api/gallery?limit={MAX_GALLERY_PAGE + 1}", None, None, 422,
                                   f"limit: Input should be less than or equal to {MAX_GALLERY_PAGE}"),
        "gallery offset not a number": ("get", "/api/gallery?offset=1.5", None, None, 422,
                                        "offset: Input should be a valid integer"),
    }


@pytest.mark.parametrize("case", sorted(_bad_requests(Path("/gallery"), b"")))
def test_bad_input_is_a_4xx_naming_the_problem(served, case):
    client, _, _, gallery, _ = served
    method, url, form, upload, status, fragment = _bad_requests(gallery, (gallery / REFERENCE).read_bytes())[case]
    files = {"image": ("ref.png", upload, "image/png")} if upload is not None else None
    response = client.get(url) if method == "get" else client.post(url, data=form, files=files)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def test_malformed_multipart_is_a_400(client):
    response = client.post("/api/search", content=b"--nope\r\ngarbage",
                           headers={"content-type": "multipart/form-data; boundary=other"})
    assert response.status_code == 400 and "multipart" in response.json()["detail"]


def test_a_streamed_body_is_cut_off_at_the_cap(client):
    # No Content-Length: the cap is enforced on the bytes as they arrive.
    chunks = (b"x" * 4096 for _ in range(3 * MAX_UPLOAD // 4096))
    response = client.post("/api/search", content=chunks,
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and "request body is larger" in response.json()["detail"]


def test_concurrent_searches_agree(client):
    answers: list[object] = [None] * 8

    def ask(slot: int) -> None:
        response = client.post("/api/search", data={"text": TEXT, "k": "10", "image_id": REFERENCE})
        answers[slot] = (response.status_code, response.json())

    threads = [threading.Thread(target=ask, args=(slot,)) for slot in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers[0][0] == 200 and len(answers[0][1]["results"]) == 10
    # Gathered into batches of different sizes, the encoder's floats may differ in the last digits.
    first = answers[0][1]["results"]
    for status, body in answers:
        assert status == 200 and [hit["id"] for hit in body["results"]] == [hit["id"] for hit in first]
        assert [hit["score"] for hit in body["results"]] == pytest.approx([hit["score"] for hit in first], abs=1e-5)


def test_requests_wrote_nothing(served):
    # Runs last in this module: every request above has been made by now.
    _, _, index_folder, gallery, before = served
    assert _listing(gallery) == before["gallery"]
    assert _listing(index_folder) == before["index"]
