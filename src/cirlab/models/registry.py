"""One registry of models: `create_model(config, vocab)` builds any registered method."""

from __future__ import annotations

from collections.abc import Callable

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder, create_backbone
from cirlab.encoders.text import TextEncoder, Vocabulary, create_text_encoder
from cirlab.models.base import CIRModel

ModelFactory = Callable[[ImageEncoder, TextEncoder, ModelConfig], CIRModel]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = factory
        return factory
    return decorator


def available_models() -> list[str]:
    _import_builtin_models()
    return sorted(_REGISTRY)


def build_image_encoder(config: ModelConfig) -> ImageEncoder:
    backbone = create_backbone(config.image_backbone, weights=config.image_weights, upto=config.backbone_upto)
    map_size = tuple(config.map_size) if config.map_size else None
    return ImageEncoder(backbone, out_dim=config.embed_dim, pooling=config.pooling, map_size=map_size,
                        freeze_backbone=config.freeze_backbone)


def create_model(config: ModelConfig, vocab: Vocabulary | None) -> CIRModel:
    """Build the model `config.name` with the encoders its config names."""
    _import_builtin_models()
    if config.name not in _REGISTRY:
        raise ValueError(f"unknown model '{config.name}' (known: {', '.join(sorted(_REGISTRY))})")
    image_encoder = build_image_encoder(config)
    text_encoder = create_text_encoder(config.text_encoder, vocab, out_dim=config.embed_dim,
                                       weights=config.text_weights, freeze=config.freeze_text)
    return _REGISTRY[config.name](image_encoder, text_encoder, config)


def _import_builtin_models() -> None:
    # Importing the method modules runs their @register_model decorators.
    from cirlab.models import baselines, cmap, combiner, lbf, offset, tirg  # noqa: F401
