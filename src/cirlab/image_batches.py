"""What the model sees of a split's images: decoded pixels held in memory, or cached backbone maps.

The layer between the readers (`cirlab.data`, which list image paths) and the encoders and models
(which take these batches); it knows neither.

CSS-size images are tiny, so decoding each once and keeping uint8 tensors beats reading PNGs
every step: `PixelImages` keeps the deterministic part of the model's `Preprocessing` (at its pre-crop size)
and cuts each batch from it, the evaluation view or, given a generator, the training augmentation's random
windows. With a frozen backbone, its feature maps are computed once (eval mode, the same
preprocessing as evaluation) and training runs on them, skipping the backbone entirely; a multi-level
backbone's maps are cached level by level and handed out as `LevelMaps`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from cirlab.config import Config, ConfigError
from cirlab.devices import to_device
from cirlab.images import (
    CropWindow,
    Preprocessing,
    Size,
    as_preprocessing,
    centre_offsets,
    cut_window,
    draw_window,
    load_image,
    normalise,
    stored_image,
)


@dataclass
class LevelMaps:
    """A batch of a multi-level backbone's maps (lowest level first), such as cached ones: a
    `MultiLevelImageEncoder` takes it wherever it takes pixels."""

    maps: tuple[Tensor, ...]

    def __len__(self) -> int:
        return len(self.maps[0])

    # The slice of the tensor API that the training loop applies to any batch (the device for autocast,
    # channels-last conversion of 4-D batches).
    @property
    def device(self) -> torch.device:
        return self.maps[0].device

    def dim(self) -> int:
        return self.maps[0].dim()

    def contiguous(self, memory_format: torch.memory_format = torch.contiguous_format) -> LevelMaps:
        return LevelMaps(tuple(level.contiguous(memory_format=memory_format) for level in self.maps))


class FrozenBackbone(Protocol):
    """An image encoder whose backbone maps can be cached: `ImageEncoder` or `MultiLevelImageEncoder`."""

    backbone: nn.Module


class ImageBatches(Protocol):
    """Anything that hands out model-ready batches of a split's images by index."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor: ...


def default_decode_workers() -> int:
    """Threads for decoding: Pillow releases the GIL while decoding and resizing, so each core helps."""
    return min(8, os.cpu_count() or 1)


class PixelImages:
    """All images of a split decoded once into one uint8 tensor; batches come out ImageNet-normalised.

    `size` is the model's `Preprocessing` (a bare size means "crop" at that size, None the images' own size).
    `stored` holds the deterministic part of it (N x 3 x H x W at the pre-crop size, else the size), `pixels` the
    evaluation view (its centre window), `preprocessing` the spec with the size resolved (the native size when
    it was None), which is what a model trained on these images records.
    Images are decoded by `workers` threads (default: one per core, at most 8), in the paths' order."""

    def __init__(self, paths: Sequence[Path], progress: bool = True, size: Preprocessing | int | Size | None = None,
                 workers: int | None = None) -> None:
        workers = workers or default_decode_workers()
        spec = as_preprocessing(size)

        def decode(path: Path) -> np.ndarray:
            return np.asarray(stored_image(load_image(path), spec))

        with ThreadPoolExecutor(max_workers=workers) as pool:
            arrays = list(tqdm(pool.map(decode, paths), total=len(paths), desc="decoding images", unit="img",
                               disable=not progress))
        sizes = {array.shape for array in arrays}
        if len(sizes) > 1:
            raise ValueError(f"images of one split must share a size, found {sorted(sizes)}: "
                             "set data.image_size to resize and centre-crop them")
        self.stored = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        self.preprocessing = spec if spec.size is not None else spec.with_size(tuple(self.stored.shape[-2:]))

    @property
    def pixels(self) -> torch.Tensor:
        """The evaluation view, N x 3 x H x W uint8: the stored images' centre `size` window (a view, no copy)."""
        height, width = self.preprocessing.size
        top, left = centre_offsets(tuple(self.stored.shape[-2:]), (height, width))
        return self.stored[:, :, top:top + height, left:left + width]

    def __len__(self) -> int:
        return len(self.stored)

    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
        """The images at `indices`, normalised on `device`. Without a `generator`, or with no augmentation in the
        spec, the evaluation view; with one, each image's own random window (`draw_window`), drawn in the order of
        `indices` from that generator alone, so restoring its state repeats the batch exactly."""
        if generator is None or not self.preprocessing.is_random:
            chosen = self.pixels[torch.as_tensor(indices)]
        else:
            chosen = cut_windows(self.stored, indices, self.draw_windows(indices, generator), self.preprocessing)
        # uint8 crosses to the device (a quarter of the float bytes, pinned for CUDA), normalised there
        return normalise(to_device(chosen, torch.device(device)))

    def draw_windows(self, indices: Sequence[int] | torch.Tensor, generator: torch.Generator) -> list[CropWindow]:
        """One training window per image at `indices`, drawn in order from `generator` alone (so restoring its
        state repeats them); images that travel with these (OFFSET's masks) are cut by the same windows."""
        stored_size = tuple(self.stored.shape[-2:])
        return [draw_window(self.preprocessing, stored_size, generator) for _ in range(len(torch.as_tensor(indices)))]


def cut_windows(stored: torch.Tensor, indices: Sequence[int] | torch.Tensor, windows: Sequence[CropWindow],
                spec: Preprocessing) -> torch.Tensor:
    """The uint8 images `stored[indices]` (N x C x H x W), each cut by its window to the spec's size."""
    return torch.stack([cut_window(stored[i], window, spec.size, spec.interpolation)
                        for i, window in zip(torch.as_tensor(indices).tolist(), windows, strict=True)])


def refuse_cached_augmentation(config: Config) -> None:
    """Refuse a run that would train on cached backbone maps (a frozen backbone with train.cache_features) while
    its data config asks for a random augmentation, which those maps could never show."""
    augment = Preprocessing.from_config(config.data).augment
    if augment != "none" and config.model.freeze_backbone and config.train.cache_features:
        raise ConfigError(
            f"data.augment={augment} draws new random windows every step, but with model.freeze_backbone and "
            "train.cache_features the backbone maps are computed once, from the evaluation view, so training "
            "would never see them: set train.cache_features=false (the frozen backbone then runs on each "
            "augmented batch) or data.augment=none")


class CachedMaps:
    """Backbone feature maps of every image, computed once in eval mode, stored in float16: one map per
    image, or for a multi-level backbone one per level (batches are then `LevelMaps`)."""

    def __init__(self, encoder: FrozenBackbone, images: PixelImages,
                 device: torch.device | str, batch_size: int = 256, progress: bool = True) -> None:
        chunks = []
        was_training = encoder.backbone.training
        encoder.backbone.eval()
        with torch.no_grad():
            for start in tqdm(range(0, len(images), batch_size), desc="caching backbone features",
                              unit="batch", disable=not progress):
                indices = range(start, min(start + batch_size, len(images)))
                maps = encoder.backbone(images.batch(indices, device))
                chunks.append([level.half().cpu() for level in (maps if isinstance(maps, tuple) else [maps])])
        encoder.backbone.train(was_training)
        self.multilevel = isinstance(maps, tuple)
        self.levels = tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))

    def __len__(self) -> int:
        return len(self.levels[0])

    def batch(self, indices: Sequence[int] | torch.Tensor,
              device: torch.device | str = "cpu") -> torch.Tensor | LevelMaps:
        index = torch.as_tensor(indices)
        maps = tuple(to_device(level[index], torch.device(device)).float() for level in self.levels)
        return LevelMaps(maps) if self.multilevel else maps[0]
