"""An index whose vectors live in a Milvus collection; ids and metadata stay in the local index folder.

Folder layout: `index.sqlite`, with the tables of the FAISS backend (meta, ids, tombstones), and for an
index created with a feature_dim `features.f32`, the full target features (`cirlab.index.features`).
Its metadata records backend=milvus, the server URI and the collection name, so `open` needs only the
folder. An access token is never written anywhere: it is read from $CIRLAB_MILVUS_TOKEN.

Collection: an INT64 primary key `id` (SQLite maps it to the image id; ints keep the collection small
and let a search filter by id range) and a FLOAT_VECTOR `vector`, under an exact FLAT index with the
inner-product metric, so rankings and scores equal FAISS `Flat`. The collection's description records the
model id, so a collection filled by another model is refused.

Consistency (`consistency`, chosen when the index is opened for searching; see CONSISTENCY_LEVELS): Strong,
the default, makes every search wait until the server has applied every write acknowledged before it, which
costs each search a round of synchronisation with the server (benchmarks/search_speed.py measures it).
Bounded, Session and Eventually search what the server has applied so far: an image added or removed moments
ago may be missing or still found. A stale hit of a removed image is dropped (so a search may return fewer
than k hits within that window); under Strong such a hit cannot occur, so it is an error that names the other
writer.

Commit point: the SQLite transaction, as for FAISS. `add` writes rows to Milvus at once (the writer's
own searches see them), but only committed ids are searchable by others:
  - new rows get ids from the committed `next_id` upwards, and searches filter `id < next_id`;
    rows at or above the committed `next_id` (a crashed writer's) are deleted when a writer starts;
  - removed ids become tombstones, committed with the id map, then deleted from Milvus and cleared.
    Searches filter tombstones out too, so a crash between those steps never brings a removed image
    back, and the next commit finishes the deletion.
Only one process may write an index at a time; any number may read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from cirlab.index.base import IndexFormatError, IndexMismatchError, IndexStoreError, UnknownImageError, as_matrix
from cirlab.index.features import FEATURES_FILE
from cirlab.index.store import DB_FILE, FORMAT_VERSION, SCHEMA, StoredIds, connect, read_meta

TOKEN_ENV = "CIRLAB_MILVUS_TOKEN"
MAX_K = 16384  # Milvus refuses a larger top-k
CONNECT_TIMEOUT_S = 10.0
_ROWS_PER_REQUEST = 1000  # rows per upsert and queries per search: far below Milvus's 64 MiB message cap
_IDS_PER_DELETE = 10000
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_MARKER = "cirlab_model_id"  # key of the collection description's JSON
# Milvus's levels: what a search may miss, in the words of the Milvus documentation's definitions.
CONSISTENCY_LEVELS = {
    "Strong": "sees every write acknowledged before the search (the default; the slowest)",
    "Bounded": "may miss writes of the last few seconds (the server's graceful time, 5 s by default)",
    "Session": "sees this client's own writes; may miss other clients' recent ones",
    "Eventually": "may miss any recent write; the fastest",
}


def check_consistency(level: str) -> None:
    if level not in CONSISTENCY_LEVELS:
        raise ValueError(f"unknown Milvus consistency level {level!r} (known: {', '.join(CONSISTENCY_LEVELS)})")


def default_collection(folder: Path) -> str:
    """`cirlab_<folder name>_<hash of its absolute path>`: distinct index folders, distinct collections."""
    resolved = Path(folder).resolve()
    stem = re.sub(r"[^A-Za-z0-9_]", "_", resolved.name)[:64]
    return f"cirlab_{stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


@contextmanager
def _milvus_errors(where: str) -> Iterator[None]:
    """Milvus failures as IndexStoreError naming the server and collection (the CLI reports those)."""
    try:
        yield
    except MilvusException as error:
        raise IndexStoreError(f"{where}: {error.message}") from None


def _client(uri: str) -> MilvusClient:
    with _milvus_errors(f"cannot use the Milvus server at {uri}"):
        return MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""), timeout=CONNECT_TIMEOUT_S)


def _collection_model(client: MilvusClient, name: str, where: str) -> tuple[str, int] | None:
    """(model id, dimension) of a collection cirlab made; None where there is no such collection."""
    if not client.has_collection(name):
        return None
    described = client.describe_collection(name)
    try:
        model_id = json.loads(described["description"])[_MARKER]
        dim = next(int(field["params"]["dim"]) for field in described["fields"] if field["name"] == "vector")
    except (ValueError, KeyError, TypeError, StopIteration):
        raise IndexStoreError(f"{where}: collection exists but was not made by cirlab; "
                              "choose another collection name") from None
    return model_id, dim


def _load(client: MilvusClient, name: str) -> None:
    """Load the collection into the server's memory where it is released: only then can it be queried."""
    if client.get_load_state(name)["state"].name != "Loaded":
        client.load_collection(name)


def _create_collection(client: MilvusClient, name: str, dim: int, model_id: str) -> None:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                        description=json.dumps({_MARKER: model_id}))
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")  # exact, like FAISS Flat
    client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")


class MilvusIndex(StoredIds):
    """Inner-product retrieval over image ids with vectors in Milvus; see the module docstring."""

    def __init__(self, folder: Path, client: MilvusClient, connection: sqlite3.Connection,
                 meta: dict[str, str], rows: list[tuple[int, str]], tombstones: set[int],
                 consistency: str = "Strong") -> None:
        self.folder = folder
        self.consistency = consistency
        self._client = client
        self._db = connection
        self._meta = meta
        self._by_name: dict[str, int] = {name: int_id for int_id, name in rows}
        self._by_int: dict[int, str] = {int_id: name for int_id, name in rows}
        self._tombstones = tombstones
        self._where = f"Milvus at {meta['uri']}, collection {meta['collection']}"
        self._dirty = False
        self._open_features()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: Path, dim: int, model_id: str, uri: str, collection: str | None = None,
               gallery_root: Path | None = None, checkpoint: Path | None = None, feature_dim: int = 0) -> MilvusIndex:
        """A new, empty index in `folder` with its vectors in `collection` (default: named after the folder);
        with `feature_dim`, one that also keeps each image's target features of that width in `folder`.

        An existing collection is taken over only where cirlab made it for this model and dimension
        and it is empty (a crash inside `create` leaves one); otherwise creating is refused.
        """
        folder = Path(folder)
        name = collection or default_collection(folder)
        if not _COLLECTION_NAME.fullmatch(name):
            raise ValueError(f"Milvus collection name {name!r}: use at most 255 letters, digits and "
                             "underscores, not starting with a digit")
        path = folder / DB_FILE
        if path.is_file():
            connection = connect(path)
            try:
                if "backend" in read_meta(connection):
                    raise FileExistsError(f"{folder}: already holds an index; open it instead")
            finally:
                connection.close()
        client = _client(uri)
        where = f"Milvus at {uri}, collection {name}"
        try:
            with _milvus_errors(where):
                found = _collection_model(client, name, where)
                if found is None:
                    _create_collection(client, name, dim, model_id)
                elif found != (model_id, dim):
                    raise IndexMismatchError(f"{where}: holds vectors of model {found[0]} (dimension {found[1]}), "
                                             f"not of model {model_id} (dimension {dim}); choose another collection")
                else:
                    _load(client, name)  # a leftover collection may be released (a server restart does that)
                    stored = client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"]
                    if stored:
                        raise FileExistsError(f"{where}: already holds {stored} vectors of another index folder; "
                                              "choose another collection or drop this one")
            folder.mkdir(parents=True, exist_ok=True)
            for leftover in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", FEATURES_FILE):  # a crash inside create
                (folder / leftover).unlink(missing_ok=True)
            connection = connect(path)
            meta = {
                "format_version": str(FORMAT_VERSION), "backend": "milvus", "model_id": model_id, "dim": str(dim),
                "uri": uri, "collection": name, "count": "0", "next_id": "0", "feature_dim": str(feature_dim),
                "gallery_root": "" if gallery_root is None else str(Path(gallery_root).resolve()),
                "checkpoint": "" if checkpoint is None else str(Path(checkpoint).resolve()),
            }
            connection.executescript(SCHEMA)
            connection.execute("BEGIN IMMEDIATE")  # the metadata is the commit point of `create`
            connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
            connection.execute("COMMIT")
        except BaseException:
            client.close()
            raise
        return cls(folder, client, connection, meta, [], set())

    @classmethod
    def open(cls, folder: Path, model_id: str | None = None, consistency: str = "Strong") -> MilvusIndex:
        """Open the last committed state; with `model_id`, refuse an index built by another model. Searches
        run at `consistency` (CONSISTENCY_LEVELS; see the module docstring)."""
        check_consistency(consistency)
        folder = Path(folder)
        if not (folder / DB_FILE).is_file():
            raise IndexFormatError(f"{folder}: no cirlab index here (missing {DB_FILE})")
        connection = connect(folder / DB_FILE)
        try:
            connection.execute("BEGIN")  # metadata, ids and tombstones of one committed state
            try:
                meta = read_meta(connection)
                rows = connection.execute("SELECT int_id, image_id FROM ids ORDER BY int_id").fetchall()
                tombstones = {row[0] for row in connection.execute("SELECT int_id FROM tombstones")}
            finally:
                connection.execute("COMMIT")
            if meta.get("backend") != "milvus" or meta.get("format_version") != str(FORMAT_VERSION):
                raise IndexFormatError(f"{folder}: not a Milvus index of format {FORMAT_VERSION} (backend "
                                       f"{meta.get('backend')!r}, format {meta.get('format_version')!r})")
            if model_id is not None and meta["model_id"] != model_id:
                raise IndexMismatchError(f"{folder}: index was built with model {meta['model_id']}, "
                                         f"but model {model_id} was given; rebuild the index for this model")
            index = cls(folder, _client(meta["uri"]), connection, meta, rows, tombstones, consistency)
        except BaseException:
            connection.close()
            raise
        try:
            index._check_collection()
        except BaseException:
            index.close()
            raise
        return index

    def _check_collection(self) -> None:
        name, dim = self._meta["collection"], int(self._meta["dim"])
        with _milvus_errors(self._where):
            found = _collection_model(self._client, name, self._where)
            if found is None:
                raise IndexFormatError(f"{self._where}: the collection of the index at {self.folder} is gone")
            if found != (self.model_id, dim):
                raise IndexMismatchError(f"{self._where}: holds vectors of model {found[0]} (dimension {found[1]}), "
                                         f"but the index at {self.folder} is of model {self.model_id} "
                                         f"(dimension {dim})")
            _load(self._client, name)
            stored = self._client.query(name, filter=self._visible(), output_fields=["count(*)"])[0]["count(*)"]
        if stored != len(self):
            raise IndexFormatError(f"{self.folder}: index parts disagree ({len(self)} ids in {DB_FILE}, "
                                   f"{stored} of their vectors in {self._where})")

    # -- writing ------------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._db.in_transaction:
            return
        self._db.execute("BEGIN IMMEDIATE")  # the write lock first: from here on no other writer runs
        try:
            with _milvus_errors(self._where):  # rows a writer added but never committed
                self._client.delete(self._meta["collection"], filter=f"id >= {int(self._meta['next_id'])}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def add(self, ids: list[str], vectors: np.ndarray, features: np.ndarray | None = None) -> None:
        matrix, features = self._checked_additions(ids, vectors, features)
        if not ids:
            return
        self._begin()
        first = int(self._meta["next_id"])
        int_ids = list(range(first, first + len(ids)))
        with _milvus_errors(self._where):
            for start in range(0, len(ids), _ROWS_PER_REQUEST):
                rows = zip(int_ids[start:start + _ROWS_PER_REQUEST], matrix[start:start + _ROWS_PER_REQUEST],
                           strict=True)
                # Upsert, not insert: if a request fails half-way, the next add reuses these ids and
                # overwrites whatever rows did arrive, instead of leaving duplicate keys behind.
                self._client.upsert(self._meta["collection"], [{"id": i, "vector": row} for i, row in rows])
        self._write_features(first, features)
        self._db.executemany("INSERT INTO ids (int_id, image_id) VALUES (?, ?)", zip(int_ids, ids, strict=True))
        self._by_name.update(zip(ids, int_ids, strict=True))
        self._by_int.update(zip(int_ids, ids, strict=True))
        self._meta["next_id"] = str(first + len(ids))
        self._dirty = True

    def remove(self, ids: list[str]) -> None:
        unknown = [name for name in ids if name not in self._by_name]
        if unknown:
            raise UnknownImageError(f"not in the index at {self.folder}: {', '.join(unknown[:5])}")
        int_ids = sorted({self._by_name[name] for name in ids})
        if not int_ids:
            return
        self._begin()
        self._db.executemany("INSERT INTO tombstones (int_id) VALUES (?)", ((i,) for i in int_ids))
        self._db.executemany("DELETE FROM ids WHERE int_id = ?", ((i,) for i in int_ids))
        self._tombstones.update(int_ids)
        for int_id in int_ids:
            del self._by_name[self._by_int.pop(int_id)]
        self._dirty = True

    def commit(self) -> None:
        """Make every change since the last commit durable, atomically (see the module docstring)."""
        if self._db.in_transaction:  # a write began (one that failed half-way changed nothing but this)
            self._meta["count"] = str(len(self))
            self._sync_features()
            self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", self._meta.items())
            self._db.execute("COMMIT")
            self._dirty = False
        if self._tombstones:
            self._purge_tombstones()

    def _purge_tombstones(self) -> None:
        doomed = sorted(self._tombstones)
        with _milvus_errors(self._where):
            for start in range(0, len(doomed), _IDS_PER_DELETE):
                self._client.delete(self._meta["collection"], ids=doomed[start:start + _IDS_PER_DELETE])
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM tombstones")
        self._db.execute("COMMIT")
        self._tombstones.clear()

    def close(self) -> None:
        """Release the database and the connection; uncommitted changes are discarded."""
        super().close()
        self._client.close()

    # -- reading ------------------------------------------------------------------------------

    def _visible(self) -> str:
        """Milvus filter matching exactly the rows of this index's searchable ids."""
        expression = f"id < {int(self._meta['next_id'])}"
        return expression + (f" and id not in {sorted(self._tombstones)}" if self._tombstones else "")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        matrix = as_matrix(queries, int(self._meta["dim"]), "queries")
        k = min(k, len(self))
        if k > MAX_K:
            raise ValueError(f"k={k}: Milvus returns at most {MAX_K} hits per query")
        scores = np.full((len(matrix), max(k, 0)), -np.inf, dtype=np.float32)
        names: list[list[str]] = []
        if k <= 0:
            return scores, [[] for _ in matrix]
        with _milvus_errors(self._where):
            for start in range(0, len(matrix), _ROWS_PER_REQUEST):
                names.extend(self._search_rows(matrix[start:start + _ROWS_PER_REQUEST], k, scores[start:]))
        return scores, names

    def _search_rows(self, matrix: np.ndarray, k: int, scores: np.ndarray) -> list[list[str]]:
        """Search one request's queries, writing their scores into the first rows of `scores`."""
        results = self._client.search(self._meta["collection"], data=matrix, limit=k, filter=self._visible(),
                                      anns_field="vector", search_params={"metric_type": "IP"},
                                      consistency_level=self.consistency)
        names: list[list[str]] = []
        for row, hits in enumerate(results):
            if self.consistency != "Strong":  # a removal the server has not applied yet: no longer an image
                hits = [hit for hit in hits if hit["id"] in self._by_int or hit["id"] >= int(self._meta["next_id"])]
            stray = [hit["id"] for hit in hits if hit["id"] not in self._by_int]
            if stray:
                raise IndexFormatError(f"{self._where}: holds ids {stray[:5]} that the index at {self.folder} "
                                       "never gave out; is another index writing to this collection?")
            scores[row, :len(hits)] = [hit["distance"] for hit in hits]
            names.append([self._by_int[hit["id"]] for hit in hits])
        return names

    def info(self) -> dict[str, Any]:
        return {
            "backend": "milvus", "folder": str(self.folder), "model_id": self.model_id, "dim": int(self._meta["dim"]),
            "uri": self._meta["uri"], "collection": self._meta["collection"], "factory": "FLAT", "metric": "IP",
            "consistency": self.consistency, "count": len(self), "tombstones": len(self._tombstones),
            "gallery_root": self._meta["gallery_root"] or None, "uncommitted_changes": self._dirty,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None, **self._feature_info(),
        }
