"""The two interfaces every encoder honours: an image `Backbone` (pixels -> map) and a `TextEncoder`.

They live apart from the implementations so that `clip.py` can implement both while `image.py` and
`text.py` build CLIP towers by name, without an import cycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class Backbone(nn.Module):
    """A convolutional trunk mapping pixels B x 3 x H x W to a map B x C x h x w."""

    def __init__(self, trunk: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)


class TextEncoder(nn.Module, ABC):
    """Common interface. ``out_dim``: pooled size; ``token_dim``: per-token size."""

    out_dim: int
    token_dim: int

    @abstractmethod
    def forward(self, texts: list[str]) -> Tensor:
        """B x out_dim text features."""

    @abstractmethod
    def forward_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """B x L x token_dim token features and a B x L bool mask (True = real token)."""

    def pooled_and_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """`forward` and `forward_tokens` together, for methods that need both (OFFSET); encoders whose two
        outputs come from one pass override it to run that pass once."""
        return (self(texts), *self.forward_tokens(texts))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
