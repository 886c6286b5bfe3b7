"""Method switches: `model.options` read into a method's options dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

Options = TypeVar("Options")


def parse_options(cls: type[Options], options: dict[str, Any], method: str) -> Options:
    """`cls(**options)`, naming every key `cls` does not have (a typo must not silently train the default)."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {method} option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**options)
