"""What the model sees of a split's images: decoded pixels held in memory, or cached backbone maps.

The layer between the readers (`cirlab.data`, which list image paths) and the encoders and models
(which take these batches); it knows neither.

CSS-size images are tiny, so decoding each once and keeping uint8 tensors beats reading PNGs
every step. With a frozen backbone, its feature maps are computed once (eval mode, the same
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

from cirlab.devices import to_device
from cirlab.images import fit_image, load_image, normalise


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
    """All images of a split decoded into one uint8 tensor; batches come out ImageNet-normalised.

    Images are decoded by `workers` threads (default: one per core, at most 8), in the paths' order."""

    def __init__(self, paths: Sequence[Path], progress: bool = True, size: int | None = None,
                 workers: int | None = None) -> None:
        workers = workers or default_decode_workers()

        def decode(path: Path) -> np.ndarray:
            return np.asarray(fit_image(load_image(path), size))

        with ThreadPoolExecutor(max_workers=workers) as pool:
            arrays = list(tqdm(pool.map(decode, paths), total=len(paths), desc="decoding images", unit="img",
                               disable=not progress))
        sizes = {array.shape for array in arrays}
        if len(sizes) > 1:
            raise ValueError(f"images of one split must share a size, found {sorted(sizes)}: "
                             "set data.image_size to resize and centre-crop them")
        self.pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, indices: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        # uint8 crosses to the device (a quarter of the float bytes, pinned for CUDA), normalised there
        return normalise(to_device(self.pixels[torch.as_tensor(indices)], torch.device(device)))


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
