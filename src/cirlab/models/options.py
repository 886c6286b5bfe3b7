"""Method switches: `model.options` read into a method's options dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

Options = TypeVar("Options")


def parse_options(cls: type[Options], options: dict[str, Any], method: str,
                  choices: Mapping[str, Sequence[str]] | None = None) -> Options:
    """`cls(**options)`, naming every key `cls` does not have (a typo must not silently train the default) and
    every value outside its `choices` (option name -> allowed values)."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {method} option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    parsed = cls(**options)
    for name, allowed in (choices or {}).items():
        value = getattr(parsed, name)
        if value not in allowed:
            raise ValueError(f"unknown {method} {name} {value!r} (known: {', '.join(allowed)})")
    return parsed
