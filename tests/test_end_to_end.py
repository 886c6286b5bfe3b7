"""A few training steps on tiny data: checkpoints, exact resume, evaluation through the CLI."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cirlab.checkpoint import load_checkpoint
from cirlab.cli import main
from cirlab.config import load_config
from cirlab.data.benchmarks import load_splits
from cirlab.data.css import load_css
from cirlab.encoders.image import create_backbone
from cirlab.evaluate import css_protocol, evaluate_split
from cirlab.image_batches import PixelImages
from cirlab.train import train

FROZEN = ["model.image_backbone=efficientnet_lite0", "model.backbone_upto=stage3", "model.pooling=flatten",
          "model.freeze_backbone=true", "model.embed_dim=64", "train.batch_size=8", "train.log_every=1"]


def _config(root, *overrides):
    return load_config(None, [f"data.root={root}", "data.val_fraction=0.2", *FROZEN, *overrides])


def test_resume_gives_identical_weights(tiny_css, tmp_path):
    straight = train(_config(tiny_css, "train.iterations=6", "train.eval_every=3"), tmp_path / "a", progress=False)
    train(_config(tiny_css, "train.iterations=3", "train.eval_every=3"), tmp_path / "b", progress=False)
    train(_config(tiny_css, "train.iterations=6", "train.eval_every=3"), tmp_path / "b", resume=True, progress=False)
    a = load_file(straight.run_dir / "last" / "model.safetensors")
    b = load_file(tmp_path / "b" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = _config(tiny_css, "train.iterations=0")
    assert json.loads((tmp_path / "b" / "last" / "trainer.json").read_text())["step"] == 6
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert records[0]["config"]["model"]["name"] == initial.model.name


def test_trained_weights_move_and_eval_cli_reports_the_protocol(tiny_css, tmp_path, capsys):
    run = tmp_path / "run"
    config = _config(tiny_css, "train.iterations=4", "train.eval_every=2", "model.name=concat")
    train(config, run, progress=False)
    code = main(["eval", str(run / "best")])
    assert code == 0
    result = json.loads((run / "eval-test.json").read_text())
    test_queries = load_css(tiny_css).test.queries()
    assert result["queries"] == len(test_queries)
    assert result["protocol"]["reference"] == "removed (that exact image only)"
    assert set(result["metrics"]) == {"R@1", "R@5", "R@10", "R@50"}
    assert "reference = removed" in (run / "eval-test.md").read_text()
    assert "| concat |" in capsys.readouterr().out
    # The EvalSet path of `cirlab eval` and the label-based path of training give the same numbers.
    checkpoint = load_checkpoint(run / "best")
    _, test_split = load_splits(checkpoint.config.data)
    labelled = evaluate_split(checkpoint.model, test_split, PixelImages(test_split.image_paths, progress=False),
                              css_protocol(checkpoint.config.protocol), torch.device("cpu"), progress=False)
    assert result["metrics"] == pytest.approx(labelled)


def test_end_to_end_backbone_training_without_cache(tiny_css, tmp_path):
    """A trainable ResNet-18 (cut at layer2) learns from pixels, not from a feature cache."""
    config = load_config(None, [f"data.root={tiny_css}", "data.val_fraction=0.2", "model.image_backbone=resnet18",
                                "model.image_weights=null", "model.backbone_upto=layer2", "model.embed_dim=32",
                                "train.batch_size=4", "train.iterations=2", "train.eval_every=2"])
    train(config, tmp_path / "r", progress=False)
    weights = load_file(tmp_path / "r" / "last" / "model.safetensors")
    torch.manual_seed(config.train.seed)  # train() builds the backbone first after seeding
    initial = create_backbone("resnet18", weights=None, upto="layer2").state_dict()
    trained = weights["image_encoder.backbone.trunk.conv1.weight"]
    assert trained.shape == initial["trunk.conv1.weight"].shape
    start = initial["trunk.conv1.weight"]
    assert not torch.equal(trained, start)
    # the same initial weights, moved by two SGD steps (an unrelated init would correlate near 0)
    assert torch.corrcoef(torch.stack([trained.flatten(), start.flatten()]))[0, 1] > 0.5


@pytest.mark.parametrize("args, message", [
    (["--set", "model.name=nope"], "unknown model 'nope'"),
    (["--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
    (["--set", "train.lr=fast"], "train.lr' needs a number"),
])
def test_train_rejects_bad_settings_and_writes_nothing(tiny_css, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = main(["train", "--set", f"data.root={tiny_css}", *args, "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_existing_run_is_never_overwritten_silently(tiny_css, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--set", f"data.root={tiny_css}", *[f"--set={o}" for o in FROZEN],
            "--set", "train.iterations=2", "--set", "train.eval_every=2", "--out", str(out)]
    assert main(args) == 0
    before = (out / "last" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (out / "last" / "model.safetensors").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0


def test_evaluations_sharing_an_image_cache_reuse_one_frozen_backbones_maps(tiny_css, tmp_path):
    """Benchmarks evaluate many runs: with an `image_cache` the decoded images and the frozen backbone's maps are
    computed once and shared by runs with the same backbone weights, and the metrics stay those of pixels."""
    from cirlab.evaluate import evaluate_checkpoint, frozen_backbone_key

    for name, seed in (("a", 0), ("b", 1)):
        train(_config(tiny_css, "train.iterations=2", "train.eval_every=2", f"train.seed={seed}"), tmp_path / name,
              progress=False)
    cache = {}
    shared = [evaluate_checkpoint(tmp_path / n / "best", progress=False, image_cache=cache)["metrics"] for n in "ab"]
    alone = [evaluate_checkpoint(tmp_path / n / "best", progress=False)["metrics"] for n in "ab"]
    assert shared == alone
    assert len(cache) == 2  # one set of decoded pixels, one of maps: the bundled weights are the same in both runs
    a, b = (load_checkpoint(tmp_path / n / "best").model for n in "ab")
    assert frozen_backbone_key(a) == frozen_backbone_key(b) is not None
    with torch.no_grad():
        next(b.image_encoder.backbone.parameters()).add_(1e-3)
    assert frozen_backbone_key(a) != frozen_backbone_key(b)
    b.image_encoder.freeze_backbone = False
    assert frozen_backbone_key(b) is None


def test_loading_a_checkpoint_draws_no_random_initial_values(tiny_index):
    """Every tensor comes from the file, so building the model draws nothing from torch's generator, and
    modules built afterwards are randomly initialised again."""
    before = torch.get_rng_state()
    model = load_checkpoint(tiny_index.checkpoint).model
    assert torch.equal(torch.get_rng_state(), before)
    saved = load_file(tiny_index.checkpoint / "model.safetensors")
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in saved.items())
    assert not torch.equal(torch.nn.Linear(4, 4).weight, torch.nn.Linear(4, 4).weight)
