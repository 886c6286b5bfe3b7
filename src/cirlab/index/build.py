"""Index a folder of images with a checkpoint's target encoder, and search the index with a query.

Building is resumable and incremental: image ids already committed are skipped, so rerunning after
a crash, or after new images were added to the folder, embeds only what is missing. Work is
committed every `commit_every` images, which bounds what a crash can lose.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cirlab.checkpoint import CONFIG_FILE, MODEL_FILE, CheckpointError, load_checkpoint
from cirlab.data.css import load_image
from cirlab.data.tensors import image_tensor
from cirlab.index.base import IndexMismatchError, UnknownImageError
from cirlab.index.faiss_index import FaissIndex
from cirlab.models.base import CIRModel

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
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
    """Every png/jpg/jpeg below `image_dir`, as sorted POSIX paths relative to it (the image ids)."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                  if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def embed_batch(model: CIRModel, pixels: torch.Tensor) -> np.ndarray:
    """Unit-length target vectors of equal-size images, so inner product = the model's cosine score."""
    with torch.no_grad():
        features = model.encode_targets(pixels)
    if features.dim() != 2:
        raise ValueError(f"encode_targets returned shape {tuple(features.shape)}; a FAISS index needs one "
                         "vector per image")
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def _embed_files(model: CIRModel, paths: Sequence[Path], batch_size: int, device: torch.device,
                 bar: tqdm) -> np.ndarray:
    vectors: dict[int, np.ndarray] = {}
    for start in range(0, len(paths), batch_size):
        tensors = [image_tensor(load_image(path), model.image_size) for path in paths[start:start + batch_size]]
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for offset, tensor in enumerate(tensors):
            by_size[tuple(tensor.shape)].append(start + offset)
        # Only equal sizes stack into one batch; nothing is resized, so each image is seen as given.
        for members in by_size.values():
            batch = torch.stack([tensors[member - start] for member in members]).to(device)
            vectors.update(zip(members, embed_batch(model, batch), strict=True))
        bar.update(len(tensors))
    return np.stack([vectors[position] for position in range(len(paths))])


def _target_model(checkpoint_folder: Path, device: torch.device) -> CIRModel:
    model = load_checkpoint(checkpoint_folder).model.to(device).eval()
    if type(model).score is not CIRModel.score:
        raise ValueError(f"{checkpoint_folder}: {type(model).__name__} scores targets with its own `score`, "
                         "not a cosine of vectors; a FAISS index alone cannot rank it exactly")
    return model


def _open_existing(out_folder: Path, model_id: str, factory: str, gallery_root: Path) -> FaissIndex | None:
    if not FaissIndex.exists(out_folder):
        return None
    index = FaissIndex.open(out_folder, model_id=model_id)
    stored = {"index type": index.factory, "gallery": index.gallery_root}
    wanted = {"index type": factory, "gallery": gallery_root}
    differing = [key for key in stored if stored[key] != wanted[key]]
    if differing:
        index.close()
        raise IndexMismatchError(f"{out_folder}: index has " + ", ".join(f"{key} {stored[key]}" for key in differing)
                                 + "; asked for " + ", ".join(f"{key} {wanted[key]}" for key in differing))
    return index


def build_index(checkpoint_folder: Path, image_dir: Path, out_folder: Path, batch_size: int = 64,
                factory: str = "Flat", commit_every: int = 512, progress: bool = True,
                device: str | torch.device = "cpu") -> FaissIndex:
    """Create or extend the index in `out_folder` with every image of `image_dir` it lacks."""
    if batch_size < 1 or commit_every < 1:
        raise ValueError(f"batch_size ({batch_size}) and commit_every ({commit_every}) must be positive")
    image_dir = Path(image_dir).resolve()
    model_id = model_identity(checkpoint_folder)
    names = list_images(image_dir)
    if not names:
        raise ValueError(f"{image_dir}: no .png, .jpg or .jpeg images")
    index = _open_existing(Path(out_folder), model_id, factory, image_dir)
    try:
        missing = [name for name in names if index is None or name not in index]
        if missing:
            device = torch.device(device)
            model = _target_model(Path(checkpoint_folder), device)
            with tqdm(total=len(missing), desc="indexing images", unit="img", disable=not progress) as bar:
                for start in range(0, len(missing), commit_every):
                    chunk = missing[start:start + commit_every]
                    vectors = _embed_files(model, [image_dir / name for name in chunk], batch_size, device, bar)
                    if index is None:  # created only now, when the vector dimension is known
                        index = FaissIndex.create(out_folder, vectors.shape[1], model_id, factory, image_dir,
                                                  checkpoint=Path(checkpoint_folder))
                    index.add(chunk, vectors)
                    index.commit()
    except BaseException:
        if index is not None:
            index.close()  # discards only the uncommitted chunk
        raise
    return index


def recorded_checkpoint(index_folder: Path) -> Path:
    """The checkpoint an index was built with, as `build_index` recorded it."""
    with FaissIndex.open(Path(index_folder)) as index:
        if index.checkpoint is None:
            raise ValueError(f"{index_folder}: the index records no checkpoint; pass --checkpoint")
        return index.checkpoint


def _gallery_image(index: FaissIndex, image_id: str) -> Image.Image:
    if image_id not in index:
        raise UnknownImageError(f"reference {image_id!r} is not an image of the index at {index.folder}")
    if index.gallery_root is None:
        raise ValueError(f"{index.folder}: index records no gallery folder to load {image_id!r} from")
    return load_image(index.gallery_root / image_id)


def search_index(index: FaissIndex, model: CIRModel, reference_image: Image.Image | str, text: str,
                 k: int = 10, exclude_reference: bool = True) -> list[tuple[str, float]]:
    """The k best (image id, cosine) for a reference (an image, or a gallery id) modified by `text`.

    A gallery reference is left out of its own results unless `exclude_reference` is False.
    """
    reference_id = reference_image if isinstance(reference_image, str) else None
    image = _gallery_image(index, reference_id) if reference_id is not None else reference_image
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            query = model.encode_queries(image_tensor(image, model.image_size).unsqueeze(0).to(device), [text])
    finally:
        model.train(was_training)
    vector = F.normalize(query.float(), dim=-1).cpu().numpy()
    skipped = reference_id if exclude_reference else None
    scores, ids = index.search(vector, k + (skipped is not None))
    return [(name, float(score)) for name, score in zip(ids[0], scores[0], strict=False) if name != skipped][:k]
