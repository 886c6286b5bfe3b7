"""Full target features kept beside an index, for the exact stage of two-stage retrieval.

A model whose score no pair of vectors gives exactly (CMAP) is searched in two stages (`cirlab.index.search`): the
backend (any FAISS factory, or Milvus) holds one short vector per image and returns a shortlist, and the
model's `score` ranks the shortlist over the image's full target features, which live here.

One flat file of float32 rows, row r holding the features of the image whose int key is r. Keys only grow
(`next_id`), and rows are written only at keys not yet committed, so a committed row is never overwritten;
a crash leaves at most unreferenced bytes past the last committed row, overwritten by the next write. The
backend's commit syncs this file before its SQLite commit, which stays the single commit point. Removed
images leave their rows behind (rebuild the index to reclaim the space).

Reads map the file and copy only the rows asked for, so a search never holds 1M x (levels x D) floats in
memory, only its shortlist's rows; the operating system's page cache keeps what is read often.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FEATURES_FILE = "features.f32"
_ROW_DTYPE = np.dtype(np.float32)


class FeatureStore:
    """Rows of `width` float32 features by int key, in `folder`/features.f32 (see the module docstring)."""

    def __init__(self, folder: Path, width: int) -> None:
        self.path = Path(folder) / FEATURES_FILE
        self.width = width
        self._row_bytes = width * _ROW_DTYPE.itemsize
        self._mapped: np.memmap | None = None  # created by the first write: opening to search writes nothing

    def write(self, first_key: int, rows: np.ndarray) -> None:
        """Store `rows` (N x width) at keys first_key .. first_key + N - 1."""
        matrix = np.ascontiguousarray(rows, dtype=_ROW_DTYPE)
        if matrix.ndim != 2 or matrix.shape[1] != self.width:
            raise ValueError(f"target features: expected an N x {self.width} array, got shape {matrix.shape}")
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(descriptor, matrix.tobytes(), first_key * self._row_bytes)
        finally:
            os.close(descriptor)
        self._mapped = None  # the file may have grown: map it again on the next read

    def sync(self) -> None:
        """Make every written row durable (the backend calls this before its commit point)."""
        if not self.path.exists():  # nothing written yet
            return
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """The features of `keys` (N x width), copied out of the mapped file."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._mapped is None:
            count = self.disk_bytes // self._row_bytes
            if not count:
                return np.empty((len(keys), self.width), dtype=_ROW_DTYPE)
            self._mapped = np.memmap(self.path, dtype=_ROW_DTYPE, mode="r", shape=(count, self.width))
        return np.asarray(self._mapped[keys])

    @property
    def disk_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0
