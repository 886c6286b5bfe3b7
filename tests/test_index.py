import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cirlab.index.build as build_module
from cirlab.checkpoint import load_checkpoint, save_checkpoint
from cirlab.config import load_config
from cirlab.data.errors import DataFormatError
from cirlab.encoders.text import Vocabulary
from cirlab.images import image_tensor, load_image
from cirlab.index.base import Index, IndexFormatError, IndexMismatchError, UnknownImageError
from cirlab.index.build import build_index, embed_batch, model_identity
from cirlab.index.faiss_index import FaissIndex
from cirlab.index.search import search_index
from cirlab.index.store import DB_FILE
from cirlab.models.registry import create_model

TINY_MODEL = ["model.name=tirg", "model.image_backbone=resnet18", "model.image_weights=null",
              "model.backbone_upto=layer2", "model.embed_dim=16"]


def _save_tiny_checkpoint(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = load_config(None, TINY_MODEL)
    vocab = Vocabulary.build(["make red"])
    save_checkpoint(folder, create_model(config.model, vocab), config, vocab)
    return folder


def _write_images(folder: Path, names: list[str], size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint).model.eval()


@pytest.fixture
def gallery(tmp_path) -> Path:
    """12 images of two sizes (10 at 16x16, then 2 at 24x16), so batches must group by size."""
    root = tmp_path / "gallery"
    _write_images(root, [f"a{i:02d}.png" for i in range(10)], (16, 16), seed=1)
    _write_images(root / "sub", ["b00.png", "b01.png"], (24, 16), seed=2)
    return root


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _count_embedded(monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Patch the embedding step to record batch sizes, optionally raising on the n-th call (a crash)."""
    sizes: list[int] = []

    def counting(model, pixels):
        if fail_on_call is not None and len(sizes) + 1 == fail_on_call:
            raise RuntimeError("simulated crash")
        sizes.append(len(pixels))
        return embed_batch(model, pixels)

    monkeypatch.setattr(build_module, "embed_batch", counting)
    return sizes


def test_round_trip_matches_brute_force_ranking(checkpoint, model, gallery, tmp_path):
    out = tmp_path / "index"
    build_index(checkpoint, gallery, out, batch_size=4, commit_every=5, progress=False).close()
    with FaissIndex.open(out, model_id=model_identity(checkpoint)) as index:
        assert isinstance(index, Index)
        ids = index.ids()
        assert ids == [f"a{i:02d}.png" for i in range(10)] + ["sub/b00.png", "sub/b01.png"]
        vectors = index.reconstruct(ids)
        # Stored vectors are the unit-length target embeddings of each image, however it was batched.
        for group in (ids[:10], ids[10:]):
            pixels = torch.stack([image_tensor(load_image(gallery / name)) for name in group])
            vectors_of_group, features = embed_batch(model, pixels)
            np.testing.assert_allclose(index.reconstruct(group), vectors_of_group, atol=1e-5)
            assert features is None  # a cosine model's index keeps no target features beside its vectors
        assert index.info()["count"] == 12 and index.info()["dim"] == 16

        with torch.no_grad():
            query = model.encode_queries(image_tensor(load_image(gallery / "a03.png")).unsqueeze(0), ["make red"])
        query = F.normalize(query, dim=-1).numpy()[0]
        expected_scores = vectors @ query
        order = np.argsort(-expected_scores)

        hits = search_index(index, model, "a03.png", "make red", k=12, exclude_reference=False)
        assert [name for name, _ in hits] == [ids[i] for i in order]
        np.testing.assert_allclose([score for _, score in hits], expected_scores[order], atol=1e-5)

        # The same query from a PIL image; by gallery id the reference leaves its own results.
        from_image = search_index(index, model, load_image(gallery / "a03.png"), "make red", k=5)
        assert [name for name, _ in from_image] == [ids[i] for i in order[:5]]
        excluded = search_index(index, model, "a03.png", "make red", k=5)
        assert [name for name, _ in excluded] == [ids[i] for i in order if ids[i] != "a03.png"][:5]


def test_crash_and_resume_equals_one_shot_build(checkpoint, gallery, tmp_path, monkeypatch):
    one_shot = build_index(checkpoint, gallery, tmp_path / "one_shot", batch_size=2, progress=False)

    # Chunks of 4 images in batches of 2: the 3rd embedding call is in the 2nd chunk, after one commit.
    _count_embedded(monkeypatch, fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(checkpoint, gallery, tmp_path / "resumed", batch_size=2, commit_every=4, progress=False)
    with FaissIndex.open(tmp_path / "resumed") as crashed:
        assert crashed.ids() == [f"a{i:02d}.png" for i in range(4)]

    embedded = _count_embedded(monkeypatch)
    resumed = build_index(checkpoint, gallery, tmp_path / "resumed", batch_size=2, commit_every=4, progress=False)
    assert sum(embedded) == 8
    assert resumed.ids() == one_shot.ids()
    np.testing.assert_allclose(resumed.reconstruct(resumed.ids()), one_shot.reconstruct(one_shot.ids()), atol=1e-5)
    resumed.close()
    one_shot.close()


def test_incremental_build_embeds_only_new_images(checkpoint, gallery, tmp_path, monkeypatch):
    out = tmp_path / "index"
    build_index(checkpoint, gallery, out, progress=False).close()
    _write_images(gallery, ["new0.png", "new1.jpg", "new2.jpeg"], (16, 16), seed=3)
    (gallery / "notes.txt").write_text("not an image")
    embedded = _count_embedded(monkeypatch)
    with build_index(checkpoint, gallery, out, progress=False) as index:
        assert sum(embedded) == 3
        assert len(index) == 15 and {"new0.png", "new1.jpg", "new2.jpeg"} <= set(index.ids())
    with build_index(checkpoint, gallery, out, progress=False) as index:
        assert sum(embedded) == 3 and len(index) == 15


def test_other_model_is_refused(checkpoint, gallery, tmp_path):
    out = tmp_path / "index"
    build_index(checkpoint, gallery, out, progress=False).close()
    other = _save_tiny_checkpoint(tmp_path / "other", seed=1)
    built_with, given = model_identity(checkpoint), model_identity(other)
    assert built_with != given and len(given) == 16
    with pytest.raises(IndexMismatchError) as caught:
        build_index(other, gallery, out, progress=False)
    assert built_with in str(caught.value) and given in str(caught.value)
    with pytest.raises(IndexMismatchError, match="index type Flat"):
        build_index(checkpoint, gallery, out, factory="HNSW8", progress=False)


@pytest.mark.parametrize("factory", ["Flat", "HNSW8"])
def test_removed_ids_are_never_returned(tmp_path, factory):
    vectors, names = _unit(30, 8, seed=4), [f"img{i}" for i in range(30)]
    removed = {"img0", "img7", "img8", "img20", "img29"}
    index = FaissIndex.create(tmp_path / "index", 8, "model", factory=factory)
    index.add(names, vectors)
    index.commit()
    index.remove(sorted(removed))
    index.commit()
    index.close()

    with FaissIndex.open(tmp_path / "index") as reopened:
        assert len(reopened) == 25 and reopened.info()["tombstones"] == (5 if factory == "HNSW8" else 0)
        scores, ids = reopened.search(vectors, k=30)
        kept = [i for i, name in enumerate(names) if name not in removed]
        for row in range(30):
            assert len(ids[row]) == 25 and not removed & set(ids[row])
            expected = sorted(kept, key=lambda i: -float(vectors[row] @ vectors[i]))
            assert ids[row] == [names[i] for i in expected]
            np.testing.assert_allclose(scores[row], vectors[expected] @ vectors[row], atol=1e-5)
        with pytest.raises(UnknownImageError, match="img0"):
            reopened.reconstruct(["img0"])


def test_ivf_trains_on_first_batch_and_searches(tmp_path):
    vectors, names = _unit(300, 8, seed=5), [f"v{i:03d}" for i in range(300)]
    index = FaissIndex.create(tmp_path / "ivf", 8, "model", factory="IVF4,Flat")
    assert not index.info()["trained"]
    index.add(names, vectors)
    index.commit()
    index.remove(["v000"])
    index.commit()
    index.close()
    with FaissIndex.open(tmp_path / "ivf") as reopened:
        assert reopened.info()["trained"] and len(reopened) == 299
        _, ids = reopened.search(vectors[1:], k=1)
        assert [row[0] for row in ids] == names[1:]  # a stored vector's own cell is the one probed
        np.testing.assert_allclose(reopened.reconstruct(["v123"])[0], vectors[123], atol=1e-6)

    too_few = FaissIndex.create(tmp_path / "ivf_small", 8, "model", factory="IVF64,Flat")
    with pytest.raises(ValueError, match="10 vectors are too few"):
        too_few.add(names[:10], vectors[:10])
    assert len(too_few) == 0
    too_few.close()


def test_commit_point_is_the_database(tmp_path):
    folder = tmp_path / "index"
    index = FaissIndex.create(folder, 8, "model")
    index.add(["x", "y"], _unit(2, 8, seed=6))
    index.commit()
    committed = index.info()["generation"]
    index.add(["z"], _unit(1, 8, seed=7))
    index.close()  # uncommitted work is dropped, like a crash before commit
    # A crash after writing the next FAISS file but before the database commit leaves this behind.
    (folder / f"vectors-{committed + 1:08d}.faiss").write_bytes(b"half-written")

    with FaissIndex.open(folder) as reopened:
        assert reopened.ids() == ["x", "y"] and reopened.info()["generation"] == committed
        reopened.add(["z"], _unit(1, 8, seed=7))
        reopened.commit()
    assert sorted(path.name for path in folder.glob("*.faiss")) == [f"vectors-{committed + 1:08d}.faiss"]

    with sqlite3.connect(folder / DB_FILE) as connection:
        connection.execute("DELETE FROM ids WHERE image_id = 'z'")
    with pytest.raises(IndexFormatError, match="disagree"):
        FaissIndex.open(folder)
    with pytest.raises(IndexFormatError, match="no cirlab index"):
        FaissIndex.open(tmp_path / "nowhere")
    (folder / DB_FILE).write_bytes(b"garbage" * 1000)
    for sidecar in folder.glob(DB_FILE + "-*"):
        sidecar.unlink()
    with pytest.raises(IndexFormatError, match="not a readable SQLite database"):
        FaissIndex.open(folder)


def test_bad_inputs_are_named(checkpoint, model, gallery, tmp_path):
    out = tmp_path / "index"
    (gallery / "a05.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataFormatError, match="a05.png"):
        build_index(checkpoint, gallery, out, batch_size=2, commit_every=2, progress=False)
    with FaissIndex.open(out) as index:
        assert index.ids() == ["a00.png", "a01.png", "a02.png", "a03.png"]
        with pytest.raises(UnknownImageError, match="'missing.png' is not an image of the index"):
            search_index(index, model, "missing.png", "make red")
        with pytest.raises(ValueError, match="N x 8|N x 16"):
            index.add(["q"], np.zeros((1, 3), dtype=np.float32))
        with pytest.raises(ValueError, match="already in the index"):
            index.add(["a00.png"], np.zeros((1, 16), dtype=np.float32))
    shutil.rmtree(gallery)
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        build_index(checkpoint, gallery, out, progress=False)
