"""TIRG's baselines: image only, text only and concatenation (the TIRG code's `imgonly`,
`textonly` and `concat`)."""

from __future__ import annotations

import torch
from torch import nn

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder
from cirlab.encoders.text import TextEncoder
from cirlab.models.base import CIRModel, VectorCompositionModel
from cirlab.models.registration import register_model


class ImageOnly(CIRModel):
    """The query is the reference image's feature; the text is ignored."""

    def encode_queries(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.image_encoder(images)

    composes_image_features = True

    def queries_from_image_features(self, image_features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return image_features


class TextOnly(CIRModel):
    """The query is the text's feature; the reference image is ignored."""

    def encode_queries(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.text_encoder(texts)

    composes_image_features = True

    def queries_from_image_features(self, image_features: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.text_encoder(texts)


class Concat(VectorCompositionModel):
    """[x; t] -> BN -> ReLU -> Linear(2D, 2D) -> BN -> ReLU -> Dropout(0.1) -> Linear(2D, D)."""

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, embed_dim: int) -> None:
        super().__init__(image_encoder, text_encoder)
        width = 2 * embed_dim
        self.fuse = nn.Sequential(
            nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width),
            nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, embed_dim),
        )

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([image_features, text_features], dim=1))


@register_model("image_only")
def _image_only(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> ImageOnly:
    return ImageOnly(image_encoder, text_encoder)


@register_model("text_only")
def _text_only(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> TextOnly:
    return TextOnly(image_encoder, text_encoder)


@register_model("concat")
def _concat(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> Concat:
    return Concat(image_encoder, text_encoder, config.embed_dim)
