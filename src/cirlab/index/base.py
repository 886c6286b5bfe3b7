"""The Index protocol every retrieval backend honours, and the errors they raise.

An index maps string image ids (paths relative to the gallery root) to the vectors
`model.encode_targets` produced for them and ranks them by inner product with query vectors.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


class IndexStoreError(ValueError):
    """An index on disk that cannot be used as asked."""


class IndexMismatchError(IndexStoreError):
    """The index was built for another model (or gallery, or index type) than the one given."""


class IndexFormatError(IndexStoreError):
    """The index folder is missing, damaged, or its parts disagree."""


class UnknownImageError(KeyError):
    """An image id the index does not hold."""

    def __str__(self) -> str:
        # KeyError quotes its message as a repr; a plain sentence reads better in a CLI error.
        return str(self.args[0]) if self.args else ""


@runtime_checkable
class Index(Protocol):
    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        """Store one N x D float vector per id; ids must be new."""

    def remove(self, ids: list[str]) -> None:
        """Forget the given ids; they are never returned by `search` afterwards."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """B x k scores (best first, -inf where fewer than k hits) and the matching ids per query."""

    def __len__(self) -> int:
        """Number of searchable ids."""

    def info(self) -> dict[str, Any]:
        """JSON-ready description: backend, model id, dimension, count, ..."""
