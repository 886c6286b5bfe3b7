"""How masks travel with images to a mask-using model (OFFSET).

A model with a `mask_source` gets its split's images wrapped by `attach_masks` in `MaskedImages`,
whose batches are `MaskedBatch`es: the images (pixels or cached backbone maps) plus each image's
mask *as an image*: the grey mask replicated to three channels and normalised like the photo
(OFFSET runs masks through the photo's own image tower), or, when the photos are cached backbone
maps, the masks' cached maps. Masks come from the dataset's mask cache (`cirlab.masks.cache`), built
on demand for sources that need nothing from the user. A bare pixel tensor (a search query) still
works for sources that look at pixels alone (`MaskSource.from_pixels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from cirlab.image_batches import CachedMaps, ImageBatches, PixelImages, cut_windows
from cirlab.images import CropWindow, Preprocessing, centre_offsets, normalise, stored_image
from cirlab.masks.build import ensure_masks
from cirlab.masks.cache import MaskCache
from cirlab.masks.sources import MaskSource


def mask_images(masks: Tensor) -> Tensor:
    """uint8 masks (B x 1 x H x W) as the image tower sees a photo: grey replicated to RGB, normalised."""
    return normalise(masks.expand(-1, 3, -1, -1))


@dataclass
class MaskedBatch:
    """A batch of images with their masks, as `MaskedImages.batch` hands it out."""

    images: Tensor     # pixels or cached backbone maps
    masks: Tensor      # `mask_images` of the masks, or their cached backbone maps

    def __len__(self) -> int:
        return len(self.images)

    # The slice of the tensor API the training loop applies to any batch (see RegionBatch).
    @property
    def device(self) -> torch.device:
        return self.images.device

    def dim(self) -> int:
        return self.images.dim()

    def contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> MaskedBatch:
        return dataclasses.replace(self, images=self.images.contiguous(memory_format=memory_format),
                                   masks=self.masks.contiguous(memory_format=memory_format))


class MaskPixels:
    """A split's masks held as uint8 (N x 1 x H x W), as their photos' `PixelImages.stored` (the same fit, at the
    same stored size) when `preprocessing` is given; batches come out as `mask_images` of the evaluation view, or
    of given training windows (`cut`)."""

    def __init__(self, masks: Tensor, preprocessing: Preprocessing | None = None) -> None:
        self.stored, self.preprocessing = masks, preprocessing

    def __len__(self) -> int:
        return len(self.stored)

    @property
    def masks(self) -> Tensor:
        """The evaluation view: the stored masks' centre window of the model's size."""
        if self.preprocessing is None:
            return self.stored
        height, width = self.preprocessing.size
        top, left = centre_offsets(tuple(self.stored.shape[-2:]), (height, width))
        return self.stored[:, :, top:top + height, left:left + width]

    def batch(self, indices: Sequence[int] | Tensor, device: torch.device | str = "cpu") -> Tensor:
        return mask_images(self.masks[torch.as_tensor(indices)].to(device))

    def cut(self, indices: Sequence[int] | Tensor, windows: Sequence[CropWindow],
            device: torch.device | str = "cpu") -> Tensor:
        """The masks at `indices` cut by their photos' training windows."""
        return mask_images(cut_windows(self.stored, indices, windows, self.preprocessing).to(device))


class ConstantImages:
    """`count` copies of one image (1 x C x H x W): the masks of masks=none, stored once."""

    def __init__(self, image: Tensor, count: int) -> None:
        self.image, self.count = image, count

    def __len__(self) -> int:
        return self.count

    def batch(self, indices: Sequence[int] | Tensor, device: torch.device | str = "cpu") -> Tensor:
        return self.image.to(device).expand(len(torch.as_tensor(indices)), -1, -1, -1)

    def cut(self, indices: Sequence[int] | Tensor, windows: Sequence[CropWindow],
            device: torch.device | str = "cpu") -> Tensor:
        """A constant image is its own window (a uniform mask stays uniform under any crop)."""
        return self.batch(indices, device)


class MaskedImages:
    """A split's images plus their masks: an `ImageBatches` whose batches are `MaskedBatch`es."""

    def __init__(self, images: ImageBatches, masks: ImageBatches) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Sequence[int] | Tensor, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> MaskedBatch:
        """With a `generator` (training under a random augmentation), each photo and its mask are cut by one
        shared window, so the mask keeps covering its photo's dominant portion. (The OFFSET code crops photo and
        mask independently, which misaligns them: an evident slip, not copied.)"""
        index = torch.as_tensor(indices)
        if generator is None or not isinstance(self.images, PixelImages) or not self.images.preprocessing.is_random:
            return MaskedBatch(self.images.batch(index, device), self.masks.batch(index, device))
        windows = self.images.draw_windows(index, generator)
        photos = normalise(cut_windows(self.images.stored, index, windows, self.images.preprocessing).to(device))
        return MaskedBatch(photos, self.masks.cut(index, windows, device))


def _fitted(mask: np.ndarray, image: Path, preprocessing: Preprocessing) -> np.ndarray:
    """`mask` (at its image's size) fitted as its image is stored for the model (`stored_image`: the same pad,
    scale and stored size; the pad is mask background, 0)."""
    with Image.open(image) as opened:
        size = opened.size
    if mask.shape != (size[1], size[0]):
        raise ValueError(f"the mask of {image} is {mask.shape[1]} x {mask.shape[0]}, but the image is "
                         f"{size[0]} x {size[1]}: rebuild the masks with --overwrite")
    spec = dataclasses.replace(preprocessing, pad_fill=0)
    return np.asarray(stored_image(Image.fromarray(mask).convert("RGB"), spec).convert("L"))


def _cache_for(source: MaskSource, image: Path, data_root: Path | None) -> MaskCache:
    """The dataset's cache of `source`: under `data_root`, else found above `image`; one that does not
    exist yet is started when the source can compute its masks."""
    cache = MaskCache(data_root, source.name) if data_root is not None else MaskCache.find(image, source.name)
    settings = None if cache is None else cache.settings()
    if settings is None:
        if cache is None or not source.can_compute:
            raise ValueError(f"no {source.name} masks for {image}: {source.missing_hint()}")
        cache.prepare(source.settings())
    elif not source.accepts(settings):
        raise ValueError(f"the {source.name} masks in {cache.folder} were made with {settings}, but this model "
                         f"expects {source.settings()}: run `cirlab data masks {cache.root} --source {source.name} "
                         "--overwrite`")
    return cache


def dataset_masks(source: MaskSource, paths: Sequence[Path], preprocessing: Preprocessing,
                  data_root: Path | None = None, progress: bool = True) -> Tensor:
    """The masks of `paths` (N x 1 x H x W uint8), stored as the images are (`PixelImages.stored`), from the
    dataset's cache; missing ones are computed first where the source can."""
    cache = _cache_for(source, Path(paths[0]), data_root)
    ensure_masks(cache, source, paths, progress)
    masks = [_fitted(cache.read(path), Path(path), preprocessing)
             for path in tqdm(paths, desc=f"reading {source.name} masks", unit="img", disable=not progress)]
    return torch.from_numpy(np.stack(masks))[:, None]


def attach_masks(model: torch.nn.Module, images: ImageBatches, pixels: PixelImages, paths: Sequence[Path],
                 data_root: Path | None = None, device: torch.device | str = "cpu",
                 progress: bool = True) -> ImageBatches:
    """`images` as the model needs them: unchanged for a model without a `mask_source`, else with every
    image's mask attached (`MaskedImages`). With cached backbone maps (`CachedMaps`), the masks' maps are
    cached too. `pixels` holds the same images as decoded pixels; `paths` their files; `data_root` the
    dataset folder (default: found above the images, from an existing mask cache)."""
    source: MaskSource | None = getattr(model, "mask_source", None)
    if source is None:
        return images
    cached = isinstance(images, CachedMaps)
    if source.uniform:  # one mask (or map) stands for every image
        one: ImageBatches = MaskPixels(source.from_pixels(pixels.batch([0])))
        if cached:
            one = CachedMaps(model.image_encoder, one, device, progress=False)
        masks: ImageBatches = ConstantImages(one.batch([0]), len(pixels))
    else:
        spec = pixels.preprocessing
        masks = MaskPixels(dataset_masks(source, paths, spec, data_root, progress), spec)
        if cached:
            masks = CachedMaps(model.image_encoder, masks, device, progress=progress)
    return MaskedImages(images, masks)
