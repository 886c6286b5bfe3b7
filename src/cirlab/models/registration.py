"""Where methods register themselves: each method module decorates its factory with `@register_model(name)`.

Kept apart from `registry.py`, which imports every method module, so that no module imports one that
imports it back."""

from __future__ import annotations

from collections.abc import Callable

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder
from cirlab.encoders.text import TextEncoder
from cirlab.models.base import CIRModel

ModelFactory = Callable[[ImageEncoder, TextEncoder, ModelConfig], CIRModel]
REGISTERED: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in REGISTERED:
            raise ValueError(f"model '{name}' is registered twice")
        REGISTERED[name] = factory
        return factory
    return decorator
