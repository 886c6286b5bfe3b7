"""Index a folder of images with a checkpoint's target encoder (searching it is `cirlab.index.search`).

Building is resumable and incremental: image ids already committed are skipped, so rerunning after
a crash, or after new images were added to the folder, embeds only what is missing. Work is
committed every `commit_every` images, which bounds what a crash can lose. Under torchrun every
process embeds its share of each chunk and rank 0 alone writes the index, committing chunk by chunk
exactly as one process does.

Storage: each image's `model.index_vectors`, for the backend's inner-product search (the unit target
vector of a cosine model). A model whose score no pair of vectors gives exactly (CMAP) also has its full
target features kept beside them (`cirlab.index.features`), for the exact stage of a two-stage search.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cirlab.checkpoint import CONFIG_FILE, MODEL_FILE, CheckpointError, load_checkpoint
from cirlab.devices import to_device
from cirlab.distributed import DistContext
from cirlab.images import image_tensor, load_image
from cirlab.index.base import Index, IndexFormatError, IndexMismatchError, IndexStoreError
from cirlab.index.store import DB_FILE, connect, read_meta
from cirlab.models.base import CIRModel

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Index classes by the backend name an index records; imported on first use (Milvus needs pymilvus).
BACKENDS = {"faiss": "cirlab.index.faiss_index:FaissIndex", "milvus": "cirlab.index.milvus_index:MilvusIndex"}
_SETTING_NAMES = {"factory": "index type", "gallery_root": "gallery", "uri": "Milvus URI"}  # for messages
_HASH_BLOCK = 1 << 20


def model_identity(checkpoint_folder: Path) -> str:
    """First 16 hex digits of sha256(model.safetensors bytes + config.json bytes)."""
    digest = hashlib.sha256()
    for name in (MODEL_FILE, CONFIG_FILE):
        path = Path(checkpoint_folder) / name
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                    digest.update(block)
        except FileNotFoundError:
            raise CheckpointError(f"{checkpoint_folder}: not a cirlab checkpoint (missing {name})") from None
    return digest.hexdigest()[:16]


def list_images(image_dir: Path) -> list[str]:
    """Every image file (IMAGE_SUFFIXES) below `image_dir`, as sorted POSIX paths relative to it (the image ids)."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                  if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def embed_batch(model: CIRModel, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """What the index stores for equal-size images: their `index_vectors`, and for a model that needs an
    exact stage (`vectors_score_exactly` False) their target features, flattened (None otherwise)."""
    with torch.no_grad():
        features = model.encode_targets(pixels).float()
        vectors = model.index_vectors(features).float().cpu().numpy()
    if model.vectors_score_exactly:
        return vectors, None
    return vectors, features.reshape(len(features), -1).cpu().numpy()


def _embed_files(model: CIRModel, paths: Sequence[Path], batch_size: int, device: torch.device,
                 bar: tqdm) -> tuple[np.ndarray, np.ndarray]:
    """The images' vectors and target features (`embed_batch`), in order; features are N x 0 where none
    are kept."""
    if not paths:  # a rank left without work by a chunk smaller than the number of processes
        return np.empty((0, 0), dtype=np.float32), np.empty((0, 0), dtype=np.float32)
    embedded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for start in range(0, len(paths), batch_size):
        tensors = [image_tensor(load_image(path), model.preprocessing) for path in paths[start:start + batch_size]]
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for offset, tensor in enumerate(tensors):
            by_size[tuple(tensor.shape)].append(start + offset)
        # Only equal sizes stack into one batch; nothing is resized, so each image is seen as given.
        for members in by_size.values():
            batch = to_device(torch.stack([tensors[member - start] for member in members]), device)
            vectors, features = embed_batch(model, batch)
            if features is None:
                features = np.empty((len(members), 0), dtype=np.float32)
            embedded.update(zip(members, zip(vectors, features, strict=True), strict=True))
        bar.update(len(tensors))
    rows = [embedded[position] for position in range(len(paths))]
    return np.stack([vector for vector, _ in rows]), np.stack([features for _, features in rows])


def _backend_class(backend: str) -> type[Index]:
    if backend not in BACKENDS:
        raise IndexFormatError(f"unknown index backend {backend!r} (known: {', '.join(BACKENDS)})")
    module, _, name = BACKENDS[backend].partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as error:
        raise IndexStoreError(f"the {backend} backend needs the {error.name} package: "
                              f"pip install 'cirlab[{backend}]'") from None


def recorded_backend(folder: Path) -> str | None:
    """The backend named in `folder`'s committed index metadata; None where no index was committed."""
    path = Path(folder) / DB_FILE
    if not path.is_file():
        return None
    connection = connect(path)
    try:
        return read_meta(connection).get("backend")
    finally:
        connection.close()


def open_index(folder: Path, model_id: str | None = None, consistency: str | None = None,
               faiss_params: str | None = None) -> Index:
    """Open the index in `folder` with the backend that built it; with `model_id`, refuse another model's.
    `consistency` is the Milvus search level (`milvus_index.CONSISTENCY_LEVELS`, default Strong); a FAISS
    index, read from its committed files, has no such choice and refuses one. `faiss_params` are a FAISS
    index's search settings ("nprobe=16", `FaissIndex.set_search_parameters`), refused for Milvus."""
    backend = recorded_backend(folder)
    if backend is None:
        raise IndexFormatError(f"{folder}: no cirlab index here (missing or incomplete {DB_FILE})")
    if consistency is not None and backend != "milvus":
        raise ValueError(f"{folder}: a consistency level is a setting of Milvus indexes; this {backend} index "
                         "always searches its last committed state")
    if faiss_params is not None and backend != "faiss":
        raise ValueError(f"{folder}: FAISS search parameters do not apply to this {backend} index")
    options = {} if consistency is None else {"consistency": consistency}
    index = _backend_class(backend).open(Path(folder), model_id=model_id, **options)
    if faiss_params is not None:
        try:
            index.set_search_parameters(faiss_params)
        except BaseException:
            index.close()
            raise
    return index


def _index_settings(backend: str | None, factory: str | None, milvus_uri: str | None,
                    collection: str | None) -> dict[str, str]:
    """The settings given, keyed as in `Index.info()` and the backends' `create`; None means not given."""
    backend = backend or ("milvus" if milvus_uri or collection else "faiss" if factory else None)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "milvus" and (factory or not milvus_uri):
        raise ValueError("the milvus backend needs a server URI and takes no FAISS factory (it is exact, FLAT)")
    if backend == "faiss" and (milvus_uri or collection):
        raise ValueError("a Milvus URI and collection are settings of the milvus backend, not of faiss")
    given = {"backend": backend, "factory": factory, "uri": milvus_uri, "collection": collection}
    return {key: value for key, value in given.items() if value is not None}


def _open_existing(out_folder: Path, model_id: str, wanted: dict[str, str]) -> Index | None:
    if recorded_backend(out_folder) is None:
        return None
    index = open_index(out_folder, model_id=model_id)
    stored = index.info()
    differing = [key for key in wanted if stored.get(key) != wanted[key]]
    if differing:
        index.close()
        raise IndexMismatchError(f"{out_folder}: index has " + ", ".join(
            f"{_SETTING_NAMES.get(key, key)} {stored.get(key)}" for key in differing) + "; asked for " + ", ".join(
            f"{_SETTING_NAMES.get(key, key)} {wanted[key]}" for key in differing))
    return index


def build_index(checkpoint_folder: Path, image_dir: Path, out_folder: Path, batch_size: int = 64,
                factory: str | None = None, commit_every: int = 512, progress: bool = True,
                device: str | torch.device = "cpu", ctx: DistContext | None = None, backend: str | None = None,
                milvus_uri: str | None = None, collection: str | None = None) -> Index | None:
    """Create or extend the index in `out_folder` with every image of `image_dir` it lacks.

    A new index is a FAISS one (`factory`, default Flat) unless `backend` is "milvus" (`milvus_uri`, and
    `collection`, default named after the folder). Settings given for an existing index must be the ones
    it was built with; settings left out are its own.

    Under torchrun, with `ctx` from `cirlab.distributed.process_group`, the ranks share the embedding
    and rank 0 writes; rank 0 returns the index, the other ranks None.
    """
    if batch_size < 1 or commit_every < 1:
        raise ValueError(f"batch_size ({batch_size}) and commit_every ({commit_every}) must be positive")
    ctx = ctx or DistContext()
    settings = _index_settings(backend, factory, milvus_uri, collection)
    image_dir = Path(image_dir).resolve()
    model_id = model_identity(checkpoint_folder)
    index: Index | None = None
    missing: list[str] = []
    if ctx.is_main:  # the only process that opens the index; the others just embed what it hands out
        names = list_images(image_dir)
        if not names:
            raise ValueError(f"{image_dir}: no .png, .jpg or .jpeg images")
        index = _open_existing(Path(out_folder), model_id, settings | {"gallery_root": str(image_dir)})
        missing = [name for name in names if index is None or name not in index]
    try:
        missing = ctx.broadcast_strings(missing)
        if missing:
            device = torch.device(device)
            model = load_checkpoint(Path(checkpoint_folder)).model.to(device).eval()
            with tqdm(total=len(missing), desc="indexing images", unit="img",
                      disable=not (progress and ctx.is_main)) as bar:
                for start in range(0, len(missing), commit_every):
                    chunk = missing[start:start + commit_every]
                    share = ctx.share(len(chunk))
                    own = [image_dir / name for name in chunk[share.start:share.stop]]
                    vectors, features = map(ctx.gather_rows, _embed_files(model, own, batch_size, device, bar))
                    bar.update(len(chunk) - len(own))  # the other ranks' images
                    if not ctx.is_main:
                        continue
                    if index is None:  # created only now, when the dimensions are known
                        options = {key: value for key, value in settings.items() if key != "backend"}
                        index = _backend_class(settings.get("backend", "faiss")).create(
                            out_folder, vectors.shape[1], model_id, gallery_root=image_dir,
                            checkpoint=Path(checkpoint_folder), feature_dim=features.shape[1], **options)
                    index.add(chunk, vectors, features if features.shape[1] else None)
                    index.commit()
    except BaseException:
        if index is not None:
            index.close()  # discards only the uncommitted chunk
        raise
    return index


def recorded_checkpoint(index_folder: Path) -> Path:
    """The checkpoint an index was built with, as `build_index` recorded it."""
    with open_index(Path(index_folder)) as index:
        if index.checkpoint is None:
            raise ValueError(f"{index_folder}: the index records no checkpoint; pass --checkpoint")
        return index.checkpoint
