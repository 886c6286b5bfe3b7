"""Two-stage search of a model with its own per-pair `score` (CMAP): a vector index shortlists, the score ranks.

With a shortlist as large as the gallery, indexing, search and the REST API rank exactly as brute-force
scoring does, whatever the index's factory; with a shorter one, what the first stage misses is lost, and the
recall against exact ranking says so."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cirlab.checkpoint import load_checkpoint, save_checkpoint
from cirlab.cli import main
from cirlab.config import load_config
from cirlab.encoders.text import Vocabulary
from cirlab.images import image_tensor, load_image
from cirlab.index.build import build_index, list_images
from cirlab.index.faiss_index import FaissIndex
from cirlab.index.search import DEFAULT_SHORTLIST, SearchQuery, overlap_recall, search_index, search_many
from cirlab.models.registry import create_model
from cirlab.serve.app import SearchSettings, create_app

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
        # three levels of 8-d unit features side by side, and the same features kept for the exact stage
        assert (index.dim, index.feature_dim, index.info()["feature_bytes"]) == (3 * 8, 3 * 8, 12 * 3 * 8 * 4)
        everything = search_index(index, model, "g03.png", TEXT, k=12, exclude_reference=False)
        top = search_index(index, model, "g03.png", TEXT, k=4)
        shortlisted = search_index(index, model, "g03.png", TEXT, k=12, exclude_reference=False, shortlist=12)
    assert [name for name, _ in everything] == [name for name, _ in expected]
    np.testing.assert_allclose([s for _, s in everything], [s for _, s in expected], atol=1e-5)
    assert shortlisted == everything  # a shortlist of the whole gallery is exact ranking
    assert top == [hit for hit in everything if hit[0] != "g03.png"][:4]
    assert len({round(score, 4) for _, score in everything}) > 6  # a ranking, not a tie


def test_a_short_list_is_ranked_exactly_among_what_the_first_stage_found(indexed):
    checkpoint, index_folder, gallery = indexed
    model = load_checkpoint(checkpoint).model.eval()
    exact = dict(_brute_force(model, gallery, "g03.png", TEXT))
    with FaissIndex.open(index_folder) as index:
        with torch.no_grad():
            query = model.encode_queries(image_tensor(load_image(gallery / "g03.png"))[None], [TEXT])
            estimate = model.query_vectors(query).numpy() @ index.reconstruct(index.ids()).T
        first_stage = [index.ids()[i] for i in np.argsort(-estimate[0], kind="stable")[:5]]
        hits = search_index(index, model, "g03.png", TEXT, k=3, exclude_reference=False, shortlist=5)
    best_of_first_stage = sorted(first_stage, key=lambda name: -exact[name])[:3]
    assert [name for name, _ in hits] == best_of_first_stage
    np.testing.assert_allclose([score for _, score in hits], [exact[name] for name in best_of_first_stage], atol=1e-5)


def test_an_image_the_first_stage_misses_is_lost_and_the_recall_shows_it(indexed, tmp_path):
    """A copy of the index whose shortlist vectors order the gallery exactly as the score does, except the best
    image, which they put last: a shortlist of 6 then loses it, and only it."""
    checkpoint, index_folder, gallery = indexed
    model = load_checkpoint(checkpoint).model.eval()
    exact_ranking = _brute_force(model, gallery, "g03.png", TEXT)
    with FaissIndex.open(index_folder) as index:
        ids = index.ids()
        features = index.features_of(ids)
    with torch.no_grad():
        query = model.encode_queries(image_tensor(load_image(gallery / "g03.png"))[None], [TEXT])
        direction = model.query_vectors(query)[0].numpy()
    lowest = exact_ranking[-1][1]
    lengths = {name: score - lowest + 1 for name, score in exact_ranking}  # positive, in the score's order
    lengths[exact_ranking[0][0]] = -1.0
    vectors = np.stack([lengths[name] * direction for name in ids])
    with FaissIndex.create(tmp_path / "crafted", 24, "crafted", feature_dim=24) as crafted:
        crafted.add(ids, vectors, features)
        queries = [SearchQuery(load_image(gallery / "g03.png"), TEXT, k=4)]
        exact = search_many(crafted, model, queries, shortlist=len(ids))
        shortlisted = search_many(crafted, model, queries, shortlist=6)
    assert [name for name, _ in exact[0]] == [name for name, _ in exact_ranking[:4]]
    assert [name for name, _ in shortlisted[0]] == [name for name, _ in exact_ranking[1:5]]
    assert overlap_recall(exact, shortlisted) == pytest.approx(3 / 4)
    assert overlap_recall(exact, exact) == 1.0


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


def test_any_faiss_factory_can_shortlist(indexed, tmp_path):
    checkpoint, index_folder, gallery = indexed
    model = load_checkpoint(checkpoint).model.eval()
    with build_index(checkpoint, gallery, tmp_path / "hnsw", factory="HNSW8", progress=False) as hnsw:
        assert hnsw.feature_dim == 3 * 8
        with FaissIndex.open(index_folder) as flat:
            for shortlist in (4, 12):  # a graph of 12 nodes is searched exhaustively: the same shortlist
                from_graph = search_index(hnsw, model, "g07.png", TEXT, k=4, shortlist=shortlist)
                from_flat = search_index(flat, model, "g07.png", TEXT, k=4, shortlist=shortlist)
                assert [name for name, _ in from_graph] == [name for name, _ in from_flat]
                np.testing.assert_allclose([s for _, s in from_graph], [s for _, s in from_flat], atol=1e-5)


def test_the_cli_and_the_server_take_the_shortlist(indexed, capsys):
    checkpoint, index_folder, gallery = indexed
    model = load_checkpoint(checkpoint).model.eval()
    with FaissIndex.open(index_folder) as index:
        expected = search_index(index, model, "g03.png", TEXT, k=3, shortlist=2)
    assert main(["search", str(index_folder), "--id", "g03.png", "--text", TEXT, "-k", "3", "--shortlist", "2",
                 "--json"]) == 0
    assert [hit["id"] for hit in json.loads(capsys.readouterr().out)] == [name for name, _ in expected]
    with TestClient(create_app(index_folder, checkpoint, search=SearchSettings(shortlist=2))) as client:
        response = client.post("/api/search", data={"text": TEXT, "k": "3", "image_id": "g03.png"})
    assert [hit["id"] for hit in response.json()["results"]] == [name for name, _ in expected]
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert f"default: {DEFAULT_SHORTLIST};" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ValueError, match="shortlist must be at least 1, not 0"):
        create_app(index_folder, checkpoint, search=SearchSettings(shortlist=0))
