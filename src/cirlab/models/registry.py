"""One registry of models: `create_model(config, vocab)` builds any registered method."""

from __future__ import annotations

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder, create_backbone
from cirlab.encoders.text import Vocabulary, create_text_encoder
from cirlab.models import baselines, cmap, combiner, lbf, offset, tirg  # noqa: F401  (their decorators register them)
from cirlab.models.base import CIRModel
from cirlab.models.registration import REGISTERED


def available_models() -> list[str]:
    return sorted(REGISTERED)


def build_image_encoder(config: ModelConfig) -> ImageEncoder:
    backbone = create_backbone(config.image_backbone, weights=config.image_weights, upto=config.backbone_upto)
    map_size = tuple(config.map_size) if config.map_size else None
    return ImageEncoder(backbone, out_dim=config.embed_dim, pooling=config.pooling, map_size=map_size,
                        freeze_backbone=config.freeze_backbone)


def create_model(config: ModelConfig, vocab: Vocabulary | None) -> CIRModel:
    """Build the model `config.name` with the encoders its config names."""
    if config.name not in REGISTERED:
        raise ValueError(f"unknown model '{config.name}' (known: {', '.join(sorted(REGISTERED))})")
    image_encoder = build_image_encoder(config)
    text_encoder = create_text_encoder(config.text_encoder, vocab, out_dim=config.embed_dim,
                                       weights=config.text_weights, freeze=config.freeze_text)
    return REGISTERED[config.name](image_encoder, text_encoder, config)
