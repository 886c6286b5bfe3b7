"""Checkpoint selection (carve / the benchmark's val split / last), lr milestones and early stopping."""

import json

import pytest
import torch
from fixtures.materialise import materialise
from safetensors.torch import load_file

from cirlab.config import ConfigError, load_config
from cirlab.evaluate import evaluate_checkpoint
from cirlab.selection import metric_value
from cirlab.train import learning_rate_factor, train

TINY = ["model.image_backbone=resnet18", "model.image_weights=random", "model.backbone_upto=layer2",
        "model.embed_dim=16", "train.batch_size=2", "train.iterations=4", "train.eval_every=2", "train.log_every=1",
        "data.image_size=16", "train.sampler=shuffled", "train.loss=batch_classification"]


def _fashioniq(tmp_path, *overrides):
    root = materialise("fashioniq", tmp_path)
    return load_config(None, ["data.format=fashioniq", f"data.root={root}", "data.categories=[dress]",
                              "protocol.caption_join=cmap", *TINY, *overrides])


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_last_trains_on_everything_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(_fashioniq(tmp_path, "train.selection=last"), run, progress=False)
    header = _records(run)[0]
    # two dress triplets, two caption orders each (cmap join): all four queries train, none held out
    assert header["train_queries"] == 4 and "val_queries" not in header
    assert "last checkpoint" in header["selection"] and header["image_tower"] == "random init"
    assert not any("val" in r for r in _records(run))
    best, last = load_file(run / "best" / "model.safetensors"), load_file(run / "last" / "model.safetensors")
    assert all(torch.equal(best[k], last[k]) for k in last)
    result = evaluate_checkpoint(run / "best", progress=False)
    assert "the last one" in result["protocol"]["checkpoint"]
    assert result["protocol"]["image tower"] == "random init"
    assert "image tower: random init" in result["protocol_text"].splitlines()[-1]


def test_carve_holds_out_part_of_train(tmp_path):
    run = tmp_path / "run"
    train(_fashioniq(tmp_path, "data.val_fraction=0.5"), run, progress=False)
    header = _records(run)[0]
    assert header["train_queries"] + header["val_queries"] == 4 and header["val_queries"] > 0
    assert [r["step"] for r in _records(run) if "val" in r] == [2, 4]


def test_val_selects_on_the_benchmarks_own_val_split(tmp_path):
    run = tmp_path / "run"
    train(_fashioniq(tmp_path, "train.selection=val"), run, progress=False)
    header = _records(run)[0]
    assert header["train_queries"] == 4
    # the fixture's dress val file has 3 triplets, each twice under the cmap join
    assert "own val split (6 queries)" in header["selection"]
    vals = [r["val"] for r in _records(run) if "val" in r]
    assert len(vals) == 2 and all(set(v) == {"dress/R@10", "dress/R@50", "R@10", "R@50", "avg"} for v in vals)
    assert "own val split" in evaluate_checkpoint(run / "best", progress=False)["protocol"]["checkpoint"]


def test_val_is_refused_without_a_val_split(tiny_css, tmp_path):
    config = load_config(None, [f"data.root={tiny_css}", "train.selection=val", *TINY[:5]])
    with pytest.raises(ConfigError, match="train.selection=val needs a benchmark with a validation split"):
        train(config, tmp_path / "run", progress=False)


def test_unknown_selection_and_early_stop_without_validation_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown train.selection 'best'"):
        train(_fashioniq(tmp_path / "a", "train.selection=best"), tmp_path / "a" / "run", progress=False)
    with pytest.raises(ConfigError, match="early_stop_patience needs a validation metric"):
        train(_fashioniq(tmp_path / "b", "train.selection=last", "train.early_stop_patience=2"),
              tmp_path / "b" / "run", progress=False)


def test_early_stop_after_evaluations_without_gain(tmp_path):
    # lr 0: the weights never change, so no evaluation after the first can beat it
    run = tmp_path / "run"
    train(_fashioniq(tmp_path, "train.selection=val", "train.lr=0", "train.iterations=20",
                     "train.early_stop_patience=2"), run, progress=False)
    records = _records(run)
    assert [r["step"] for r in records if "val" in r] == [2, 4, 6]
    assert records[-1] == {"step": 6, "early_stop": "2 evaluations without a better avg"}
    assert json.loads((run / "last" / "trainer.json").read_text())["step"] == 6


def test_learning_rate_milestones():
    config = load_config(None, ["train.lr_milestones=[4, 9]", "train.lr_decay_factor=0.1"])
    factors = [learning_rate_factor(config, step) for step in (0, 3, 4, 8, 9, 100)]
    assert factors == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    every = load_config(None, ["train.lr_decay_every=5", "train.lr_decay_factor=0.5"])
    assert [learning_rate_factor(every, step) for step in (0, 4, 5, 10)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    both = load_config(None, ["train.lr_milestones=[4]", "train.lr_decay_every=5"])
    with pytest.raises(ValueError, match="not both"):
        learning_rate_factor(both, 0)


def test_select_metric_may_sum_metrics():
    metrics = {"R@1": 10.0, "R@10": 40.0, "R@50": 75.5}
    assert metric_value(metrics, "R@10") == 40.0
    assert metric_value(metrics, "R@10 + R@50") == pytest.approx(115.5)
    with pytest.raises(ConfigError, match="'R@5' is not among the validation metrics"):
        metric_value(metrics, "R@1+R@5")
