"""The interface of a source of OFFSET's dominant-portion masks (implemented in `sources` and `clipseg`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class MaskSource(ABC):
    """Computes one soft mask (H x W uint8 at the image's size) per image file."""

    name: str
    uniform = False      # True: the same mask for every image, never stored (masks=none)

    def settings(self) -> dict[str, Any]:
        """What decides the masks: recorded in the cache's manifest."""
        return {}

    def accepts(self, settings: dict[str, Any]) -> bool:
        """Whether cached masks made with `settings` are this source's masks."""
        return settings == self.settings()

    def missing_hint(self) -> str:
        """What to do when masks are neither cached nor computable here."""
        return f"run `cirlab data masks DATA --source {self.name}`"

    @property
    def can_compute(self) -> bool:
        """Whether `compute` works without anything more from the user (missing masks are then built on demand)."""
        return True

    @abstractmethod
    def compute(self, root: Path, images: Sequence[Path]) -> Iterator[np.ndarray]:
        """The masks of `images` (files inside the dataset folder `root`), in order."""

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Masks (B x 1 x H x W uint8) of ImageNet-normalised pixels (B x 3 x H x W), for images that have no
        file in a dataset (search queries); only sources that look at pixels alone can do this."""
        raise ValueError(f"{self.name} masks are made per dataset image ({self.missing_hint()}); a bare image "
                         "has none: use a model with masks=saliency or masks=none to search with new images")
