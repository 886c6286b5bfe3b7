"""A FAISS index on disk: vectors in a FAISS file, ids and metadata in SQLite.

Folder layout:
    index.sqlite (+ -wal, -shm)   id map (int64 <-> image id), HNSW tombstones, metadata
    vectors-<generation>.faiss    the FAISS index of the committed generation named in the metadata
    features.f32                  full target features, for an index created with a feature_dim
                                  (append-only; see cirlab.index.features)

Crash safety: `commit()` first writes a *new* FAISS file (temp name, fsync, rename, fsync the
folder) and syncs the target features, if kept, then commits one SQLite transaction that records the
id-map changes together with that file's name. The SQLite commit is the single commit point: before it,
the old metadata still names the old FAISS file, which is untouched; after it, both name the new state.
FAISS files of other generations (a crashed commit's, or the one just superseded) are deleted by the next
commit.
Changes not committed are lost on a crash or `close()`, by design.

Removal: FAISS `remove_ids` where the index type supports it. HNSW graphs cannot remove, so their
removed ids become tombstones (in SQLite and in memory): the vectors stay in the graph, `search`
fetches k + (number of tombstones) hits and drops tombstoned ones, so a removed id is never returned.
Only one process may write an index at a time; any number may read it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cirlab.index.base import IndexFormatError, IndexMismatchError, UnknownImageError, as_matrix
from cirlab.index.features import FEATURES_FILE
from cirlab.index.store import DB_FILE, FORMAT_VERSION, SCHEMA, StoredIds, connect, read_meta

_OPEN_ATTEMPTS = 5  # a reader can lose a race with a writer deleting the generation it just read
# Exact search of fewer queries than this streams the whole index once per query. FAISS builds here default to
# 128,000, so a server's micro-batch of 8 queries over 100K vectors took 61 ms where one matrix product,
# reading the vectors once, takes 24 ms (one query: 19 ms either way). Process-wide: it is FAISS's setting.
faiss.cvar.distance_compute_blas_threshold = 1


def _vectors_file(generation: int) -> str:
    return f"vectors-{generation:08d}.faiss"


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _build_faiss(dim: int, factory: str) -> faiss.Index:
    """An inner-product index with stable int64 ids: IVF stores ids natively, others get IDMap2."""
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"invalid FAISS factory string {factory!r} ({str(error).splitlines()[-1]})") from None
    if isinstance(base, faiss.IndexIDMap):
        raise ValueError(f"factory {factory!r}: leave out IDMap, ids are mapped by cirlab")
    ivf = faiss.try_extract_index_ivf(base)
    if ivf is None:
        return faiss.IndexIDMap2(base)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by arbitrary id
    return base


def _hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexHNSW) else None


class FaissIndex(StoredIds):
    """Inner-product retrieval over image ids; see the module docstring for the on-disk contract."""

    def __init__(self, folder: Path, index: faiss.Index, connection: sqlite3.Connection,
                 meta: dict[str, str]) -> None:
        self.folder = folder
        self._index = index
        self._db = connection
        self._meta = meta
        rows = connection.execute("SELECT int_id, image_id FROM ids ORDER BY int_id").fetchall()
        self._by_name: dict[str, int] = {name: int_id for int_id, name in rows}
        self._by_int: dict[int, str] = {int_id: name for int_id, name in rows}
        self._tombstones: set[int] = {row[0] for row in connection.execute("SELECT int_id FROM tombstones")}
        self._dirty = False
        self._open_features()

    # -- opening ------------------------------------------------------------------------------

    @staticmethod
    def exists(folder: Path) -> bool:
        """Whether `folder` holds a committed index (a crash inside `create` leaves none)."""
        path = Path(folder) / DB_FILE
        if not path.is_file():
            return False
        connection = connect(path)
        try:
            return "generation" in read_meta(connection)
        finally:
            connection.close()

    @classmethod
    def create(cls, folder: Path, dim: int, model_id: str, factory: str = "Flat",
               gallery_root: Path | None = None, checkpoint: Path | None = None, feature_dim: int = 0) -> FaissIndex:
        """A new, empty index of `dim`-dimensional vectors; with `feature_dim`, one that also keeps each image's
        target features of that width (`cirlab.index.features`)."""
        folder = Path(folder)
        if cls.exists(folder):
            raise FileExistsError(f"{folder}: already holds an index; open it instead")
        index = _build_faiss(dim, factory)
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", FEATURES_FILE):  # a crash inside create
            (folder / leftover).unlink(missing_ok=True)
        connection = connect(folder / DB_FILE)
        connection.executescript(SCHEMA)
        meta = {
            "format_version": str(FORMAT_VERSION), "backend": "faiss", "model_id": model_id, "dim": str(dim),
            "factory": factory, "gallery_root": "" if gallery_root is None else str(Path(gallery_root).resolve()),
            "checkpoint": "" if checkpoint is None else str(Path(checkpoint).resolve()),
            "generation": "-1", "count": "0", "next_id": "0", "feature_dim": str(feature_dim),
        }
        created = cls(folder, index, connection, meta)
        created._dirty = True
        created.commit()  # generation 0: the empty index is a committed state like any other
        return created

    @classmethod
    def open(cls, folder: Path, model_id: str | None = None) -> FaissIndex:
        """Open the last committed state; with `model_id`, refuse an index built by another model."""
        folder = Path(folder)
        if not cls.exists(folder):
            raise IndexFormatError(f"{folder}: no cirlab index here (missing or incomplete {DB_FILE})")
        connection = connect(folder / DB_FILE)
        try:
            meta, index = cls._load_committed(folder, connection)
            if model_id is not None and meta["model_id"] != model_id:
                raise IndexMismatchError(f"{folder}: index was built with model {meta['model_id']}, "
                                         f"but model {model_id} was given; rebuild the index for this model")
            return cls(folder, index, connection, meta)
        except BaseException:
            connection.close()
            raise

    @staticmethod
    def _load_committed(folder: Path, connection: sqlite3.Connection) -> tuple[dict[str, str], faiss.Index]:
        for _ in range(_OPEN_ATTEMPTS):
            # One read transaction: metadata and row counts come from the same committed state.
            connection.execute("BEGIN")
            try:
                meta = read_meta(connection)
                rows = connection.execute("SELECT (SELECT COUNT(*) FROM ids) + (SELECT COUNT(*) FROM tombstones)")
                stored_rows = rows.fetchone()[0]
            finally:
                connection.execute("COMMIT")
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise IndexFormatError(f"{folder}: index format {meta.get('format_version')!r} "
                                       f"is not {FORMAT_VERSION}")
            path = folder / _vectors_file(int(meta["generation"]))
            if not path.is_file():
                continue  # a writer committed a newer generation meanwhile; read its metadata
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as error:
                raise IndexFormatError(f"{path}: unreadable FAISS file ({str(error).splitlines()[-1]})") from None
            counts = {"FAISS vectors": index.ntotal, "metadata count": int(meta["count"]), "id rows": stored_rows}
            if len(set(counts.values())) != 1 or index.d != int(meta["dim"]):
                raise IndexFormatError(f"{folder}: index parts disagree ({counts}, dim {index.d} vs {meta['dim']})")
            return meta, index
        raise IndexFormatError(f"{folder}: committed FAISS file keeps disappearing (is another writer running?)")

    # -- writing ------------------------------------------------------------------------------

    def _begin(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write

    def add(self, ids: list[str], vectors: np.ndarray, features: np.ndarray | None = None) -> None:
        matrix, features = self._checked_additions(ids, vectors, features)
        if not ids:
            return
        if not self._index.is_trained:
            self._train(matrix)
        first = int(self._meta["next_id"])
        int_ids = np.arange(first, first + len(ids), dtype=np.int64)
        self._begin()
        self._index.add_with_ids(matrix, int_ids)
        self._write_features(first, features)
        self._db.executemany("INSERT INTO ids (int_id, image_id) VALUES (?, ?)",
                             zip(int_ids.tolist(), ids, strict=True))
        for int_id, name in zip(int_ids.tolist(), ids, strict=True):
            self._by_name[name] = int_id
            self._by_int[int_id] = name
        self._meta["next_id"] = str(first + len(ids))
        self._dirty = True

    def _train(self, matrix: np.ndarray) -> None:
        try:
            self._index.train(matrix)
        except RuntimeError as error:
            reason = str(error).rsplit("failed: ", 1)[-1].strip()
            raise ValueError(f"index type {self._meta['factory']!r} is trained on the first batch added, and "
                             f"{len(matrix)} vectors are too few: {reason}") from None

    def remove(self, ids: list[str]) -> None:
        unknown = [name for name in ids if name not in self._by_name]
        if unknown:
            raise UnknownImageError(f"not in the index at {self.folder}: {', '.join(unknown[:5])}")
        int_ids = np.array([self._by_name[name] for name in set(ids)], dtype=np.int64)
        if not len(int_ids):
            return
        self._begin()
        try:
            self._index.remove_ids(int_ids)
        except RuntimeError:  # FAISS raises before changing anything for types that cannot remove (HNSW)
            self._db.executemany("INSERT INTO tombstones (int_id) VALUES (?)", ((i,) for i in int_ids.tolist()))
            self._tombstones.update(int_ids.tolist())
        self._db.executemany("DELETE FROM ids WHERE int_id = ?", ((i,) for i in int_ids.tolist()))
        for int_id in int_ids.tolist():
            del self._by_name[self._by_int.pop(int_id)]
        self._dirty = True

    def commit(self) -> None:
        """Make every change since the last commit durable, atomically (see the module docstring)."""
        if not self._dirty:
            return
        generation = int(self._meta["generation"]) + 1
        name = _vectors_file(generation)
        temp = self.folder / f".{name}.tmp"
        faiss.write_index(self._index, str(temp))
        _fsync_path(temp)
        os.replace(temp, self.folder / name)
        _fsync_path(self.folder)
        self._sync_features()
        self._meta.update(generation=str(generation), count=str(self._index.ntotal))
        self._begin()
        self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", self._meta.items())
        self._db.execute("COMMIT")
        self._dirty = False
        self._delete_other_generations(name)

    def _delete_other_generations(self, current: str) -> None:
        for path in self.folder.glob("vectors-*.faiss"):
            if path.name != current:
                path.unlink(missing_ok=True)
        for path in self.folder.glob(".vectors-*.faiss.tmp"):
            path.unlink(missing_ok=True)

    # -- reading ------------------------------------------------------------------------------

    @property
    def factory(self) -> str:
        return self._meta["factory"]


    def set_search_parameters(self, parameters: str) -> None:
        """FAISS search-time settings for this open index, e.g. "nprobe=16" (IVF) or "efSearch=64" (HNSW);
        not stored: each opening starts from FAISS's defaults."""
        try:
            faiss.ParameterSpace().set_index_parameters(self._index, parameters)
        except RuntimeError as error:
            raise ValueError(f"FAISS search parameters {parameters!r} do not apply to this {self.factory} index "
                             f"({str(error).splitlines()[-1]})") from None

    def reconstruct(self, ids: Iterable[str]) -> np.ndarray:
        """The stored vectors of `ids` (N x D), e.g. for exact rescoring."""
        names = list(ids)
        unknown = [name for name in names if name not in self._by_name]
        if unknown:
            raise UnknownImageError(f"not in the index at {self.folder}: {', '.join(unknown[:5])}")
        vectors = np.empty((len(names), int(self._meta["dim"])), dtype=np.float32)
        for row, name in enumerate(names):
            vectors[row] = self._index.reconstruct(self._by_name[name])
        return vectors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        matrix = as_matrix(queries, int(self._meta["dim"]), "queries")
        k = min(k, len(self))
        scores = np.full((len(matrix), k), -np.inf, dtype=np.float32)
        if k <= 0:
            return scores, [[] for _ in matrix]
        fetch = min(k + len(self._tombstones), self._index.ntotal)
        hnsw = _hnsw(self._index)
        if hnsw is not None:
            hnsw.hnsw.efSearch = max(hnsw.hnsw.efSearch, fetch)  # a beam narrower than k cannot return k
        raw_scores, labels = self._index.search(matrix, fetch)
        names: list[list[str]] = []
        for row, (row_scores, row_labels) in enumerate(zip(raw_scores, labels, strict=True)):
            hits = [(float(score), int(label)) for score, label in zip(row_scores, row_labels, strict=True)
                    if label != -1 and label not in self._tombstones][:k]
            scores[row, :len(hits)] = [score for score, _ in hits]
            names.append([self._by_int[label] for _, label in hits])
        return scores, names

    def info(self) -> dict[str, Any]:
        return {
            "backend": "faiss", "folder": str(self.folder), "model_id": self.model_id, "dim": int(self._meta["dim"]),
            "factory": self.factory, "count": len(self), "tombstones": len(self._tombstones),
            "trained": bool(self._index.is_trained), "generation": int(self._meta["generation"]),
            "gallery_root": self._meta["gallery_root"] or None, "uncommitted_changes": self._dirty,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None, **self._feature_info(),
        }
