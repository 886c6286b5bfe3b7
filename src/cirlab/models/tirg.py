"""TIRG: Text Image Residual Gating (Vo et al., CVPR 2019), as in the public TIRG code.

Paper vs code (the code is the default, as the house rule says):
- The FC-level gate is `BN -> ReLU -> Linear(2D, D)` (one linear layer) in the code; the paper writes
  a two-layer gate `W_g2 ReLU(W_g1 [x;t])`. `--set model.options.gate_layers=2` gives the paper's form.
- Output `a0 * sigmoid(gate) * x + a1 * residual` with a learnable `a = [1, 10, 1, 1]`; only a0 and a1
  are used (a2 and a3 are dead in the code but kept, since weight decay still touches them).
"""

from __future__ import annotations

import torch
from torch import nn

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder
from cirlab.encoders.text import TextEncoder
from cirlab.models.base import CIRModel, VectorCompositionModel
from cirlab.models.registration import register_model


def _gate_weights() -> nn.Parameter:
    return nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))


class TIRG(VectorCompositionModel):
    """TIRG applied on the image's FC feature (the code's `TIRG`)."""

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, embed_dim: int,
                 gate_layers: int = 1) -> None:
        super().__init__(image_encoder, text_encoder)
        width = 2 * embed_dim
        gate: list[nn.Module] = [nn.BatchNorm1d(width), nn.ReLU()]
        if gate_layers == 2:
            gate += [nn.Linear(width, width), nn.ReLU()]
        elif gate_layers != 1:
            raise ValueError(f"gate_layers must be 1 (code) or 2 (paper), got {gate_layers}")
        self.gate = nn.Sequential(*gate, nn.Linear(width, embed_dim))
        self.residual = nn.Sequential(
            nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, embed_dim),
        )
        self.a = _gate_weights()

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([image_features, text_features], dim=1)
        gated = torch.sigmoid(self.gate(joint)) * image_features
        return self.a[0] * gated + self.a[1] * self.residual(joint)


class TIRGLastConv(CIRModel):
    """TIRG on the last conv map (the code's `TIRGLastConv`): the text is tiled over the map,
    gate and residual are `BN2d -> Conv3x3 -> ReLU -> Conv3x3` on [map; text], and the composed
    map goes through the image encoder's own pooling. Targets use the plain image encoder."""

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, embed_dim: int) -> None:
        super().__init__(image_encoder, text_encoder)
        channels = image_encoder.backbone.out_channels
        width = channels + embed_dim

        def branch() -> nn.Sequential:
            return nn.Sequential(
                nn.BatchNorm2d(width), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                nn.Conv2d(width, channels, 3, padding=1),
            )

        self.gate, self.residual = branch(), branch()
        self.a = _gate_weights()

    def encode_queries(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        feature_map = self.image_encoder.feature_map(images)
        text = self.text_encoder(texts)
        tiled = text[:, :, None, None].expand(-1, -1, *feature_map.shape[2:])
        joint = torch.cat([feature_map, tiled], dim=1)
        composed = self.a[0] * torch.sigmoid(self.gate(joint)) * feature_map + self.a[1] * self.residual(joint)
        return self.image_encoder.pool(composed)


@register_model("tirg")
def _tirg(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> TIRG:
    return TIRG(image_encoder, text_encoder, config.embed_dim, **config.options)


@register_model("tirg_lastconv")
def _tirg_lastconv(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> TIRGLastConv:
    return TIRGLastConv(image_encoder, text_encoder, config.embed_dim)
