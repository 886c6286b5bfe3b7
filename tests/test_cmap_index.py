"""Indexing, search and the REST API rank a model with its own per-pair `score` (CMAP) exactly."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cirlab.checkpoint import load_checkpoint, save_checkpoint
from cirlab.config import load_config
from cirlab.encoders.text import Vocabulary
from cirlab.images import image_tensor, load_image
from cirlab.index.build import build_index, list_images, search_index
from cirlab.index.faiss_index import FaissIndex
from cirlab.models.registry import create_model
from cirlab.serve.app import create_app

TEXT = "make it red"
TINY_CMAP = ["model.name=cmap", "model.image_backbone=resnet18", "model.image_weights=null", "model.embed_dim=8",
             "model.text_encoder=bigru", "model.freeze_backbone=true"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, index folder, gallery): a tiny CMAP checkpoint and the index of 12 random 32 px images."""
    work = tmp_path_factory.mktemp("cmap_index")
    torch.manual_seed(0)
    config = load_config(None, TINY_CMAP)
    vocab = Vocabulary.build([TEXT, "add a cube"])
    save_checkpoint(work / "ckpt", create_model(config.model, vocab), config, vocab)
    rng = np.random.default_rng(0)
    (work / "gallery").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(work / "gallery" / f"g{i:02d}.png")
    build_index(work / "ckpt", work / "gallery", work / "index", batch_size=5, progress=False).close()
    return work / "ckpt", work / "index", work / "gallery"


def _brute_force(model, gallery: Path, reference: str, text: str) -> list[tuple[str, float]]:
    """Every gallery image scored by `model.score` at once, best first (ties in id order)."""
    names = list_images(gallery)
    pixels = torch.stack([image_tensor(load_image(gallery / name)) for name in names])
    with torch.no_grad():
        query = model.encode_queries(image_tensor(load_image(gallery / reference))[None], [text])
        scores = model.score(query, model.encode_targets(pixels))[0]
    order = np.argsort(-scores.numpy(), kind="stable")
    return [(names[i], float(scores[i])) for i in order]


def test_index_ranks_the_gallery_as_brute_force_scoring(indexed):
    checkpoint, index_folder, gallery = indexed
    model = load_checkpoint(checkpoint).model.eval()
    expected = _brute_force(model, gallery, "g03.png", TEXT)
    with FaissIndex.open(index_folder) as index:
        assert index.info()["dim"] == 3 * 8  # three levels of 8-d features, stored as they are
        everything = search_index(index, model, "g03.png", TEXT, k=12, exclude_reference=False)
        top = search_index(index, model, "g03.png", TEXT, k=4)
    assert [name for name, _ in everything] == [name for name, _ in expected]
    np.testing.assert_allclose([s for _, s in everything], [s for _, s in expected], atol=1e-5)
    assert top == [hit for hit in everything if hit[0] != "g03.png"][:4]
    assert len({round(score, 4) for _, score in everything}) > 6  # a ranking, not a tie


def test_a_removed_image_leaves_the_exact_ranking(indexed, tmp_path):
    checkpoint, index_folder, _ = indexed
    model = load_checkpoint(checkpoint).model.eval()
    with FaissIndex.open(index_folder) as index:
        before = search_index(index, model, "g00.png", TEXT, k=11)
        index.remove([before[0][0]])  # not committed: the shared index stays as it was
        after = search_index(index, model, "g00.png", TEXT, k=10)
    # the scoring batches differ after a removal, so scores match to float tolerance, not bit for bit
    assert [name for name, _ in after] == [name for name, _ in before[1:]]
    np.testing.assert_allclose([score for _, score in after], [score for _, score in before[1:]], rtol=1e-5)


def test_the_api_returns_the_exact_ranking_and_declines_heat_maps(indexed):
    checkpoint, index_folder, gallery = indexed
    model = load_checkpoint(checkpoint).model.eval()
    expected = [hit for hit in _brute_force(model, gallery, "g05.png", TEXT) if hit[0] != "g05.png"][:5]
    with TestClient(create_app(index_folder, checkpoint)) as client:
        response = client.post("/api/search", data={"text": TEXT, "k": "5", "image_id": "g05.png"})
        explained = client.post("/api/explain", data={"text": TEXT, "image_id": "g05.png", "target_id": "g01.png"})
    assert explained.status_code == 422 and "multi-level features" in explained.json()["detail"]
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [hit["id"] for hit in results] == [name for name, _ in expected]
    np.testing.assert_allclose([hit["score"] for hit in results], [score for _, score in expected], atol=1e-5)


@pytest.mark.parametrize(("settings", "asked"), [({"factory": "HNSW32"}, "faiss HNSW32"),
                                                 ({"backend": "milvus", "milvus_uri": "http://127.0.0.1:9"}, "milvus")])
def test_exact_ranking_needs_a_flat_faiss_index(indexed, tmp_path, settings, asked):
    checkpoint, _, gallery = indexed
    with pytest.raises(ValueError, match=f"use the faiss backend with the Flat factory, not {asked}"):
        build_index(checkpoint, gallery, tmp_path / "index", progress=False, **settings)
    assert not (tmp_path / "index").exists()
