"""The benchmark registry: every reader feeds training and `cirlab eval` through one path."""

import json

import numpy as np
import pytest
import torch
from fixtures.materialise import materialise
from PIL import Image
from test_cirr import VAL_SCORES

from cirlab.cli import main
from cirlab.config import ConfigError, load_config
from cirlab.data.benchmarks import load_benchmark
from cirlab.encoders.text import LSTMTextEncoder, Vocabulary
from cirlab.evaluate import evaluate_evalset
from cirlab.images import fit_image, image_tensor
from cirlab.models.base import CIRModel
from cirlab.train import train

TINY = ["model.image_backbone=resnet18", "model.image_weights=null", "model.backbone_upto=layer2",
        "model.embed_dim=16", "train.batch_size=2", "train.iterations=2", "train.eval_every=2",
        "data.val_fraction=0.5", "data.image_size=16", "train.sampler=shuffled", "train.loss=batch_classification"]


@pytest.mark.parametrize("fixture, overrides, triplets", [
    ("fashioniq", ["data.categories=[dress]"], 2),
    ("cirr", [], 1),
    ("shoes", [], 2),
    ("fashion200k", [], 3),
    ("mitstates", [], 6),
])
def test_every_reader_gives_a_training_split_over_existing_images(tmp_path, fixture, overrides, triplets):
    root = materialise(fixture, tmp_path)
    config = load_config(None, [f"data.format={fixture}", f"data.root={root}", *overrides])
    benchmark = load_benchmark(config)
    assert len(benchmark.train.queries) == triplets
    assert all(path.is_file() for path in benchmark.train.image_paths)
    assert benchmark.train.labels.tolist() == list(range(len(benchmark.train.image_paths)))


def test_a_protocol_choice_the_benchmark_lacks_is_refused(tmp_path):
    root = materialise("shoes", tmp_path)
    config = load_config(None, ["data.format=shoes", f"data.root={root}", "protocol.caption_join=symmetric"])
    with pytest.raises(ConfigError, match="protocol.caption_join does not apply to shoes"):
        load_benchmark(config)


def test_fit_image_resizes_the_shorter_side_then_crops_the_centre():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 4, 20))  # a blue strip at the left edge
    square = fit_image(image, 10)
    assert square.size == (10, 10)
    # 40x20 -> 20x10; the centre crop keeps columns 5..14 of the resized image: red only
    assert np.asarray(square)[:, :, 0].min() == 255
    assert image_tensor(image, 10).shape == (3, 10, 10)


class _ScoreTable(CIRModel):
    """Scores a query against a target by table lookup: the query's row (found by its text) at the
    target's column (found by its solid colour). Rebuilds a known score matrix through the pipeline."""

    def __init__(self, texts: list[str], colours: list[torch.Tensor], table: np.ndarray) -> None:
        super().__init__(torch.nn.Identity(), LSTMTextEncoder(Vocabulary.build(texts), 4))
        self.rows = {text: row for row, text in enumerate(texts)}
        self.colours = torch.stack(colours)
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def encode_queries(self, images, texts):
        return self.table[[self.rows[t] for t in texts]]

    def encode_targets(self, images):
        means = images.mean(dim=(2, 3))
        return torch.nn.functional.one_hot(torch.cdist(means, self.colours).argmin(dim=1), len(self.colours)).float()

    def score(self, queries, targets):
        return queries @ targets.T


@pytest.mark.parametrize("chunk", [1024, 2])
def test_evalset_path_reproduces_hand_computed_cirr_metrics(tmp_path, chunk):
    root = materialise("cirr", tmp_path)
    evalset = load_benchmark(load_config(None, ["data.format=cirr", f"data.root={root}"])).evalsets[0]
    colours = [image_tensor(Image.open(evalset.image_paths[i])).mean(dim=(1, 2)) for i in evalset.gallery]
    model = _ScoreTable([q.text for q in evalset.queries], colours, VAL_SCORES)
    metrics = evaluate_evalset(model, evalset, torch.device("cpu"), progress=False, query_chunk=chunk)
    assert metrics == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0,
                                     "Rsubset@1": 200 / 3, "Rsubset@2": 200 / 3, "Rsubset@3": 100.0,
                                     "avg": 250 / 3})


def test_train_and_eval_on_fashioniq_layout(tmp_path, capsys):
    root = materialise("fashioniq", tmp_path)
    # CMAP's join: two training queries per triplet (one per caption order), so a batch of 2 remains
    # after the validation carve.
    config = load_config(None, ["data.format=fashioniq", f"data.root={root}", "data.categories=[dress]",
                                "protocol.caption_join=cmap", *TINY])
    train(config, tmp_path / "run", progress=False)
    assert main(["eval", str(tmp_path / "run" / "best"), "--set", "protocol.reference=removed"]) == 0
    result = json.loads((tmp_path / "run" / "eval-val.json").read_text())
    assert result["queries"] == 6 and result["gallery"] == 6
    assert set(result["metrics"]) == {"dress/R@10", "dress/R@50", "R@10", "R@50", "avg"}
    # 6 gallery images minus the removed reference: every target is within the top 50
    assert result["metrics"]["R@50"] == 100.0
    assert result["protocol"]["reference"] == "removed"
    assert "fashioniq-dress val" in capsys.readouterr().out
