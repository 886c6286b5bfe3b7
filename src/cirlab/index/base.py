"""The Index protocol every retrieval backend honours, and the errors they raise.

An index maps string image ids (paths relative to the gallery root) to the vectors
`model.encode_targets` produced for them and ranks them by inner product with query vectors. For a model
with its own per-pair score the vectors are the model's shortlist projection, and the index also keeps the
full target features for the exact stage (`cirlab.index.search`).
"""

from __future__ import annotations

from pathlib import Path
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


def as_matrix(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    """`vectors` as a C-contiguous float32 N x `dim` array; a wrong shape or a NaN is refused, naming `what`."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"{what}: expected an N x {dim} array, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return matrix


@runtime_checkable
class Index(Protocol):
    """A folder on disk (`folder`) that `cirlab.index.build.open_index` reopens with the right backend.

    Writes become durable, atomically, at `commit()`; `close()` discards uncommitted ones.
    """

    folder: Path

    @property
    def model_id(self) -> str:
        """Identity of the checkpoint whose target encoder made the vectors (`build.model_identity`)."""

    @property
    def gallery_root(self) -> Path | None:
        """The folder the image ids are relative to, where one was recorded."""

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint folder the index was built with, where one was recorded."""

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors (and of the query vectors a search takes)."""

    @property
    def feature_dim(self) -> int:
        """Width of the full target features kept for exact rescoring; 0 where the index keeps none."""

    def add(self, ids: list[str], vectors: np.ndarray, features: np.ndarray | None = None) -> None:
        """Store one N x D float vector per id, and for an index with a `feature_dim` its N x feature_dim
        target features; ids must be new."""

    def features_of(self, ids: list[str]) -> np.ndarray:
        """The kept target features of `ids` (N x feature_dim)."""

    def remove(self, ids: list[str]) -> None:
        """Forget the given ids; they are never returned by `search` afterwards."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """B x k scores (best first, -inf where fewer than k hits) and the matching ids per query."""

    def __len__(self) -> int:
        """Number of searchable ids."""

    def __contains__(self, image_id: object) -> bool:
        """Whether `image_id` is searchable."""

    def ids(self) -> list[str]:
        """Every searchable id, in insertion order."""

    def commit(self) -> None:
        """Make every change since the last commit durable, atomically."""

    def close(self) -> None:
        """Release the index; uncommitted changes are discarded."""

    def __enter__(self) -> Index:
        """The index itself, closed when the `with` block ends."""

    def __exit__(self, *exc: object) -> None:
        """Close the index."""

    def info(self) -> dict[str, Any]:
        """JSON-ready description: backend, model id, dimension, count, ..."""
