"""Mask sources: where an image's dominant-portion mask comes from (OFFSET's segmentation step).

- ``oracle``: the generator's ground-truth garment masks (synthetic garments write DATA/masks/<id>.png);
- ``saliency``: the offline default, border-connected background removal by colour
  (`cirlab.masks.saliency`); needs no weights and also works on bare pixels at search time;
- ``clipseg``: CLIPSeg prompted with a caption, from a local weights folder (`cirlab.masks.clipseg`);
- ``none``: no segmentation (OFFSET's ablation): every image's mask is all 255, no files involved.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cirlab.images import load_image, pixels_to_uint8
from cirlab.masks.base import MaskSource
from cirlab.masks.cache import read_mask
from cirlab.masks.clipseg import DEFAULT_PROMPT, CLIPSegMasks
from cirlab.masks.saliency import SALIENCY_VERSION, WORK_SIZE, saliency_mask

MASK_SOURCES: tuple[str, ...] = ("saliency", "oracle", "clipseg", "none")
GROUND_TRUTH_FOLDER = "masks"   # where the garments generator writes its garment masks


def ground_truth_path(root: Path, image: Path) -> Path | None:
    """The generator's mask of `image` under `root`: masks/<image stem>.png, or masks/<folder name>.png for
    the Fashion200k layout (one folder per product); None when neither exists."""
    folder = Path(root) / GROUND_TRUTH_FOLDER
    for name in (Path(image).stem, Path(image).parent.name):
        candidate = folder / f"{name}.png"
        if candidate.is_file():
            return candidate
    return None


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


class OracleMasks(MaskSource):
    """The synthetic data's ground truth, checked to match its image's size."""

    name = "oracle"

    def compute(self, root: Path, images: Sequence[Path]) -> Iterator[np.ndarray]:
        for image in images:
            path = ground_truth_path(root, image)
            if path is None:
                raise ValueError(f"no ground-truth mask for {image}: expected {root}/{GROUND_TRUTH_FOLDER}/"
                                 f"{Path(image).stem}.png (only the synthetic garments generator writes them)")
            mask = read_mask(path)
            width, height = _image_size(image)
            if mask.shape != (height, width):
                raise ValueError(f"ground-truth mask {path} is {mask.shape[1]} x {mask.shape[0]}, but its image "
                                 f"{image} is {width} x {height}")
            yield mask


class SaliencyMasks(MaskSource):
    """`cirlab.masks.saliency.saliency_mask` of each image."""

    name = "saliency"

    def settings(self) -> dict[str, Any]:
        return {"version": SALIENCY_VERSION, "work_size": WORK_SIZE}

    def compute(self, root: Path, images: Sequence[Path]) -> Iterator[np.ndarray]:
        for image in images:
            yield saliency_mask(np.asarray(load_image(image).convert("RGB")))

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        masks = np.stack([saliency_mask(image) for image in pixels_to_uint8(pixels)])
        return torch.from_numpy(masks)[:, None].to(pixels.device)


class UniformMasks(MaskSource):
    """No segmentation: the whole image is the dominant portion."""

    name = "none"
    uniform = True

    def compute(self, root: Path, images: Sequence[Path]) -> Iterator[np.ndarray]:
        raise ValueError("masks=none stores no masks: every image's mask is all 255")

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixels.shape
        return torch.full((batch, 1, height, width), 255, dtype=torch.uint8, device=pixels.device)


def create_mask_source(name: str, weights: str | Path | None = None, prompt: str | None = None,
                       captions: str | Path | None = None, device: str | torch.device = "cpu") -> MaskSource:
    """A mask source by name; `weights`, `prompt`, `captions` and `device` are CLIPSeg's (see CLIPSegMasks).
    CLIPSeg without weights can only read masks cached earlier."""
    if name == "clipseg":
        return CLIPSegMasks(weights, prompt or DEFAULT_PROMPT, captions, device)
    if weights is not None or prompt is not None or captions is not None:
        raise ValueError(f"weights, prompt and captions are CLIPSeg settings; the {name} source takes none")
    sources: dict[str, type[MaskSource]] = {"saliency": SaliencyMasks, "oracle": OracleMasks, "none": UniformMasks}
    if name not in sources:
        raise ValueError(f"unknown mask source {name!r} (known: {', '.join(MASK_SOURCES)})")
    return sources[name]()
