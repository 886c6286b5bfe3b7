"""Micro-batched serving (`cirlab.serve.batching`, wired into `cirlab.serve.app`) over a real loopback server:
concurrent searches are answered by fewer `search_many` calls with exactly the one-at-a-time results, a bad
request fails alone, and explanations never hold searches up."""

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image
from test_serve import MAX_PIXELS, MAX_UPLOAD, REFERENCE, TARGET, TEXT, _png_bytes
from test_serve_process import _free_port

import cirlab.serve.app as serve_app
from cirlab.checkpoint import load_checkpoint
from cirlab.cli import main
from cirlab.index.build import build_index, list_images
from cirlab.index.faiss_index import FaissIndex
from cirlab.index.search import Hits, search_index
from cirlab.serve.app import SearchSettings, create_app, decode_upload
from cirlab.serve.batching import MicroBatcher

WAIT_MS = 200  # long enough that requests sent together surely meet in one batch
CLIENTS = 12
# Twelve distinct modification texts in the CSS vocabulary.
TEXTS = [f"make {place} object {colour}" for place in ("top-left", "middle-center", "bottom-right")
         for colour in ("red", "blue", "green", "gray")]

Direct = Callable[[object, str, int], Hits]


@contextmanager
def _serving(app: FastAPI) -> Iterator[str]:
    """`app` behind a real uvicorn server on a free loopback port, in a thread of this process."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def batch_sizes() -> Iterator[list[int]]:
    """The number of queries of each `search_many` call the servers of this module make, in order."""
    sizes: list[int] = []
    real = serve_app.search_many

    def counted(index, model, queries, *settings):
        sizes.append(len(queries))
        return real(index, model, queries, *settings)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_app, "search_many", counted)
        yield sizes


def _app(index: Path, checkpoint: Path, wait_ms: float) -> FastAPI:
    return create_app(index, checkpoint, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS,
                      search=SearchSettings(batch_wait_ms=wait_ms))


@pytest.fixture(scope="module")
def batched(tiny_index, batch_sizes, one_torch_thread) -> Iterator[str]:
    with _serving(_app(tiny_index.index, tiny_index.checkpoint, WAIT_MS)) as url:
        yield url


@pytest.fixture(scope="module")
def unbatched(tiny_index, batch_sizes, one_torch_thread) -> Iterator[str]:
    with _serving(_app(tiny_index.index, tiny_index.checkpoint, 0)) as url:
        yield url


@contextmanager
def _direct(index_folder: Path, checkpoint: Path) -> Iterator[Direct]:
    """`search_index`, one query at a time, on this thread's own model and index."""
    model = load_checkpoint(checkpoint).model
    with FaissIndex.open(index_folder) as index:
        yield lambda reference, text, k: search_index(index, model, reference, text, k)


@pytest.fixture(scope="module")
def direct(tiny_index) -> Iterator[Direct]:
    with _direct(tiny_index.index, tiny_index.checkpoint) as search:
        yield search


def _queries(gallery: Path, count: int) -> list[dict]:
    """Distinct queries: by gallery id and by upload in turn, each with its own reference, text and k."""
    names = list_images(gallery)
    queries = []
    for number in range(count):
        name = names[(7 * number + 3) % len(names)]
        reference = {"upload": (gallery / name).read_bytes()} if number % 2 else {"image_id": name}
        queries.append({"text": TEXTS[number % len(TEXTS)], "k": 3 + number, **reference})
    return queries


def _post(url: str, query: dict) -> httpx.Response:
    form = {key: str(value) for key, value in query.items() if key != "upload"}
    files = {"image": ("ref.png", query["upload"], "image/png")} if "upload" in query else None
    return httpx.post(f"{url}/api/search", data=form, files=files, timeout=60)


def _concurrently(url: str, queries: list[dict]) -> list[httpx.Response]:
    """Each query from a client thread of its own, all released at once."""
    barrier = threading.Barrier(len(queries))

    def ask(query: dict) -> httpx.Response:
        barrier.wait()
        return _post(url, query)

    with ThreadPoolExecutor(max_workers=len(queries)) as clients:
        return list(clients.map(ask, queries))


def _expected(direct: Direct, query: dict) -> Hits:
    reference = decode_upload(query["upload"], MAX_PIXELS) if "upload" in query else query["image_id"]
    return direct(reference, query["text"], query["k"])


def _assert_hits(response: httpx.Response, expected: Hits) -> None:
    assert response.status_code == 200, response.text
    hits = response.json()["results"]
    assert [hit["id"] for hit in hits] == [name for name, _ in expected]
    assert [hit["score"] for hit in hits] == pytest.approx([score for _, score in expected], abs=1e-5)


def test_concurrent_distinct_searches_are_batched_and_match_one_at_a_time(batched, batch_sizes, direct, tiny_index):
    queries = _queries(tiny_index.gallery, CLIENTS)
    batch_sizes.clear()
    responses = _concurrently(batched, queries)
    sizes = list(batch_sizes)
    for response, query in zip(responses, queries, strict=True):
        _assert_hits(response, _expected(direct, query))
    assert sum(sizes) == CLIENTS  # nothing failed, so nothing was retried
    assert len(sizes) < CLIENTS / 2, sizes


def test_a_bad_upload_fails_alone_in_its_batch(batched, batch_sizes, direct, tiny_index):
    png = (tiny_index.gallery / REFERENCE).read_bytes()
    good = _queries(tiny_index.gallery, 6)
    bad = [{"text": TEXT, "upload": b"hello, world"}, {"text": TEXT, "upload": png[: len(png) // 2]}]
    batch_sizes.clear()
    responses = _concurrently(batched, good + bad)
    sizes = list(batch_sizes)
    for response, query in zip(responses, good, strict=False):
        _assert_hits(response, _expected(direct, query))
    for response in responses[len(good):]:
        assert response.status_code == 400 and "not a readable" in response.json()["detail"]
    assert sum(sizes) == len(good) and max(sizes) > 1, sizes  # the bad uploads never reached the model


def test_an_unreadable_gallery_file_fails_its_request_alone(tiny_index, batch_sizes, one_torch_thread, tmp_path):
    # A gallery of its own, indexed, then one file corrupted: only a search from that file can fail, and only
    # inside the batch (its id is indexed), so the batch is retried query by query.
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name, source in zip("abcd", list_images(tiny_index.gallery)[:4], strict=True):
        (gallery / f"{name}.png").write_bytes((tiny_index.gallery / source).read_bytes())
    build_index(tiny_index.checkpoint, gallery, tmp_path / "index", progress=False).close()
    (gallery / "c.png").write_bytes(b"\x89PNG broken")
    queries = [{"text": TEXTS[0], "k": 3, "image_id": "a.png"}, {"text": TEXTS[1], "k": 3, "image_id": "c.png"},
               {"text": TEXTS[2], "k": 2, "upload": (gallery / "b.png").read_bytes()},
               {"text": TEXTS[3], "k": 2, "image_id": "d.png"}]
    batch_sizes.clear()
    with _serving(_app(tmp_path / "index", tiny_index.checkpoint, WAIT_MS)) as url:
        responses = _concurrently(url, queries)
    sizes = list(batch_sizes)
    broken = responses[1]
    assert broken.status_code == 500 and broken.json()["detail"].startswith("gallery image unreadable: c.png")
    with _direct(tmp_path / "index", tiny_index.checkpoint) as direct:
        for response, query in zip(responses, queries, strict=True):
            if query is not queries[1]:
                _assert_hits(response, _expected(direct, query))
    assert max(sizes) > 1 and sum(sizes) > len(queries), sizes  # batched, then retried one by one


def test_without_batching_each_search_runs_alone_and_right(unbatched, batch_sizes, direct, tiny_index):
    queries = _queries(tiny_index.gallery, 6)
    batch_sizes.clear()
    responses = _concurrently(unbatched, queries)
    sizes = list(batch_sizes)
    for response, query in zip(responses, queries, strict=True):
        _assert_hits(response, _expected(direct, query))
    assert sizes == [1] * len(queries)


def test_an_explanation_does_not_hold_searches_up(unbatched, monkeypatch):
    started, finished = threading.Event(), threading.Event()
    real = serve_app.explain_pair

    def slow_explain(*args, **kwargs):
        started.set()
        time.sleep(1.0)
        try:
            return real(*args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(serve_app, "explain_pair", slow_explain)
    with ThreadPoolExecutor(max_workers=1) as explainer:
        explanation = explainer.submit(httpx.post, f"{unbatched}/api/explain", timeout=60,
                                       data={"text": TEXT, "image_id": REFERENCE, "target_id": TARGET})
        assert started.wait(30)
        search = _post(unbatched, {"text": TEXT, "k": 5, "image_id": REFERENCE})
        assert search.status_code == 200 and len(search.json()["results"]) == 5
        assert not finished.is_set()  # the search was answered while the explanation still ran
        response = explanation.result()
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def test_a_consistency_level_for_a_faiss_index_is_refused_at_startup(tiny_index, capsys):
    refusal = "a consistency level is a setting of Milvus indexes"
    with pytest.raises(ValueError, match=refusal):
        create_app(tiny_index.index, tiny_index.checkpoint, search=SearchSettings(consistency="Bounded"))
    assert main(["serve", str(tiny_index.index), "--milvus-consistency", "Bounded"]) == 2
    assert refusal in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "message"), [({"batch_wait_ms": -1}, "batch wait"),
                                                  ({"max_batch": 0}, "batch size limit")])
def test_batch_settings_are_checked(tiny_index, setting, message):
    with pytest.raises(ValueError, match=message):
        create_app(tiny_index.index, tiny_index.checkpoint, search=SearchSettings(**setting))


def _run_batcher(items: list[int], wait_ms: float, max_batch: int) -> tuple[list[object], list[list[int]]]:
    """Each item submitted at once to a batcher whose batch function refuses negative items:
    (each item's result or exception, the batches the function was called with)."""
    calls: list[list[int]] = []

    def double(batch: list[int]) -> list[int]:
        calls.append(list(batch))
        if any(item < 0 for item in batch):
            raise ValueError(f"negative item in {batch}")
        return [2 * item for item in batch]

    async def submit_all() -> list[object]:
        with ThreadPoolExecutor(max_workers=1) as worker:
            batcher = MicroBatcher(double, worker, wait_ms, max_batch)
            outcomes = await asyncio.gather(*(batcher.submit(item) for item in items), return_exceptions=True)
            await batcher.close()
        return outcomes

    return asyncio.run(submit_all()), calls


def test_a_failing_batch_is_retried_item_by_item():
    outcomes, calls = _run_batcher([1, -2, 3], wait_ms=50, max_batch=8)
    assert outcomes[0] == 2 and outcomes[2] == 6
    assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "negative item in [-2]"
    assert calls == [[1, -2, 3], [1], [-2], [3]]


def test_batches_stop_at_max_batch_and_zero_wait_runs_each_alone():
    assert _run_batcher([1, 2, 3, 4, 5], wait_ms=50, max_batch=2) == ([2, 4, 6, 8, 10], [[1, 2], [3, 4], [5]])
    assert _run_batcher([1, 2, 3], wait_ms=0, max_batch=8) == ([2, 4, 6], [[1], [2], [3]])


def test_an_oversized_upload_image_is_refused_before_batching(batched, batch_sizes):
    bomb = _png_bytes(Image.new("L", (1024, 1024)))  # decodes to more pixels than MAX_PIXELS
    batch_sizes.clear()
    response = _post(batched, {"text": TEXT, "upload": bomb})
    assert response.status_code == 413 and "1024 x 1024 pixels" in response.json()["detail"]
    assert batch_sizes == []


def test_a_lone_client_never_waits_and_company_is_waited_for_after_a_shared_batch():
    async def timings() -> list[float]:
        with ThreadPoolExecutor(max_workers=1) as worker:
            batcher = MicroBatcher(lambda batch: [2 * item for item in batch], worker, wait_ms=300, max_batch=8)
            spent = []
            for group in ([0], [1], [2], [3, 4], [5], [6]):  # one at a time, then two together
                started = time.perf_counter()
                await asyncio.gather(*(batcher.submit(item) for item in group))
                spent.append(time.perf_counter() - started)
            await batcher.close()
        return spent

    first, alone, alone_again, together, after_company, alone_once_more = asyncio.run(timings())
    assert first >= 0.29  # before any batch has run, company is expected
    assert max(alone, alone_again, together, alone_once_more) < 0.15  # nobody waited for the 300 ms
    assert after_company >= 0.29  # the batch before held two: the next request waited for others to join
