"""The CLIP4Cir Combiner (Baldrati et al., CVPRW 2022 / TOMM 2023), as in the public CLIP4Cir code.

Query = normalise(output_layer(c) + s * t + (1 - s) * v) for image feature v and text feature t, where
- t' = Dropout(ReLU(Linear_t(t))), v' = Dropout(ReLU(Linear_v(v))) (projection_dim each), r = [t'; v'] (text first);
- c = Dropout(ReLU(Linear(2 x projection_dim -> hidden_dim)(r))), output_layer: hidden_dim -> feature dim;
- s = sigmoid(Linear(ReLU-Dropout(Linear(2 x projection_dim -> hidden_dim)(r)) -> 1)), the learned scalar gate
  mixing the raw text and image features. Every dropout is 0.5.
Targets are the plain image features; training is cross-entropy over 100 x cosine(query, target) in the batch
(`train.loss: batch_classification`, with `loss_features` applying the fixed logit scale 100).
The code's sizes: projection_dim = 4 x and hidden_dim = 8 x the feature dimension (RN50x4: 640 -> 2560, 5120).

`options.fusion: sum` is CLIP4Cir's first stage instead (fine-tuning the CLIP towers with the query
normalise(v + t) and the same loss); its second stage trains the Combiner on the frozen fine-tuned towers
(`model.image_weights` / `model.text_weights` = the first stage's model.safetensors, see cirlab.encoders.clip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder
from cirlab.encoders.text import TextEncoder
from cirlab.models.base import VectorCompositionModel
from cirlab.models.registration import register_model

FUSIONS: tuple[str, ...] = ("combiner", "sum")


def _projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))


class Combiner(VectorCompositionModel):
    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, projection_dim: int | None = None,
                 hidden_dim: int | None = None, dropout: float = 0.5, logit_scale: float = 100.0,
                 fusion: str = "combiner") -> None:
        super().__init__(image_encoder, text_encoder)
        dim = image_encoder.out_dim
        if text_encoder.out_dim != dim:  # the gate mixes the raw features, so they must share a space
            raise ValueError(f"the Combiner mixes image and text features of one size: the image encoder gives "
                             f"{dim}, the text encoder {text_encoder.out_dim}")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown Combiner fusion {fusion!r}; known: {', '.join(FUSIONS)}")
        self.fusion = fusion
        self.logit_scale = logit_scale
        if fusion == "sum":
            return
        projection_dim = projection_dim or 4 * dim
        hidden_dim = hidden_dim or 8 * dim
        self.text_projection = _projection(dim, projection_dim, dropout)
        self.image_projection = _projection(dim, projection_dim, dropout)
        self.combiner_layer = _projection(2 * projection_dim, hidden_dim, dropout)
        self.output_layer = nn.Linear(hidden_dim, dim)
        self.dynamic_scalar = nn.Sequential(_projection(2 * projection_dim, hidden_dim, dropout),
                                            nn.Linear(hidden_dim, 1), nn.Sigmoid())

    def compose(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        if self.fusion == "sum":
            return F.normalize(image_features + text_features, dim=-1)
        projected = torch.cat([self.text_projection(text_features), self.image_projection(image_features)], dim=-1)
        gate = self.dynamic_scalar(projected)
        output = self.output_layer(self.combiner_layer(projected)) + gate * text_features \
            + (1 - gate) * image_features
        return F.normalize(output, dim=-1)

    def loss_features(self, queries: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed logit scale on the query side, so batch classification is CE(100 x cosine)."""
        return self.logit_scale * F.normalize(queries, dim=-1), F.normalize(candidates, dim=-1)


@register_model("combiner")
def _combiner(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> Combiner:
    return Combiner(image_encoder, text_encoder, **config.options)
