"""The SQLite side every index backend shares: image ids <-> int64 keys, tombstones, metadata.

The SQLite commit is each backend's single commit point (see faiss_index.py and milvus_index.py).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Self

import numpy as np

from cirlab.index.base import IndexFormatError, IndexStoreError, UnknownImageError, as_matrix
from cirlab.index.features import FeatureStore

DB_FILE = "index.sqlite"
FORMAT_VERSION = 1
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ids (int_id INTEGER PRIMARY KEY, image_id TEXT NOT NULL UNIQUE);
CREATE TABLE tombstones (int_id INTEGER PRIMARY KEY);
"""


def connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened and committed explicitly, never implicitly.
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA busy_timeout=10000")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")  # a returned COMMIT survives power loss
    except sqlite3.DatabaseError as error:
        connection.close()
        raise IndexFormatError(f"{path}: not a readable SQLite database ({error})") from None
    return connection


def read_meta(connection: sqlite3.Connection) -> dict[str, str]:
    try:
        return dict(connection.execute("SELECT key, value FROM meta"))
    except sqlite3.OperationalError:  # no meta table yet: a crash inside `create`
        return {}


def repeated_ids(ids: list[str]) -> set[str]:
    return {name for name, count in Counter(ids).items() if count > 1}


class StoredIds:
    """The read side of the id map every backend keeps in memory, and the SQLite handle behind it.

    Subclasses fill `folder`, `_db` (the connection), `_meta` (the meta table), `_by_name` (image id -> int
    key) and `_by_int` (int key -> image id, searchable ids only), then call `_open_features`. An index
    created with a `feature_dim` also keeps each image's full target features (`cirlab.index.features`),
    written by `add` and made durable by the backend's `commit` through `_sync_features`."""

    folder: Path
    _db: sqlite3.Connection
    _meta: dict[str, str]
    _by_name: dict[str, int]
    _by_int: dict[int, str]
    _features: FeatureStore | None

    def _open_features(self) -> None:
        width = self.feature_dim
        self._features = FeatureStore(self.folder, width) if width else None

    def _checked_additions(self, ids: list[str], vectors: np.ndarray,
                           features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The vectors (and target features) of new, distinct `ids` as float32 matrices; anything else is
        refused before any write."""
        matrix = as_matrix(vectors, self.dim, "vectors")
        if len(ids) != len(matrix):
            raise ValueError(f"{len(ids)} ids for {len(matrix)} vectors")
        if (features is None) != (self._features is None):
            raise ValueError("this index keeps target features: give them with the vectors" if features is None
                             else "this index keeps no target features (it was created without a feature_dim)")
        if features is not None:
            features = as_matrix(features, self.feature_dim, "target features")
            if len(features) != len(ids):
                raise ValueError(f"{len(ids)} ids for {len(features)} rows of target features")
        duplicates = sorted({name for name in ids if name in self._by_name} | repeated_ids(ids))
        if duplicates:
            raise ValueError(f"ids already in the index or repeated: {', '.join(duplicates[:5])}")
        return matrix, features

    def _write_features(self, first_key: int, features: np.ndarray | None) -> None:
        if features is not None:  # `_checked_additions` gave them exactly when the index keeps them
            self._features.write(first_key, features)

    def _sync_features(self) -> None:
        if self._features is not None:
            self._features.sync()

    @property
    def dim(self) -> int:
        return int(self._meta["dim"])

    @property
    def feature_dim(self) -> int:
        """Width of the stored target features; 0 for an index that keeps only its vectors."""
        return int(self._meta.get("feature_dim", "0"))

    def features_of(self, ids: list[str]) -> np.ndarray:
        """The stored target features of `ids` (N x feature_dim), read from disk row by row."""
        if self._features is None:
            raise IndexStoreError(f"{self.folder}: this index keeps no target features for exact rescoring "
                                  "(built before two-stage retrieval, or for a cosine model); rebuild it")
        unknown = [name for name in ids if name not in self._by_name]
        if unknown:
            raise UnknownImageError(f"not in the index at {self.folder}: {', '.join(unknown[:5])}")
        return self._features.rows(np.array([self._by_name[name] for name in ids], dtype=np.int64))

    def _feature_info(self) -> dict[str, int]:
        return {"feature_dim": self.feature_dim,
                "feature_bytes": self._features.disk_bytes if self._features is not None else 0}

    def close(self) -> None:
        """Release the database; uncommitted changes are discarded."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._by_name

    def ids(self) -> list[str]:
        """Every searchable id, in insertion order."""
        return [self._by_int[int_id] for int_id in sorted(self._by_int)]

    @property
    def model_id(self) -> str:
        return self._meta["model_id"]

    @property
    def gallery_root(self) -> Path | None:
        return Path(self._meta["gallery_root"]) if self._meta["gallery_root"] else None

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint folder the index was built with, where it recorded one."""
        recorded = self._meta.get("checkpoint")
        return Path(recorded) if recorded else None
