"""HTTP API over one checkpoint and the index built with it: composed search, gallery images, heat-maps,
and the web page that drives them (static/, served at `/`).

Searches go to one worker thread, which opened the index and alone touches it (its SQLite connection may
only be used, and closed, by the thread that opened it). Concurrent /api/search requests are gathered for up
to `batch_wait_ms` (at most `max_batch` of them) and answered by one `search_many` call: one encoder pass per
image size and one index search for the batch (`cirlab.serve.batching`). Each upload is decoded on its own
before it joins a batch, and a batch that fails is retried query by query, so a bad request fails alone.
Explanations, which backpropagate and take far longer, run on a second worker thread of their own, so they
never hold searches up; they share the model (see `_Engine`) but never touch the index.

Requests never write files: uploads are decoded in memory and responses are built in memory.
No `from __future__ import annotations` here: FastAPI must evaluate the endpoints' annotations, which
name types local to `create_app` (their limits are arguments of it).
"""

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, TypeVar
from urllib.parse import quote

import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cirlab.checkpoint import load_checkpoint
from cirlab.data.errors import DataFormatError
from cirlab.explain.overlay import explain_pair, heatmap_overlay
from cirlab.files import png_bytes
from cirlab.images import ImageDecodeError, decode_image, fit_image, load_image
from cirlab.index.base import Index
from cirlab.index.build import model_identity, open_index
from cirlab.index.search import DEFAULT_SHORTLIST, Hits, SearchQuery, search_many
from cirlab.models.base import CIRModel
from cirlab.serve.batching import BATCH_WAIT_MS, MAX_BATCH, MicroBatcher

# Formats Pillow decodes itself; others (EPS, for one) would hand the upload to external programs.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
THUMB_PX = 256
GALLERY_PAGE, MAX_GALLERY_PAGE = 24, 200  # ids per page of `GET /api/gallery`: default and cap
STATIC = Path(__file__).parent / "static"  # the web page, shipped as package data
# The page loads nothing from elsewhere; uploads are previewed from blob: URLs.
PAGE_POLICY = "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
MIN_OVERLAY_PX = 256
_FORM_OVERHEAD = 64 * 1024  # text fields and multipart headers sent along with the image
_REFERENCE_RULE = "give exactly one reference: an `image` upload or an `image_id` of the gallery"

T = TypeVar("T")


class ImageRef(BaseModel):
    id: str
    url: str


class Hit(ImageRef):
    score: float


class GalleryPage(BaseModel):
    total: int  # indexed images in all
    offset: int
    images: list[ImageRef]


class SearchResponse(BaseModel):
    results: list[Hit]
    reference: str | None  # the gallery id searched from; null for an uploaded image


class Health(BaseModel):
    status: str
    images: int
    model_id: str


@dataclass(frozen=True)
class SearchSettings:
    """How the server searches: micro-batching (`cirlab.serve.batching`), the two-stage shortlist
    (`cirlab.index.search`), and the backend's own settings (`open_index`)."""

    batch_wait_ms: float = BATCH_WAIT_MS
    max_batch: int = MAX_BATCH
    shortlist: int = DEFAULT_SHORTLIST
    consistency: str | None = None   # a Milvus index's search level
    faiss_params: str | None = None  # an approximate FAISS index's search settings, e.g. "nprobe=16"


def _open(index_folder: Path, checkpoint_folder: Path, settings: SearchSettings) -> tuple[CIRModel, Index]:
    model = load_checkpoint(checkpoint_folder).model.eval()
    with torch.no_grad():
        # A Hugging Face fast tokenizer (MiniLM) sets its padding and truncation on its first call; made here,
        # that call cannot race between the search and the explanation threads.
        model.text_encoder(["warm up"])
    index = open_index(index_folder, model_id=model_identity(checkpoint_folder), consistency=settings.consistency,
                       faiss_params=settings.faiss_params)
    if index.gallery_root is None:
        index.close()
        raise ValueError(f"{index_folder}: index records no gallery folder, so there are no images to serve")
    return model, index


class _Engine:
    """The model and the index: searches, batched, on the thread that opened the index; explanations on
    a thread of their own (see the module docstring).

    Sharing the model between the two threads is safe while it stays in eval mode: forward passes do not
    write module state (BatchNorm in eval mode reads its running statistics; no module caches anything);
    `search_many` and `explain_pair` set eval mode and restore it, which rewrites the same `training=False`
    flags; grad mode (`no_grad`, `enable_grad`) is per thread; Grad-CAM takes `torch.autograd.grad` with
    respect to a feature map, so no parameter's `.grad` is written; and MMGrad's rewinding of torch's random
    generator cannot change a search, since eval-mode passes draw no random numbers."""

    def __init__(self, index_folder: Path, checkpoint_folder: Path, settings: SearchSettings) -> None:
        if settings.shortlist < 1:
            raise ValueError(f"shortlist must be at least 1, not {settings.shortlist}")
        self._shortlist = settings.shortlist
        self._searcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cirlab-search")
        self._explainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cirlab-explain")
        try:
            self._batcher = MicroBatcher(self._search_many, self._searcher, settings.batch_wait_ms,
                                         settings.max_batch)
            self.model, self.index = self._searcher.submit(_open, index_folder, checkpoint_folder,
                                                           settings).result()
        except BaseException:
            self._searcher.shutdown()
            self._explainer.shutdown()
            raise
        self.gallery = self.index.gallery_root.resolve()
        self.ids = self.index.ids()  # fixed while serving: the index is opened once and never written

    def _search_many(self, queries: list[SearchQuery]) -> list[Hits]:
        # A method, not a partial: the batcher is made before the index is opened.
        return search_many(self.index, self.model, queries, self._shortlist)

    async def search(self, query: SearchQuery) -> Hits:
        return await self._batcher.submit(query)

    async def explain(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._explainer, function)

    async def close(self) -> None:
        await self._batcher.close()
        await asyncio.get_running_loop().run_in_executor(self._searcher, self.index.close)
        self._searcher.shutdown()
        self._explainer.shutdown()

    def gallery_path(self, image_id: str) -> Path:
        """The file of an indexed image; anything else is refused before the file system is asked."""
        if image_id.startswith("/") or ".." in PurePosixPath(image_id).parts or "\0" in image_id:
            raise HTTPException(400, f"image id {image_id!r} must be a path relative to the gallery, "
                                     "without '..'")
        if image_id not in self.index:
            raise HTTPException(404, f"image id {image_id!r} is not in the index")
        path = (self.gallery / image_id).resolve()
        # An indexed id can still be a symlink leading out of the gallery; it is not served.
        if not path.is_relative_to(self.gallery) or not path.is_file():
            raise HTTPException(404, f"image {image_id!r} is missing from the gallery folder")
        return path


class _BodyLimit:
    """Ends a request whose body is over `limit` bytes with a 413, as soon as its Content-Length or
    the bytes received so far show it, so an oversized upload is never buffered whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if not declared.isdigit() or int(declared) <= self.limit:
                message = await receive()
                received += len(message.get("body", b""))
                if received <= self.limit:
                    return message
            # Raised inside the body read, so FastAPI passes it on to its JSON error handler.
            raise HTTPException(413, f"request body is larger than the limit of {self.limit} bytes")

        await self.app(scope, limited_receive, send)


def _image_url(image_id: str) -> str:
    return f"/api/images/{quote(image_id)}"


def _clean_text(text: str) -> str:
    if not text.strip():
        raise HTTPException(422, "text: the modification text is empty")
    return text


async def _upload_bytes(image: UploadFile | None, image_id: str | None, limit: int) -> bytes | None:
    """The uploaded reference's bytes (None for a gallery reference), after the one-reference rule."""
    if (image is None) == (image_id is None):
        raise HTTPException(400, _REFERENCE_RULE)
    if image is None:
        return None
    data = await image.read(limit + 1)  # one byte past the limit tells "too large" without reading on
    if len(data) > limit:
        raise HTTPException(413, f"image upload is larger than the limit of {limit} bytes")
    if not data:
        raise HTTPException(400, "image upload is empty")
    return data


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image in memory (`cirlab.images.decode_image`): 413 over the pixel limit, else 400."""
    try:
        return decode_image(data, max_pixels, UPLOAD_FORMATS)
    except ImageDecodeError as error:
        raise HTTPException(413 if error.too_large else 400, str(error)) from None


def thumbnail_png(path: Path, size: int = THUMB_PX) -> bytes:
    image = load_image(path)
    image.thumbnail((size, size))  # keeps the aspect ratio and never enlarges
    return png_bytes(image)


async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    # One readable sentence per problem, named by field, instead of pydantic's nested records.
    problems = ["{}: {}".format(".".join(map(str, problem["loc"][1:])) or problem["loc"][0], problem["msg"])
                for problem in error.errors()]
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


def create_app(index_folder: Path, checkpoint_folder: Path, max_upload_bytes: int = 5 * 2**20,
               max_text_chars: int = 300, max_k: int = 100, max_pixels: int = 2048 * 2048,
               search: SearchSettings = SearchSettings()) -> FastAPI:
    """The API for one index and the checkpoint that built it, both loaded once, here, searched as `search`
    says (concurrent searches gathered for up to its `batch_wait_ms`, 0: each alone)."""
    engine = _Engine(Path(index_folder), Path(checkpoint_folder), search)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.close()

    app = FastAPI(title="cirlab", summary="Composed image retrieval: a reference image modified by a text.",
                  lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=max_upload_bytes + _FORM_OVERHEAD)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.exception_handler(DataFormatError)
    async def _unreadable_gallery_file(_: Request, error: DataFormatError) -> JSONResponse:
        # Uploads never raise this (they are decoded by `decode_upload`); a gallery file is at fault.
        detail = str(error).replace(f"{engine.gallery}/", "")
        return JSONResponse({"detail": f"gallery image unreadable: {detail}"}, status_code=500)

    Text = Annotated[str, Form(min_length=1, max_length=max_text_chars, description="the modification")]
    Upload = Annotated[UploadFile | None, File(description="reference image (or give image_id)")]
    ImageId = Annotated[str | None, Form(description="reference gallery id (or upload an image)")]

    @app.get("/health")
    async def health() -> Health:
        return Health(status="ok", images=len(engine.index), model_id=engine.index.model_id)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/gallery")
    async def gallery(offset: Annotated[int, Query(ge=0)] = 0,
                      limit: Annotated[int, Query(ge=1, le=MAX_GALLERY_PAGE)] = GALLERY_PAGE) -> GalleryPage:
        """A page of the indexed images, in indexing order, to pick a reference from."""
        names = engine.ids[offset:offset + limit]
        return GalleryPage(total=len(engine.ids), offset=offset, images=[ImageRef(id=name, url=_image_url(name))
                                                                         for name in names])

    @app.post("/api/search")
    async def search(text: Text, k: Annotated[int, Form(ge=1, le=max_k)] = 10, image: Upload = None,
                     image_id: ImageId = None) -> SearchResponse:
        """The k gallery images best matching the reference modified by the text (a gallery
        reference is left out of its own results; an uploaded one cannot be recognised, so it is not)."""
        text = _clean_text(text)
        data = await _upload_bytes(image, image_id, max_upload_bytes)
        if image_id is not None:
            engine.gallery_path(image_id)  # a bad or unknown id is refused before the model is queued
            reference: Image.Image | str = image_id
        else:  # decoded on its own, off the event loop, so that a bad upload never joins a batch
            reference = await run_in_threadpool(decode_upload, data, max_pixels)
        results = await engine.search(SearchQuery(reference, text, k))
        hits = [Hit(id=name, score=score, url=_image_url(name)) for name, score in results]
        return SearchResponse(results=hits, reference=image_id)

    @app.get("/api/images/{image_id:path}", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}})
    async def gallery_image(image_id: str, thumb: bool = False) -> Response:
        """A gallery image by its index id, as stored, or as a PNG thumbnail of at most 256 px."""
        path = engine.gallery_path(image_id)
        if not thumb:
            return FileResponse(path)
        return Response(await run_in_threadpool(thumbnail_png, path), media_type="image/png")

    @app.post("/api/explain", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(text: Text, target_id: Annotated[str, Form(description="the retrieved gallery image")],
                      image: Upload = None, image_id: ImageId = None,
                      method: Annotated[Literal["mmgrad", "gradcam"], Form()] = "mmgrad",
                      side: Annotated[Literal["reference", "target"], Form()] = "reference") -> Response:
        """Heat-map of where the model looked, over the reference or the target, as a PNG."""
        text = _clean_text(text)
        data = await _upload_bytes(image, image_id, max_upload_bytes)
        reference_path = engine.gallery_path(image_id) if image_id is not None else None
        target_path = engine.gallery_path(target_id)

        def overlay() -> bytes:
            reference = decode_upload(data, max_pixels) if reference_path is None else load_image(reference_path)
            target = load_image(target_path)
            try:
                saliency = explain_pair(engine.model, reference, text, target, method=method, side=side)
            except ValueError as error:  # a model these explanations do not cover (CMAP's multi-level features)
                raise HTTPException(422, str(error)) from None
            explained = fit_image(reference if side == "reference" else target, engine.model.preprocessing)
            scale = max(1, math.ceil(MIN_OVERLAY_PX / explained.width))
            return png_bytes(heatmap_overlay(explained, saliency, scale=scale))

        return Response(await engine.explain(overlay), media_type="image/png")

    return app
