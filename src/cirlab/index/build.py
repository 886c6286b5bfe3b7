"""Index a folder of images with a checkpoint's target encoder, and search the index with a query.

Building is resumable and incremental: image ids already committed are skipped, so rerunning after
a crash, or after new images were added to the folder, embeds only what is missing. Work is
committed every `commit_every` images, which bounds what a crash can lose. Under torchrun every
process embeds its share of each chunk and rank 0 alone writes the index, committing chunk by chunk
exactly as one process does.

Ranking: a model that scores by cosine stores unit vectors and is ranked by the backend's inner-product
search. A model with its own per-pair `score` (CMAP) stores its target features as they are, flattened,
in a FAISS Flat index, and a search scores every stored image with `model.score`, in batches: exact, the
ranking evaluation uses, at brute-force cost.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cirlab.checkpoint import CONFIG_FILE, MODEL_FILE, CheckpointError, load_checkpoint
from cirlab.devices import to_device
from cirlab.distributed import DistContext
from cirlab.images import image_tensor, load_image
from cirlab.index.base import Index, IndexFormatError, IndexMismatchError, IndexStoreError, UnknownImageError
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


def ranks_by_own_score(model: CIRModel) -> bool:
    """Whether `model` overrides `score` (per-pair scores, not a cosine of two vectors): its index is then
    ranked by that score over the stored target features, not by a vector search."""
    return type(model).score is not CIRModel.score


def embed_batch(model: CIRModel, pixels: torch.Tensor) -> np.ndarray:
    """What the index stores for equal-size images: unit-length target vectors, so inner product = the
    model's cosine score, or for a model with its own `score` its target features as they are, flattened."""
    with torch.no_grad():
        features = model.encode_targets(pixels).float()
    if ranks_by_own_score(model):
        return features.reshape(len(features), -1).cpu().numpy()
    if features.dim() != 2:
        raise ValueError(f"encode_targets returned shape {tuple(features.shape)}; a FAISS index needs one "
                         "vector per image")
    return F.normalize(features, dim=-1).cpu().numpy()


def _embed_files(model: CIRModel, paths: Sequence[Path], batch_size: int, device: torch.device,
                 bar: tqdm) -> np.ndarray:
    if not paths:  # a rank left without work by a chunk smaller than the number of processes
        return np.empty((0, 0), dtype=np.float32)
    vectors: dict[int, np.ndarray] = {}
    for start in range(0, len(paths), batch_size):
        tensors = [image_tensor(load_image(path), model.preprocessing) for path in paths[start:start + batch_size]]
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for offset, tensor in enumerate(tensors):
            by_size[tuple(tensor.shape)].append(start + offset)
        # Only equal sizes stack into one batch; nothing is resized, so each image is seen as given.
        for members in by_size.values():
            batch = to_device(torch.stack([tensors[member - start] for member in members]), device)
            vectors.update(zip(members, embed_batch(model, batch), strict=True))
        bar.update(len(tensors))
    return np.stack([vectors[position] for position in range(len(paths))])


def _target_model(checkpoint_folder: Path, device: torch.device, settings: dict[str, str]) -> CIRModel:
    model = load_checkpoint(checkpoint_folder).model.to(device).eval()
    backend, factory = settings.get("backend", "faiss"), settings.get("factory", "Flat")
    if ranks_by_own_score(model) and (backend, factory) != ("faiss", "Flat"):
        asked = f"faiss {factory}" if backend == "faiss" else backend
        raise ValueError(f"{checkpoint_folder}: {type(model).__name__} ranks by its own per-pair `score`, which "
                         "cirlab computes over the exact target features of a FAISS Flat index; use the faiss "
                         f"backend with the Flat factory, not {asked}")
    return model


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


def open_index(folder: Path, model_id: str | None = None, consistency: str | None = None) -> Index:
    """Open the index in `folder` with the backend that built it; with `model_id`, refuse another model's.
    `consistency` is the Milvus search level (`milvus_index.CONSISTENCY_LEVELS`, default Strong); a FAISS
    index, read from its committed files, has no such choice and refuses one."""
    backend = recorded_backend(folder)
    if backend is None:
        raise IndexFormatError(f"{folder}: no cirlab index here (missing or incomplete {DB_FILE})")
    if consistency is None:
        return _backend_class(backend).open(Path(folder), model_id=model_id)
    if backend != "milvus":
        raise ValueError(f"{folder}: a consistency level is a setting of Milvus indexes; this {backend} index "
                         "always searches its last committed state")
    return _backend_class(backend).open(Path(folder), model_id=model_id, consistency=consistency)


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
            model = _target_model(Path(checkpoint_folder), device, settings)
            with tqdm(total=len(missing), desc="indexing images", unit="img",
                      disable=not (progress and ctx.is_main)) as bar:
                for start in range(0, len(missing), commit_every):
                    chunk = missing[start:start + commit_every]
                    share = ctx.share(len(chunk))
                    own = [image_dir / name for name in chunk[share.start:share.stop]]
                    vectors = ctx.gather_rows(_embed_files(model, own, batch_size, device, bar))
                    bar.update(len(chunk) - len(own))  # the other ranks' images
                    if not ctx.is_main:
                        continue
                    if index is None:  # created only now, when the vector dimension is known
                        options = {key: value for key, value in settings.items() if key != "backend"}
                        index = _backend_class(settings.get("backend", "faiss")).create(
                            out_folder, vectors.shape[1], model_id, gallery_root=image_dir,
                            checkpoint=Path(checkpoint_folder), **options)
                    index.add(chunk, vectors)
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


def _gallery_image(index: Index, image_id: str) -> Image.Image:
    if image_id not in index:
        raise UnknownImageError(f"reference {image_id!r} is not an image of the index at {index.folder}")
    if index.gallery_root is None:
        raise ValueError(f"{index.folder}: index records no gallery folder to load {image_id!r} from")
    return load_image(index.gallery_root / image_id)


def exact_scores(model: CIRModel, query: torch.Tensor, features: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """`model.score` of one query state against every row of `features` (stored target features), computed
    in batches of targets so that memory stays bounded on a large gallery."""
    with torch.no_grad():
        return torch.cat([model.score(query, torch.from_numpy(features[start:start + batch_size]).to(query.device))[0]
                          for start in range(0, len(features), batch_size)]).cpu().numpy()


def _exact_search(index: Index, model: CIRModel, query: torch.Tensor, k: int,
                  skipped: str | None) -> list[tuple[str, float]]:
    if not hasattr(index, "stored_vectors"):
        raise IndexStoreError(f"{index.folder}: {type(model).__name__} ranks by its own `score` over stored "
                              "target features, which only a FAISS index hands back")
    ids, features = index.stored_vectors()
    if not ids:
        return []
    scores = exact_scores(model, query, features)
    order = np.argsort(-scores, kind="stable")[:k + (skipped is not None)]  # ties keep insertion order
    return [(ids[i], float(scores[i])) for i in order if ids[i] != skipped][:k]


def search_index(index: Index, model: CIRModel, reference_image: Image.Image | str, text: str,
                 k: int = 10, exclude_reference: bool = True) -> list[tuple[str, float]]:
    """The k best (image id, score) for a reference (an image, or a gallery id) modified by `text`: the
    cosine from the index's vector search, or for a model with its own `score` that exact score.

    A gallery reference is left out of its own results unless `exclude_reference` is False.
    """
    reference_id = reference_image if isinstance(reference_image, str) else None
    image = _gallery_image(index, reference_id) if reference_id is not None else reference_image
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            query = model.encode_queries(image_tensor(image, model.preprocessing).unsqueeze(0).to(device), [text])
    finally:
        model.train(was_training)
    skipped = reference_id if exclude_reference else None
    if ranks_by_own_score(model):
        return _exact_search(index, model, query.float(), k, skipped)
    vector = F.normalize(query.float(), dim=-1).cpu().numpy()
    scores, ids = index.search(vector, k + (skipped is not None))
    return [(name, float(score)) for name, score in zip(ids[0], scores[0], strict=False) if name != skipped][:k]
