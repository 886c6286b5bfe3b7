"""Regions ("locally bounded" entities) of images, for region-based methods such as LBF.

A region is a box (normalised [x0, y0, x1, y1] in [0, 1] of the image the model sees) and a
visual feature. Four sources, behind one interface (`RegionSource`):

- ``grid``: a fixed rows x cols grid of boxes over the backbone map (the cheap fallback);
- ``proposals``: class-agnostic boxes computed here from the pixels: the whole image, then the
  bounding boxes of Felzenszwalb-Huttenlocher graph segments (scikit-image), largest first;
- ``boxes``: boxes read from per-image files in the bottom-up-attention layout (below);
- ``detector``: boxes *and* features read from those files, as the LBF paper did with its
  Faster R-CNN (the backbone is then unused).

For the first three the feature of a region is RoI-aligned from the backbone's map
(`torchvision.ops.roi_align`), so they work on pixels and on cached maps alike.

How boxes travel with images: `attach_regions` wraps a split's `ImageBatches` in `RegionImages`,
whose `batch` hands out a `RegionBatch` (the pixels or cached maps plus the boxes, a validity mask
and, for ``detector``, the features). Per-image boxes are computed or read once per split there
(proposals are also cached on disk, keyed by a hash of the pixels). A plain pixel tensor (an
uploaded image at search time) still works for ``grid`` and ``proposals``, whose boxes are computed
on the fly, deterministically and identically to the cached ones; the file sources refuse it.

Region file layout (one ``<image file stem>.npz`` per image, as bottom-up-attention feature
extractors write it): ``bbox`` (n x 4 pixel boxes x0, y0, x1, y1), ``image_w``, ``image_h``,
optional ``num_bbox`` (n), and for ``detector`` ``x`` (n x D pooled region features). Files are read
without pickle; extra keys (e.g. a pickled ``info``) are never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou, roi_align
from tqdm import tqdm

from cirlab.files import atomic_write_bytes
from cirlab.image_batches import ImageBatches, PixelImages
from cirlab.images import pixels_to_uint8

REGION_SOURCES: tuple[str, ...] = ("grid", "proposals", "boxes", "detector")
REGION_CACHE = ".cirlab-cache"   # the proposal cache folder under a dataset root
PROPOSALS_VERSION = 1            # part of the cache key: bump it when `propose_boxes` changes its output


@dataclass
class RegionBatch:
    """A batch of images with their regions, as `RegionImages.batch` hands it out.

    Real regions come first in every row; padded slots hold finite values and are masked out."""

    images: Tensor | None       # pixels or cached backbone maps, B x C x H x W (None with detector features)
    boxes: Tensor               # B x K x 4, normalised [x0, y0, x1, y1]
    mask: Tensor                # B x K bool, True = a real region (every row has at least one)
    features: Tensor | None = None   # B x K x D detector features

    def __len__(self) -> int:
        return len(self.boxes)

    # The slice of the tensor API that the training loop applies to any batch (the device for autocast,
    # channels-last conversion of 4-D image batches), delegated to the images.
    @property
    def device(self) -> torch.device:
        return self.boxes.device

    def dim(self) -> int:
        return self.boxes.dim() if self.images is None else self.images.dim()

    def contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> RegionBatch:
        images = None if self.images is None else self.images.contiguous(memory_format=memory_format)
        return dataclasses.replace(self, images=images)

    def trimmed(self) -> RegionBatch:
        """Without the slots that are padding in every row (outputs do not depend on padding)."""
        count = int(self.mask.sum(dim=1).max())
        features = None if self.features is None else self.features[:, :count]
        return dataclasses.replace(self, boxes=self.boxes[:, :count], mask=self.mask[:, :count], features=features)


class RegionImages:
    """A split's images plus per-image regions: an `ImageBatches` whose batches are `RegionBatch`es,
    which region models accept wherever they accept a tensor batch."""

    def __init__(self, images: ImageBatches | None, boxes: Tensor, mask: Tensor,
                 features: Tensor | None = None) -> None:
        self.images, self.boxes, self.mask, self.features = images, boxes, mask, features

    def __len__(self) -> int:
        return len(self.boxes)

    def batch(self, indices: Sequence[int] | Tensor, device: torch.device | str = "cpu") -> RegionBatch:
        index = torch.as_tensor(indices)
        return RegionBatch(
            images=None if self.images is None else self.images.batch(index, device),
            boxes=self.boxes[index].to(device), mask=self.mask[index].to(device),
            features=None if self.features is None else self.features[index].to(device).float(),
        )


def position_features(boxes: Tensor, anchor: str = "corner") -> Tensor:
    """LBF's positional input [x, y, w, h] of normalised [x0, y0, x1, y1] boxes (... x 4).

    anchor="corner": (x, y) is the top-left corner; "center": the box centre."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    w, h = x1 - x0, y1 - y0
    if anchor == "center":
        x0, y0 = x0 + w / 2, y0 + h / 2
    elif anchor != "corner":
        raise ValueError(f"unknown box anchor {anchor!r} (known: corner, center)")
    return torch.stack([x0, y0, w, h], dim=-1)


def roi_features(feature_map: Tensor, boxes: Tensor, size: int) -> Tensor:
    """RoI-aligned features (B x K x C*size*size) of normalised boxes (B x K x 4) on a B x C x h x w map."""
    batch, regions = boxes.shape[:2]
    height, width = feature_map.shape[-2:]
    scale = boxes.new_tensor([width, height, width, height])
    pooled = roi_align(feature_map, list((boxes * scale).to(feature_map.dtype)), output_size=size,
                       spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return pooled.reshape(batch, regions, -1)


def roi_weights(boxes: Tensor, height: int, width: int, size: int) -> Tensor:
    """The matrix (K*size*size x height*width) that `roi_features` applies to every channel for fixed boxes
    (K x 4). RoI Align is linear in the map, so probing it with the height*width one-hot maps recovers its
    weights exactly; applying them is plain matrix algebra, which (unlike torchvision's roi_align) has a
    double backward, as MMGrad training needs."""
    cells = height * width
    basis = torch.eye(cells, device=boxes.device).view(cells, 1, height, width)
    return roi_features(basis, boxes.float().expand(cells, -1, -1), size).reshape(cells, -1).T


def apply_roi_weights(feature_map: Tensor, weights: Tensor, regions: int) -> Tensor:
    """`roi_features` through `roi_weights`: B x K x C*size*size, channels outer as roi_align lays them out."""
    batch, channels = feature_map.shape[:2]
    pooled = feature_map.flatten(2) @ weights.T.to(feature_map.dtype)          # B x C x K*size*size
    return pooled.view(batch, channels, regions, -1).transpose(1, 2).reshape(batch, regions, -1)


def grid_boxes(count: int) -> Tensor:
    """`count` cells (count x 4) of a rows x cols grid, rows the largest divisor of count <= sqrt(count)."""
    rows = max(r for r in range(1, int(count ** 0.5) + 1) if count % r == 0)
    cols = count // rows
    ys, xs = torch.meshgrid(torch.arange(rows) / rows, torch.arange(cols) / cols, indexing="ij")
    corners = torch.stack([xs.flatten(), ys.flatten()], dim=1)
    return torch.cat([corners, corners + torch.tensor([1 / cols, 1 / rows])], dim=1)


def propose_boxes(image: np.ndarray, limit: int, scales: Sequence[float] = (100.0,), sigma: float = 0.8,
                  min_size: int = 20, overlap: float = 0.9) -> np.ndarray:
    """Class-agnostic boxes of one H x W x 3 uint8 image, normalised [x0, y0, x1, y1] (n x 4, n <= limit).

    The whole image comes first (so every image has a region), then the bounding boxes of
    Felzenszwalb-Huttenlocher segments at each `scale`, largest first (ties: top, then left); a box
    overlapping an already kept one with IoU >= `overlap` is dropped. Deterministic for given pixels.
    """
    from skimage.measure import regionprops
    from skimage.segmentation import felzenszwalb

    height, width = image.shape[:2]
    candidates = [(0, 0, width, height)]
    for scale in scales:
        labels = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1)
        # regionprops' bbox is (min_row, min_col, max_row, max_col), max exclusive; label 0 would be ignored.
        candidates += [(c0, r0, c1, r1) for r0, c0, r1, c1 in (segment.bbox for segment in regionprops(labels + 1))]
    boxes = np.asarray(candidates, dtype=np.float64)
    area = (boxes[1:, 2] - boxes[1:, 0]) * (boxes[1:, 3] - boxes[1:, 1])
    order = np.concatenate([[0], 1 + np.lexsort((boxes[1:, 0], boxes[1:, 1], -area))])
    ious = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()
    kept: list[int] = []
    for candidate in order:
        if not kept or ious[candidate, kept].max() < overlap:
            kept.append(int(candidate))
            if len(kept) == limit:
                break
    return (boxes[kept] / [width, height, width, height]).astype(np.float32)


def pad_regions(per_image: Sequence[np.ndarray], limit: int) -> tuple[Tensor, Tensor]:
    """Stack per-image arrays (n_i x F, n_i <= limit) into B x limit x F with a validity mask; padded
    slots repeat the first row, so padded boxes stay finite (their values are masked out anyway)."""
    padded = np.stack([np.concatenate([rows, np.repeat(rows[:1], limit - len(rows), axis=0)]) for rows in per_image])
    mask = torch.arange(limit)[None, :] < torch.tensor([len(rows) for rows in per_image])[:, None]
    return torch.from_numpy(padded), mask


def write_region_file(path: Path, boxes: np.ndarray, image_w: int, image_h: int,
                      features: np.ndarray | None = None) -> None:
    """One image's regions in the bottom-up-attention layout (pixel boxes), written atomically."""
    arrays: dict[str, np.ndarray] = {"bbox": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                     "image_w": np.array(image_w), "image_h": np.array(image_h),
                                     "num_bbox": np.array(len(boxes))}
    if features is not None:
        arrays["x"] = np.asarray(features, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _scalar(value: np.ndarray, key: str, path: Path) -> float:
    if value.size != 1:
        raise ValueError(f"region file {path}: {key} must be one number, got shape {value.shape}")
    return float(value.reshape(-1)[0])


def read_region_file(path: Path, limit: int, with_features: bool) -> tuple[np.ndarray, np.ndarray | None, float]:
    """The first `limit` regions of one file: normalised boxes (n x 4), features (n x D) or None, and the
    image's aspect ratio w / h. Raises ValueError naming the file on anything malformed."""
    wanted = ("bbox", "image_w", "image_h", "num_bbox") + (("x",) if with_features else ())
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in wanted if key in data.files}
    except (OSError, EOFError, ValueError, AttributeError, zipfile.BadZipFile) as error:
        # AttributeError: a bare .npy, which np.load returns as an array rather than an archive
        raise ValueError(f"cannot read region file {path} as an .npz archive: {error}") from error
    missing = [key for key in wanted if key != "num_bbox" and key not in arrays]
    if missing:
        raise ValueError(f"region file {path} lacks {', '.join(missing)}")
    boxes = arrays["bbox"].astype(np.float64)
    width, height = _scalar(arrays["image_w"], "image_w", path), _scalar(arrays["image_h"], "image_h", path)
    count = int(_scalar(arrays["num_bbox"], "num_bbox", path)) if "num_bbox" in arrays else len(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not 0 <= count <= len(boxes):
        raise ValueError(f"region file {path}: bbox must be n x 4 with num_bbox <= n, got {boxes.shape}, {count}")
    if width <= 0 or height <= 0:
        raise ValueError(f"region file {path}: image_w and image_h must be positive, got {width} x {height}")
    features = arrays["x"].astype(np.float32) if with_features else None
    if features is not None and (features.ndim != 2 or len(features) != len(boxes)):
        raise ValueError(f"region file {path}: x must hold one feature row per box, got {features.shape}")
    count = min(count, limit)
    normalised = np.clip(boxes[:count] / [width, height, width, height], 0.0, 1.0).astype(np.float32)
    return normalised, None if features is None else features[:count], width / height


class RegionSource(ABC):
    """Where an image's K regions come from (see the module docstring)."""

    name: str

    def __init__(self, num_regions: int) -> None:
        if num_regions < 1:
            raise ValueError(f"num_regions must be positive, got {num_regions}")
        self.num_regions = num_regions

    def features(self, feature_map: Tensor, boxes: Tensor, size: int) -> Tensor:
        """Region features (B x K x C*size*size) of `boxes` (B x K x 4) on the backbone's map."""
        return roi_features(feature_map, boxes, size)

    @abstractmethod
    def boxes_of(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Boxes (B x K x 4) and mask (B x K) of a plain batch (pixels or cached maps) without attached regions."""

    @abstractmethod
    def attach(self, images: ImageBatches, pixels: PixelImages, paths: Sequence[Path],
               cache_dir: Path | None, progress: bool) -> ImageBatches:
        """`images` (what the model is fed) with every image's regions attached, computed or read once.
        `pixels` holds the same images as decoded pixels (a `PixelImages`); `paths` their files."""


class GridRegions(RegionSource):
    """A fixed grid: nothing per image, so plain batches need no wrapping. Its boxes never change, so
    RoI Align is one fixed matrix per map size (`roi_weights`), computed once."""

    name = "grid"

    def __init__(self, num_regions: int) -> None:
        super().__init__(num_regions)
        self._weights: dict[tuple[int, int, int, torch.device], Tensor] = {}

    def features(self, feature_map: Tensor, boxes: Tensor, size: int) -> Tensor:
        height, width = feature_map.shape[-2:]
        key = (height, width, size, feature_map.device)
        if key not in self._weights:
            self._weights[key] = roi_weights(grid_boxes(self.num_regions).to(feature_map.device), height, width, size)
        return apply_roi_weights(feature_map, self._weights[key], self.num_regions)

    def boxes_of(self, images: Tensor) -> tuple[Tensor, Tensor]:
        boxes = grid_boxes(self.num_regions).to(images.device)
        batch = len(images)
        return boxes.expand(batch, -1, -1), torch.ones(batch, self.num_regions, dtype=torch.bool, device=images.device)

    def attach(self, images: ImageBatches, pixels: PixelImages, paths: Sequence[Path],
               cache_dir: Path | None, progress: bool) -> ImageBatches:
        return images


class ProposalRegions(RegionSource):
    """Graph-segmentation proposals (`propose_boxes`), cached per split on disk."""

    name = "proposals"

    def __init__(self, num_regions: int, scales: Sequence[float] = (100.0,), sigma: float = 0.8,
                 min_size: int = 20, overlap: float = 0.9) -> None:
        super().__init__(num_regions)
        self.params = {"scales": [float(s) for s in scales], "sigma": float(sigma), "min_size": int(min_size),
                       "overlap": float(overlap)}

    def _boxes(self, images: Sequence[np.ndarray] | np.ndarray, progress: bool = False) -> tuple[Tensor, Tensor]:
        proposals = [propose_boxes(image, self.num_regions, **self.params)
                     for image in tqdm(images, desc="region proposals", unit="img", disable=not progress)]
        return pad_regions(proposals, self.num_regions)

    def boxes_of(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[1] != 3:
            raise ValueError(f"region proposals are computed from pixels, but the model got {images.shape[1]}-channel "
                             "backbone maps without regions (cached maps need attach_regions; Grad-CAM "
                             "explanations, which start from the map, work with regions=grid only)")
        boxes, mask = self._boxes(pixels_to_uint8(images))
        return boxes.to(images.device), mask.to(images.device)

    def _cache_file(self, pixels: Tensor, cache_dir: Path) -> Path:
        key = [PROPOSALS_VERSION, self.num_regions, self.params, list(pixels.shape)]
        digest = hashlib.sha256(json.dumps(key).encode())
        digest.update(pixels.contiguous().numpy().tobytes())
        return cache_dir / f"proposals-{digest.hexdigest()[:20]}.npz"

    def attach(self, images: ImageBatches, pixels: PixelImages, paths: Sequence[Path],
               cache_dir: Path | None, progress: bool) -> ImageBatches:
        uint8 = pixels.pixels
        cache = None if cache_dir is None else self._cache_file(uint8, Path(cache_dir))
        if cache is not None and cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as stored:
                    return RegionImages(images, torch.from_numpy(stored["boxes"]), torch.from_numpy(stored["mask"]))
            except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:
                warnings.warn(f"ignoring unreadable region proposal cache {cache}: {error}", stacklevel=2)
        boxes, mask = self._boxes(uint8.permute(0, 2, 3, 1).numpy(), progress)
        if cache is not None:
            buffer = io.BytesIO()
            np.savez(buffer, boxes=boxes.numpy(), mask=mask.numpy())
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(cache, buffer.getvalue())
            except OSError as error:  # a read-only dataset folder costs a recomputation next time, nothing more
                warnings.warn(f"cannot cache region proposals in {cache}: {error}", stacklevel=2)
        return RegionImages(images, boxes, mask)


class FileRegions(RegionSource):
    """Regions read from `<folder>/<image stem>.npz` files; with `with_features` their features too."""

    def __init__(self, num_regions: int, folder: str | Path | None, with_features: bool) -> None:
        super().__init__(num_regions)
        self.name = "detector" if with_features else "boxes"
        if not folder:
            raise ValueError(f'region source "{self.name}" needs region_dir, the folder of per-image .npz files')
        self.folder = Path(folder)
        self.with_features = with_features

    def boxes_of(self, images: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError(f'region source "{self.name}" reads each image\'s regions from {self.folder}; an image '
                         "given as bare pixels has no detector output (use a model with regions=proposals or "
                         "grid to search with new images)")

    def attach(self, images: ImageBatches, pixels: PixelImages, paths: Sequence[Path],
               cache_dir: Path | None, progress: bool) -> ImageBatches:
        stems: dict[str, Path] = {}
        for path in paths:
            if Path(path).stem in stems:
                raise ValueError(f"images {stems[Path(path).stem]} and {path} share the file stem that names "
                                 f"their region file in {self.folder}")
            stems[Path(path).stem] = Path(path)
        aspect = pixels.pixels.shape[3] / pixels.pixels.shape[2]
        boxes, features = [], []
        for path in tqdm(paths, desc=f"reading {self.name} regions", unit="img", disable=not progress):
            file = self.folder / f"{Path(path).stem}.npz"
            if not file.is_file():
                raise ValueError(f"no {self.name} output for image {path}: expected {file}")
            image_boxes, image_features, file_aspect = read_region_file(file, self.num_regions, self.with_features)
            if not self.with_features and abs(file_aspect / aspect - 1) > 0.01:
                raise ValueError(f"region file {file} describes a {file_aspect:.3f} (w/h) image but the model sees "
                                 f"{aspect:.3f}: its boxes do not fit the resized and cropped images")
            if len(image_boxes) == 0:
                if self.with_features:
                    raise ValueError(f"region file {file} holds no regions")
                image_boxes = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)  # the whole image stands in
            boxes.append(image_boxes)
            features.append(image_features)
        box_tensor, mask = pad_regions(boxes, self.num_regions)
        if not self.with_features:
            return RegionImages(images, box_tensor, mask)
        dims = {f.shape[1] for f in features}
        if len(dims) > 1:
            raise ValueError(f"region files in {self.folder} disagree on the feature size: {sorted(dims)}")
        feature_tensor, _ = pad_regions(features, self.num_regions)
        return RegionImages(None, box_tensor, mask, feature_tensor.half())


def create_region_source(name: str, num_regions: int, region_dir: str | None = None,
                         proposal_scales: Sequence[float] = (100.0,), proposal_sigma: float = 0.8,
                         proposal_min_size: int = 20, proposal_overlap: float = 0.9) -> RegionSource:
    if name == "grid":
        return GridRegions(num_regions)
    if name == "proposals":
        return ProposalRegions(num_regions, proposal_scales, proposal_sigma, proposal_min_size, proposal_overlap)
    if name in ("boxes", "detector"):
        return FileRegions(num_regions, region_dir, with_features=name == "detector")
    raise ValueError(f"unknown region source {name!r}; known: {', '.join(REGION_SOURCES)}")


def attach_regions(model: torch.nn.Module, images: ImageBatches, pixels: PixelImages, paths: Sequence[Path],
                   cache_dir: Path | None = None, progress: bool = True) -> ImageBatches:
    """`images` as the model needs them: unchanged for a model without a `region_source`, else with
    every image's regions attached (see `RegionSource.attach`)."""
    source: RegionSource | None = getattr(model, "region_source", None)
    if source is None:
        return images
    return source.attach(images, pixels, paths, cache_dir, progress)
