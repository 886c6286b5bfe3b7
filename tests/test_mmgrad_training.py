"""MMGrad training: attention losses, mask sources, double backpropagation, explanation metrics."""

import json

import pytest
import torch

from cirlab.cli import main
from cirlab.config import MMGradConfig, load_config
from cirlab.data.benchmarks import load_splits
from cirlab.data.regions import EDIT_REGIONS_FILE, read_edit_regions
from cirlab.encoders.text import Vocabulary
from cirlab.explain.supervision import EditMasks, pixel_difference_masks
from cirlab.explain.training import check_mmgrad_config, mmgrad_attention_loss
from cirlab.losses import attention_loss
from cirlab.models.registry import create_model
from cirlab.train import train

# One item: the mask is the top-left pixel; the map's peak is elsewhere.
MAP = torch.tensor([[[0.2, 1.0], [0.4, 0.0]]])
MASK = torch.tensor([[[True, False], [False, False]]])


@pytest.mark.parametrize("form, expected", [
    # mean in 0.2, mean out 1.4/3; max in 0.2, max out 1.0:
    # 0.2 * (1.4/3 - 0.2 + 0.1) + 0.8 * (1.0 - 0.2 + 0.5)
    ("amc_margin", 0.2 * (1.4 / 3 - 0.1) + 0.8 * 1.3),
    ("energy", 1 - 0.2 / 1.6),
    ("mse", (0.8 ** 2 + 1.0 + 0.4 ** 2) / 4),
])
def test_attention_losses_match_hand_computed_values(form, expected):
    assert attention_loss(MAP, MASK, form).item() == pytest.approx(expected)


def test_empty_and_full_masks_are_left_out():
    maps = torch.cat([MAP, torch.rand(2, 2, 2)])
    masks = torch.cat([MASK, torch.zeros(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool)])
    assert attention_loss(maps, masks).item() == pytest.approx(attention_loss(MAP, MASK).item())
    assert attention_loss(maps[1:], masks[1:]).item() == 0.0


def test_pixel_difference_masks_dilate_the_changed_pixels():
    reference = torch.zeros(2, 3, 5, 5)
    target = reference.clone()
    target[0, 1, 2, 2] = 1.0   # centre pixel, one channel
    target[1, :, 0, 0] = 1.0   # corner pixel
    masks = pixel_difference_masks(reference, target, dilation=1)
    assert masks[0].sum().item() == 9 and masks[0, 1:4, 1:4].all()
    assert masks[1].sum().item() == 4 and masks[1, :2, :2].all()
    assert pixel_difference_masks(reference, target, dilation=0).sum().item() == 2


def test_edit_masks_follow_the_sidecar(tiny_css):
    train_split, _ = load_splits(load_config(None, [f"data.root={tiny_css}"]).data)
    masks = EditMasks(tiny_css / EDIT_REGIONS_FILE, "train")
    assert masks.coverage(train_split.queries) == 1.0
    record = next(r for r in read_edit_regions(tiny_css / EDIT_REGIONS_FILE) if r.split == "train")
    query = next(q for q in train_split.queries if (q.reference, q.text, q.target) ==
                 (record.reference, record.text, record.target))
    batch = masks.batch([query, query])
    assert batch.shape == (2, 64, 64) and torch.equal(batch[1], torch.from_numpy(record.reference_mask.copy()))


def _tiny_tirg(frozen: bool):
    config = load_config(None, ["model.image_backbone=resnet18", "model.image_weights=null",
                                "model.backbone_upto=layer2", "model.pooling=flatten", "model.map_size=[4,4]",
                                "model.embed_dim=8", f"model.freeze_backbone={str(frozen).lower()}"])
    torch.manual_seed(0)
    return create_model(config.model, Vocabulary.build(["make it red", "add a cube"]))


def test_double_backprop_trains_the_head_above_a_frozen_backbone():
    model = _tiny_tirg(frozen=True)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, :8, :8] = True
    loss = mmgrad_attention_loss(model, images, ["make it red", "add a cube"], images.flip(0), masks, MMGradConfig())
    loss.backward()
    head = [p for name, p in model.named_parameters() if "backbone" not in name and p.grad is not None]
    assert loss.item() > 0 and any(p.grad.abs().sum() > 0 for p in head)
    assert all(p.grad is None for p in model.image_encoder.backbone.parameters())


def test_the_map_passes_leave_batchnorm_statistics_unchanged():
    model = _tiny_tirg(frozen=True).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.item()) for m in norms]
    images, texts = torch.randn(2, 3, 32, 32), ["make it red", "add a cube"]
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, :8, :8] = True
    mmgrad_attention_loss(model, images, texts, images.flip(0), masks, MMGradConfig()).backward()
    assert norms and all(torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
                         and m.num_batches_tracked.item() == count for m, (mean, var, count) in zip(norms, before))
    model.encode_queries(images, texts)  # an ordinary training pass does move them
    assert not torch.equal(norms[0].running_mean, before[0][0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_double_backprop_reaches_lbf_on_grid_regions_through_math_attention(device):
    config = load_config(None, ["model.name=lbf", "model.image_backbone=resnet18", "model.image_weights=null",
                                "model.backbone_upto=layer2", "model.embed_dim=8", "model.freeze_backbone=true"])
    config.model.options = {"regions": "grid", "num_regions": 4, "width": 16, "heads": 2, "visual_layers": 1,
                            "text_layers": 1}
    torch.manual_seed(0)
    model = create_model(config.model, Vocabulary.build(["make it red", "add a cube"])).to(device)
    # The fused CUDA attention kernels have no double backward (on a GPU the loss below failed with them).
    fused_enabled = []
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.register_forward_pre_hook(lambda *_: fused_enabled.append(torch.backends.cuda.flash_sdp_enabled()))
    images = torch.randn(2, 3, 32, 32, device=device)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool, device=device)
    masks[:, :8, :8] = True
    loss = mmgrad_attention_loss(model, images, ["make it red", "add a cube"], images.flip(0), masks, MMGradConfig())
    loss.backward()
    assert loss.item() > 0 and model.region_projection[0].weight.grad.abs().sum() > 0
    assert fused_enabled and not any(fused_enabled) and torch.backends.cuda.flash_sdp_enabled()  # restored after


def test_detached_variant_reaches_only_a_trainable_backbone():
    with pytest.raises(ValueError, match="needs a trainable backbone"):
        check_mmgrad_config(MMGradConfig(detached=True), frozen_backbone=True)
    model = _tiny_tirg(frozen=False)
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 16:, 16:] = True
    loss = mmgrad_attention_loss(model, images, ["make it red", "add a cube"], images.flip(0), masks,
                                 MMGradConfig(detached=True))
    loss.backward()
    backbone_grads = [p.grad for p in model.image_encoder.backbone.parameters() if p.grad is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads)
    # The Grad-CAM weights are constants: layers above the map get no gradient from this loss.
    assert model.gate[-1].weight.grad is None


@pytest.mark.parametrize("key, value, message", [
    ("loss", "hinge", "unknown train.mmgrad.loss"),
    ("scalar", "cosine", "unknown train.mmgrad.scalar"),
    ("weight", -1.0, "weight must be >= 0"),
    ("start_step", -1, "start_step must be >= 0"),
])
def test_bad_mmgrad_settings_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        check_mmgrad_config(MMGradConfig(**{key: value}), frozen_backbone=True)


FROZEN = ["model.image_backbone=efficientnet_lite0", "model.backbone_upto=stage3", "model.pooling=flatten",
          "model.freeze_backbone=true", "model.embed_dim=32", "train.batch_size=8", "train.log_every=1",
          "data.val_fraction=0.2", "train.iterations=3", "train.eval_every=3"]


def test_training_with_the_attention_loss_logs_it_and_eval_reports_explanations(tiny_css, tmp_path, capsys):
    config = load_config(None, [f"data.root={tiny_css}", *FROZEN, "train.mmgrad.weight=1.0"])
    train(config, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(r["attention_loss"] > 0 for r in steps)
    assert main(["eval", str(tmp_path / "run" / "best"), "--explain", "12"]) == 0
    result = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    quality = result["explanations"]
    assert quality["queries"] == 12 and quality["tolerance_px"] == 2.0
    assert set(quality["maps"]) == {"mmgrad", "random", "centre_prior"}
    assert quality["maps"]["mmgrad"]["overall"]["count"] == 12
    out = capsys.readouterr().out
    assert "| centre_prior | overall |" in out
    # Maps of a fixed checkpoint are deterministic: a second evaluation gives identical metrics.
    assert main(["eval", str(tmp_path / "run" / "best"), "--explain", "12", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())["explanations"]
    assert again == quality


def test_the_attention_loss_joins_at_its_start_step(tiny_css, tmp_path):
    config = load_config(None, [f"data.root={tiny_css}", *FROZEN, "train.mmgrad.weight=1.0",
                                "train.mmgrad.start_step=2"])
    train(config, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r.get("attention_loss") for r in records if "loss" in r}
    assert logged[1] is None and logged[2] is None and logged[3] > 0


def test_lbf_on_per_image_boxes_is_refused_before_any_work(tiny_css, tmp_path):
    config = load_config(None, [f"data.root={tiny_css}", *FROZEN, "model.name=lbf", "model.pooling=gap",
                                "train.mmgrad.weight=1.0"])
    config.model.options = {"regions": "proposals", "num_regions": 4, "width": 16, "heads": 2}
    with pytest.raises(ValueError, match='regions "proposals" .* needs model.options.regions=grid'):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
