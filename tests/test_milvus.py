"""The Milvus backend against a real embedded Milvus server (the `milvus` package), one per test module."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pymilvus import DataType, MilvusClient
from test_cmap_index import indexed  # noqa: F401  (a tiny CMAP checkpoint and its FAISS index)
from test_index import _count_embedded, _save_tiny_checkpoint, _unit, _write_images

from cirlab.checkpoint import load_checkpoint
from cirlab.cli import main
from cirlab.index.base import Index, IndexFormatError, IndexMismatchError, IndexStoreError
from cirlab.index.build import build_index, open_index
from cirlab.index.faiss_index import FaissIndex
from cirlab.index.milvus_embedded import embedded_milvus, free_port
from cirlab.index.milvus_index import MilvusIndex, default_collection
from cirlab.index.search import search_index
from cirlab.index.store import DB_FILE
from cirlab.serve.app import create_app


@pytest.fixture(scope="module")
def milvus_uri(request, tmp_path_factory) -> Iterator[str]:
    """An embedded Milvus server with its data under a temporary folder; its URI."""
    import milvus

    # The binaries go to pytest's cache, unpacked once for every session; with -p no:cacheprovider,
    # to the server's own folder.
    cache = getattr(request.config, "cache", None)
    binaries = None if cache is None else cache.mkdir(f"milvus-server-{milvus.__version__}")
    with embedded_milvus(tmp_path_factory.mktemp("milvus"), binaries) as uri:  # the logs stay in pytest's tmp
        yield uri


def _stored_rows(uri: str, collection: str) -> int:
    """Rows in a collection as Milvus counts them, committed or not."""
    client = MilvusClient(uri=uri)
    try:
        return client.query(collection, filter="", output_fields=["count(*)"])[0]["count(*)"]
    finally:
        client.close()


NAMES = [f"img{i:02d}" for i in range(40)]
VECTORS = _unit(40, 8, seed=0)


def test_ranks_like_faiss_flat_and_sees_additions_at_once(milvus_uri, tmp_path):
    queries = _unit(6, 8, seed=1)
    faiss = FaissIndex.create(tmp_path / "faiss", 8, "model")
    faiss.add(NAMES, VECTORS)
    with MilvusIndex.create(tmp_path / "milvus", 8, "model", milvus_uri) as index:
        assert isinstance(index, Index)
        index.add(NAMES[:30], VECTORS[:30])
        # Neither committed nor flushed: a stored vector is at once its own best hit, at cosine 1.
        scores, ids = index.search(VECTORS[:30], k=1)
        assert [row[0] for row in ids] == NAMES[:30]
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

        index.add(NAMES[30:], VECTORS[30:])
        scores, ids = index.search(queries, k=10)
        faiss_scores, faiss_ids = faiss.search(queries, k=10)
        assert ids == faiss_ids
        np.testing.assert_allclose(scores, faiss_scores, atol=1e-5)
        brute_force = queries @ VECTORS.T
        assert ids == [[NAMES[i] for i in np.argsort(-row)[:10]] for row in brute_force]
        np.testing.assert_allclose(scores, -np.sort(-brute_force)[:, :10], atol=1e-5)

        everything, every_id = index.search(queries[:1], k=100)  # k beyond the size: each id once
        assert everything.shape == (1, 40) and sorted(every_id[0]) == NAMES
        assert index.info()["collection"] == default_collection(tmp_path / "milvus")
    faiss.close()


def test_commit_is_the_point_where_writes_become_visible_and_durable(milvus_uri, tmp_path):
    folder, removed = tmp_path / "index", ["img00", "img07", "img20"]
    writer = MilvusIndex.create(folder, 8, "model", milvus_uri, collection="commits", gallery_root=tmp_path)
    writer.add(NAMES[:36], VECTORS[:36])
    writer.commit()
    writer.add(NAMES[36:], VECTORS[36:])  # from here on nothing is committed
    writer.remove(removed)
    _, ids = writer.search(VECTORS, k=40)  # the writer's own view
    assert all(len(row) == 37 and not set(removed) & set(row) for row in ids)
    with MilvusIndex.open(folder) as reader:  # another process's view: the committed state only
        assert len(reader) == 36 and "img07" in reader and "img36" not in reader
        _, ids = reader.search(VECTORS[36:], k=36)
        assert all(len(row) == 36 and "img36" not in row for row in ids)
    writer.close()  # like a crash: the work is lost, but its 4 rows are still in Milvus
    assert _stored_rows(milvus_uri, "commits") == 40

    with open_index(folder, model_id="model") as again:  # the factory opens the backend the folder records
        assert isinstance(again, MilvusIndex) and again.ids() == NAMES[:36]
        again.add(["late"], VECTORS[36:37])  # a writer first deletes the rows nobody committed
        again.remove(removed)
        assert again.info()["tombstones"] == 3
        again.commit()  # then the removed rows go too
        assert again.info()["tombstones"] == 0 and _stored_rows(milvus_uri, "commits") == 36 + 1 - 3

    kept = [i for i in range(36) if NAMES[i] not in removed]
    with MilvusIndex.open(folder) as reopened:
        assert reopened.ids() == [NAMES[i] for i in kept] + ["late"]
        assert reopened.gallery_root == tmp_path.resolve()
        stored = np.concatenate([VECTORS[kept], VECTORS[36:37]])
        scores, ids = reopened.search(VECTORS[:5], k=34)
        for row in range(5):
            order = np.argsort(-(stored @ VECTORS[row]))
            assert ids[row] == [reopened.ids()[i] for i in order]
            np.testing.assert_allclose(scores[row], (stored @ VECTORS[row])[order], atol=1e-5)
        info = reopened.info()
        assert (info["backend"], info["uri"], info["collection"], info["count"]) == ("milvus", milvus_uri,
                                                                                    "commits", 34)
    with pytest.raises(IndexMismatchError, match="built with model model, but model other was given"):
        open_index(folder, model_id="other")


def test_strong_never_lags_a_write_and_weaker_levels_drop_stale_removed_rows(milvus_uri, tmp_path):
    folder = tmp_path / "index"
    MilvusIndex.create(folder, 8, "model", milvus_uri, collection="levels").close()
    with MilvusIndex.open(folder, consistency="Strong") as strong:
        for i in range(8):  # each write is searched at once, and found at once
            strong.add([NAMES[i]], VECTORS[i:i + 1])
            _, ids = strong.search(VECTORS[i:i + 1], k=1)
            assert ids == [[NAMES[i]]]
        strong.commit()
        assert strong.info()["consistency"] == "Strong"
    with MilvusIndex.open(folder, consistency="Bounded") as bounded:
        assert bounded.info()["consistency"] == "Bounded"
        _, ids = bounded.search(VECTORS[:8], k=8)  # whatever the server has applied: committed images only
        assert all(set(row) <= set(NAMES[:8]) for row in ids)
        bounded.remove([NAMES[0]])
        bounded.commit()
    # A stale read returns a removed row's id; put one back by hand (after opening, whose count check would
    # notice) to make that happen for certain.
    nearest = [NAMES[i + 1] for i in np.argsort(-(VECTORS[1:8] @ VECTORS[0]))[:3]]
    with MilvusIndex.open(folder, consistency="Bounded") as bounded, MilvusIndex.open(folder) as strong:
        client = MilvusClient(uri=milvus_uri)
        client.insert("levels", [{"id": 0, "vector": VECTORS[0].tolist()}])
        client.close()
        # seen (and dropped: one hit fewer) or not yet seen
        assert bounded.search(VECTORS[:1], k=3)[1] in ([nearest], [nearest[:2]])
        with pytest.raises(IndexFormatError, match=r"holds ids \[0\] that the index"):
            strong.search(VECTORS[:1], k=3)  # under Strong a retired id is another writer's doing
    with pytest.raises(ValueError, match="unknown Milvus consistency level 'strong' \\(known: Strong, Bounded"):
        MilvusIndex.open(folder, consistency="strong")
    FaissIndex.create(tmp_path / "faiss", 8, "model").close()
    with pytest.raises(ValueError, match="a consistency level is a setting of Milvus indexes; this faiss index"):
        open_index(tmp_path / "faiss", consistency="Bounded")


def test_mismatched_collections_and_servers_are_refused(milvus_uri, tmp_path):
    first = MilvusIndex.create(tmp_path / "a", 8, "m1", milvus_uri, collection="shared")
    first.close()
    (tmp_path / "a" / DB_FILE).unlink()  # a crash inside `create` leaves an empty collection behind
    with MilvusIndex.create(tmp_path / "a", 8, "m1", milvus_uri, collection="shared") as first:  # taken over
        first.add(NAMES[:3], VECTORS[:3])
        first.commit()

    with pytest.raises(IndexMismatchError, match="holds vectors of model m1 \\(dimension 8\\), not of model m2"):
        MilvusIndex.create(tmp_path / "b", 8, "m2", milvus_uri, collection="shared")
    with pytest.raises(IndexMismatchError, match="not of model m1 \\(dimension 4\\)"):
        MilvusIndex.create(tmp_path / "b", 4, "m1", milvus_uri, collection="shared")
    with pytest.raises(FileExistsError, match="already holds 3 vectors of another index folder"):
        MilvusIndex.create(tmp_path / "b", 8, "m1", milvus_uri, collection="shared")
    client = MilvusClient(uri=milvus_uri)
    client.release_collection("shared")  # as a server restart leaves it: counting its rows needs it loaded
    client.close()
    with pytest.raises(FileExistsError, match="already holds 3 vectors of another index folder"):
        MilvusIndex.create(tmp_path / "b", 8, "m1", milvus_uri, collection="shared")
    with pytest.raises(FileExistsError, match="already holds an index"):
        MilvusIndex.create(tmp_path / "a", 8, "m1", milvus_uri, collection="other")
    with pytest.raises(ValueError, match="collection name 'not-valid'"):
        MilvusIndex.create(tmp_path / "b", 8, "m1", milvus_uri, collection="not-valid")
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(IndexStoreError, match=f"cannot use the Milvus server at {nobody}"):
        MilvusIndex.create(tmp_path / "b", 8, "m1", nobody)
    assert not (tmp_path / "b").exists()  # nothing written by any refused create

    client = MilvusClient(uri=milvus_uri)
    client.create_collection("foreign", schema=MilvusClient.create_schema().add_field(
        "id", DataType.INT64, is_primary=True).add_field("vector", DataType.FLOAT_VECTOR, dim=8))
    with pytest.raises(IndexStoreError, match="collection foreign: collection exists but was not made by cirlab"):
        MilvusIndex.create(tmp_path / "b", 8, "m1", milvus_uri, collection="foreign")
    client.drop_collection("shared")
    client.close()
    with pytest.raises(IndexFormatError, match="collection shared: the collection of the index at .* is gone"):
        MilvusIndex.open(tmp_path / "a")


@pytest.mark.parametrize("settings, message", [
    ({"backend": "milvus"}, "milvus backend needs a server URI"),
    ({"milvus_uri": "http://127.0.0.1:19530", "factory": "HNSW8"}, "takes no FAISS factory"),
    ({"backend": "faiss", "collection": "images"}, "settings of the milvus backend, not of faiss"),
    ({"backend": "annoy"}, "unknown index backend 'annoy'"),
])
def test_inconsistent_backend_settings_are_refused_before_any_work(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build_index(tmp_path / "checkpoint", tmp_path / "gallery", tmp_path / "index", **settings)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def test_cli_resumes_a_crashed_build_then_adds_searches_and_removes(milvus_uri, checkpoint, tmp_path, monkeypatch,
                                                                   capsys):
    gallery, out = tmp_path / "gallery", tmp_path / "index"
    _write_images(gallery, [f"a{i:02d}.png" for i in range(10)], (16, 16), seed=1)
    # Chunks of 4 images in batches of 2: the 3rd embedding call is in the 2nd chunk, after one commit.
    _count_embedded(monkeypatch, fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(checkpoint, gallery, out, batch_size=2, commit_every=4, backend="milvus", milvus_uri=milvus_uri,
                    progress=False)
    embedded = _count_embedded(monkeypatch)
    assert main(["index", "build", str(checkpoint), str(gallery), "--out", str(out), "--backend", "milvus",
                 "--milvus-uri", milvus_uri]) == 0
    assert sum(embedded) == 6 and "10 images indexed (milvus, FLAT)" in capsys.readouterr().out
    _write_images(gallery, ["b0.png", "b1.png"], (16, 16), seed=2)
    assert main(["index", "add", str(out)]) == 0
    assert sum(embedded) == 8 and "2 new images added" in capsys.readouterr().out
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["backend"], info["uri"], info["collection"], info["count"]) == ("milvus", milvus_uri,
                                                                                default_collection(out), 12)

    with build_index(checkpoint, gallery, tmp_path / "faiss", progress=False) as exact:  # same images, FAISS
        expected = search_index(exact, load_checkpoint(checkpoint).model.eval(), "a03.png", "make red", k=6)
    search = ["search", str(out), "--id", "a03.png", "--text", "make red", "-k", "5", "--json"]
    assert main(search) == 0  # the checkpoint and the server come from the index folder
    results = json.loads(capsys.readouterr().out)
    assert [hit["id"] for hit in results] == [name for name, _ in expected[:5]]
    assert main([*search, "--milvus-consistency", "Eventually"]) == 0  # nothing written since: the same answer
    assert [hit["id"] for hit in json.loads(capsys.readouterr().out)] == [name for name, _ in expected[:5]]
    np.testing.assert_allclose([hit["score"] for hit in results], [score for _, score in expected[:5]], atol=1e-5)

    assert main(["index", "remove", str(out), expected[0][0]]) == 0
    assert "removed 1 images, 11 left" in capsys.readouterr().out
    assert main(search) == 0
    assert [hit["id"] for hit in json.loads(capsys.readouterr().out)] == [name for name, _ in expected[1:6]]
    with TestClient(create_app(out, checkpoint)) as client:  # `cirlab serve INDEX` opens it the same way
        assert client.get("/health").json()["images"] == 11
        response = client.post("/api/search", data={"text": "make red", "k": "5", "image_id": "a03.png"})
        assert [hit["id"] for hit in response.json()["results"]] == [name for name, _ in expected[1:6]]
    with pytest.raises(IndexMismatchError, match="index has backend milvus, index type FLAT; asked for backend "
                                                 "faiss, index type HNSW8"):
        build_index(checkpoint, gallery, out, factory="HNSW8", progress=False)


def test_milvus_shortlists_a_two_stage_search_as_faiss_does(milvus_uri, indexed, tmp_path):  # noqa: F811
    checkpoint, flat_folder, gallery = indexed
    model = load_checkpoint(checkpoint).model.eval()
    with build_index(checkpoint, gallery, tmp_path / "index", backend="milvus", milvus_uri=milvus_uri,
                     progress=False) as milvus, FaissIndex.open(flat_folder) as flat:
        assert milvus.feature_dim == flat.feature_dim == 24
        for shortlist in (5, 12):
            from_milvus = search_index(milvus, model, "g02.png", "make it red", k=4, shortlist=shortlist)
            from_faiss = search_index(flat, model, "g02.png", "make it red", k=4, shortlist=shortlist)
            assert [name for name, _ in from_milvus] == [name for name, _ in from_faiss]
            np.testing.assert_allclose([s for _, s in from_milvus], [s for _, s in from_faiss], atol=1e-5)
