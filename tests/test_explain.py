import inspect
import math

import numpy as np
import pytest
import torch

from cirlab.config import load_config
from cirlab.encoders.text import Vocabulary
from cirlab.explain.gradcam import (
    MMGRAD_SCALARS,
    gradcam,
    mmgrad,
    mmgrad_scalar,
    query_target_gradcam,
    upsample_map,
)
from cirlab.explain.metrics import (
    MapScores,
    centre_prior_baseline,
    energy_in_mask,
    pixel_average_precision,
    pointing_game,
    random_baseline,
    score_map,
    summarise,
)
from cirlab.models.registry import create_model

TEXTS = ["make red", "make red"]


@pytest.fixture(scope="module")
def tirg():
    torch.manual_seed(0)
    config = load_config(None, ["model.image_backbone=resnet18", "model.image_weights=null",
                                "model.backbone_upto=layer2", "model.embed_dim=16"]).model
    return create_model(config, Vocabulary.build(["make red"])).eval()


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=generator), torch.randn(2, 3, 64, 64, generator=generator)


@pytest.fixture(scope="module")
def cached_maps(tirg, images):
    """Backbone maps of `images`, as a feature cache holds them: the heads alone keep tests fast."""
    with torch.no_grad():
        return tuple(tirg.image_encoder.backbone(x) for x in images)


def _hot_map(locations: list[tuple[int, int]], hot_channel: int = 1) -> torch.Tensor:
    """A non-negative 4-channel 5x5 map: channel `hot_channel` peaks at each item's location, a larger
    distractor sits on channel 3 elsewhere."""
    fmap = torch.rand(len(locations), 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 0.5
    for item, (row, col) in enumerate(locations):
        fmap[item, hot_channel, row, col] = 1.0
        fmap[item, 3, 4 - row, 4 - col] = 5.0
    return fmap.requires_grad_()


def test_gradcam_of_a_one_location_score_is_that_channel_and_peaks_there():
    locations = [(1, 3), (4, 0)]
    fmap = _hot_map(locations)

    def score(a):  # linear in channel 1 at each item's own location only
        return torch.stack([2.0 * a[i, 1, r, c] for i, (r, c) in enumerate(locations)])

    cam = gradcam(score, fmap)
    assert cam.shape == (2, 5, 5)
    # dScore/dA is 2 at one cell of channel 1, so alpha = (0, 2/25, 0, 0) and the map is 2/25 * A_1.
    assert torch.allclose(cam, 2.0 / 25 * fmap[:, 1].detach())
    assert [divmod(int(i), 5) for i in cam.flatten(1).argmax(dim=1)] == locations


def test_gradcam_relu_removes_negative_evidence_and_unused_maps_give_zeros():
    fmap = _hot_map([(2, 2)])
    assert torch.equal(gradcam(lambda a: -a[:, 1, 2, 2], fmap), torch.zeros(1, 5, 5))
    assert torch.equal(gradcam(lambda a: torch.ones(1), fmap), torch.zeros(1, 5, 5))
    with pytest.raises(ValueError, match="one score per item"):
        gradcam(lambda a: a.sum(), fmap)


def test_query_target_gradcam_of_tirg_is_an_8x8_nonnegative_deterministic_map(tirg, images):
    reference, target = images
    cam = query_target_gradcam(tirg, reference, TEXTS, target)
    assert cam.shape == (2, 8, 8)
    assert (cam >= 0).all() and cam.sum() > 0
    with torch.no_grad():  # explanations inside an evaluation loop still get their gradients
        again = query_target_gradcam(tirg, reference, TEXTS, target)
    assert torch.equal(cam, again)
    target_cam = query_target_gradcam(tirg, reference, TEXTS, target, side="target")
    assert target_cam.shape == (2, 8, 8) and not torch.allclose(target_cam, cam)
    with pytest.raises(ValueError, match="side"):
        query_target_gradcam(tirg, reference, TEXTS, target, side="both")


def test_create_graph_lets_a_loss_on_the_map_reach_parameters_through_the_gradient(tirg, cached_maps):
    reference, target = cached_maps
    # The text encoder reaches the map only through alpha = dScore/dA: a second-order path.
    embedding = tirg.text_encoder.embedding.weight
    first_order = query_target_gradcam(tirg, reference, TEXTS, target)
    assert torch.autograd.grad(first_order.sum(), embedding, allow_unused=True)[0] is None
    for cam in (query_target_gradcam(tirg, reference, TEXTS, target, create_graph=True),
                mmgrad(tirg, reference, TEXTS, target, create_graph=True)):
        (grad,) = torch.autograd.grad(upsample_map(cam, (64, 64)).sum(), embedding)
        assert grad.abs().sum() > 0


def test_mmgrad_scalars_on_hand_computed_features():
    z_reference = torch.tensor([[3.0, 0.0, 0.0, 0.0]])  # normalised to e1
    z_target = torch.tensor([[0.0, 0.5, 0.0, 0.0]])  # normalised to e2; |difference| = (1, 1, 0, 0)
    assert mmgrad_scalar(z_reference, z_target, "diff_thresh", top_fraction=0.25).item() == pytest.approx(1.0)
    assert mmgrad_scalar(z_reference, z_target, "diff_thresh", top_fraction=0.5).item() == pytest.approx(2.0)
    assert mmgrad_scalar(z_reference, z_target, "diff_l2").item() == pytest.approx(2.0)
    assert mmgrad_scalar(z_reference, z_target, "sim").item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="top_fraction"):
        mmgrad_scalar(z_reference, z_target, "diff_thresh", top_fraction=0.0)


def test_mmgrad_default_is_documented_and_the_switches_give_different_maps(tirg, cached_maps):
    reference, target = cached_maps
    assert inspect.signature(mmgrad).parameters["scalar"].default == "diff_thresh"
    assert '(default ``"diff_thresh"``' in mmgrad.__doc__
    maps = {scalar: mmgrad(tirg, reference, TEXTS, target, scalar=scalar) for scalar in MMGRAD_SCALARS}
    assert torch.equal(maps["retrieval_score"], query_target_gradcam(tirg, reference, TEXTS, target))
    for scalar, cam in maps.items():
        assert cam.shape == (2, 8, 8) and (cam >= 0).all() and cam.sum() > 0, scalar
    for i, first in enumerate(MMGRAD_SCALARS):
        for second in MMGRAD_SCALARS[i + 1:]:
            assert not torch.allclose(maps[first], maps[second]), (first, second)
    assert not torch.allclose(mmgrad(tirg, reference, TEXTS, target, side="target"), maps["diff_thresh"])
    with pytest.raises(ValueError, match="scalar"):
        mmgrad(tirg, reference, TEXTS, target, scalar="threshold")


def test_upsample_map_is_bilinear_then_min_max_per_item():
    cam = torch.tensor([[[0.0, 2.0], [0.0, 2.0]], [[3.0, 3.0], [3.0, 3.0]]])
    out = upsample_map(cam, (4, 4))
    assert out.shape == (2, 4, 4)
    # align_corners=False samples source columns at -0.25, 0.25, 0.75, 1.25 (clamped at the borders).
    assert torch.allclose(out[0], torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4))
    assert torch.equal(out[1], torch.zeros(4, 4))  # constant: no location preferred


def _mask(*pixels: tuple[int, int], shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for pixel in pixels:
        mask[pixel] = True
    return mask


def test_pointing_game_tolerance_and_ties():
    saliency = np.zeros((4, 4))
    saliency[0, 0] = 1.0
    corner = _mask((3, 3))  # sqrt(18) = 4.243 px from the peak
    assert not pointing_game(saliency, corner, tolerance_px=4.2)
    assert pointing_game(saliency, corner, tolerance_px=4.25)
    assert pointing_game(saliency, _mask((0, 0)), tolerance_px=0)
    assert not pointing_game(saliency, _mask((0, 1)), tolerance_px=0)
    assert pointing_game(saliency, _mask((0, 1)), tolerance_px=1)  # inclusive at exactly 1 px
    flat = np.full((4, 4), 0.5)  # all tied: the first pixel in row-major order is the argmax
    assert pointing_game(flat, _mask((0, 0)), tolerance_px=0)
    assert not pointing_game(flat, _mask((0, 1), (1, 0)), tolerance_px=0)
    with pytest.raises(ValueError, match="empty"):
        pointing_game(saliency, _mask(), tolerance_px=1)


def test_energy_in_mask():
    saliency = np.arange(16.0).reshape(4, 4)
    top_left = _mask((0, 0), (0, 1), (1, 0), (1, 1))
    assert energy_in_mask(saliency, top_left) == pytest.approx((0 + 1 + 4 + 5) / 120)
    assert energy_in_mask(np.zeros((4, 4)), top_left) == pytest.approx(4 / 16)  # all-zero = chance
    with pytest.raises(ValueError, match="non-negative"):
        energy_in_mask(-saliency, top_left)
    with pytest.raises(ValueError, match="bool"):
        energy_in_mask(saliency, top_left.astype(int))


def test_pixel_average_precision_against_hand_computed_values():
    ramp = np.arange(16.0).reshape(4, 4)
    top_row = _mask((0, 0), (0, 1), (0, 2), (0, 3))
    assert pixel_average_precision(-ramp, top_row) == pytest.approx(1.0)
    # Reversed: the 4 positives are ranked 13th..16th.
    assert pixel_average_precision(ramp, top_row) == pytest.approx((1 / 13 + 2 / 14 + 3 / 15 + 4 / 16) / 4)
    positives = _mask((0, 0), (0, 1), (1, 0), (1, 1))
    assert pixel_average_precision(positives.astype(float), positives) == pytest.approx(1.0)
    # Ties enter together: one positive alone at 3; one positive and one negative tied at 2; the rest
    # tied at 0. Thresholds give (P, R) = (1, 1/4), (2/3, 2/4), (4/16, 1): AP = 1/4 + 1/6 + 1/8.
    tied = np.zeros((4, 4))
    tied[0, 0], tied[0, 1], tied[3, 3] = 3.0, 2.0, 2.0
    assert pixel_average_precision(tied, positives) == pytest.approx(13 / 24)
    assert pixel_average_precision(np.zeros((4, 4)), positives) == pytest.approx(4 / 16)


def test_baselines():
    noise = random_baseline((4, 5), seed=3)
    assert noise.shape == (4, 5) and np.array_equal(noise, random_baseline((4, 5), seed=3))
    assert not np.array_equal(noise, random_baseline((4, 5), seed=4))
    prior = centre_prior_baseline((3, 3))  # sigma = 0.75 px on both axes
    edge, corner = math.exp(-0.5 / 0.75 ** 2), math.exp(-1.0 / 0.75 ** 2)
    assert np.allclose(prior, [[corner, edge, corner], [edge, 1.0, edge], [corner, edge, corner]])


def test_score_map_and_summarise_group_per_edit_type():
    scores = score_map(np.arange(16.0).reshape(4, 4), _mask((3, 3)), "make", tolerance_px=0)
    assert scores == MapScores("make", True, pytest.approx(15 / 120), pytest.approx(1.0))
    records = [MapScores("add", True, 0.5, 1.0), MapScores("add", False, 0.3, 0.5), MapScores("remove", True, 1.0, 1.0)]
    summary = summarise(records)
    assert list(summary) == ["add", "remove", "overall", "macro"]
    assert summary["add"] == pytest.approx({"pointing_game": 0.5, "energy_in_mask": 0.4, "pxap": 0.75, "count": 2})
    assert summary["remove"] == pytest.approx({"pointing_game": 1.0, "energy_in_mask": 1.0, "pxap": 1.0, "count": 1})
    assert summary["overall"] == pytest.approx({"pointing_game": 2 / 3, "energy_in_mask": 0.6, "pxap": 2.5 / 3,
                                                "count": 3})
    assert summary["macro"] == pytest.approx({"pointing_game": 0.75, "energy_in_mask": 0.7, "pxap": 0.875,
                                              "count": 3})
    with pytest.raises(ValueError, match="no records"):
        summarise([])


def test_heatmap_overlay_colours_and_scale():
    from PIL import Image

    from cirlab.explain.overlay import heatmap_overlay

    image = Image.new("RGB", (5, 4), (255, 255, 255))
    saliency = np.zeros((4, 5))
    saliency[2, 3] = 1.0
    opaque = np.asarray(heatmap_overlay(image, saliency, alpha=1.0))
    assert tuple(opaque[2, 3]) == (128, 0, 0)      # jet(1) = dark red
    assert tuple(opaque[0, 0]) == (0, 0, 128)      # jet(0) = dark blue
    half = np.asarray(heatmap_overlay(image, saliency, alpha=0.5, scale=3))
    assert half.shape == (12, 15, 3)
    # (white + dark red) / 2 = (0.75, 0.5, 0.5) * 255, rounded; one pixel became a 3x3 block
    assert tuple(half[6, 9]) == tuple(half[8, 11]) == (191, 128, 128)
    with pytest.raises(ValueError, match="does not match"):
        heatmap_overlay(image, np.zeros((5, 4)))


def test_explain_cli_writes_a_deterministic_overlay(tiny_css, tmp_path, capsys):
    from PIL import Image

    from cirlab.cli import main
    from cirlab.config import load_config
    from cirlab.train import train

    config = load_config(None, [f"data.root={tiny_css}", "data.val_fraction=0.2", "model.image_backbone=resnet18",
                                "model.image_weights=null", "model.backbone_upto=layer2", "model.embed_dim=16",
                                "train.batch_size=4", "train.iterations=2", "train.eval_every=2"])
    train(config, tmp_path / "run", progress=False)
    images = tiny_css / "images"
    args = ["explain", str(tmp_path / "run" / "best"), "--image", str(images / "css_test_000000.png"),
            "--text", "remove object", "--target", str(images / "css_test_000001.png"), "--scale", "2"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (128, 128)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert "hottest pixel" in capsys.readouterr().out
    assert main([*args[:5], "  ", *args[6:], "--out", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


def test_mmgrad_in_train_mode_gives_identical_images_a_zero_map(images):
    """The training loss calls MMGrad in train mode: both passes must share one dropout mask, or the
    difference of two identical images is dropout noise."""
    torch.manual_seed(0)
    config = load_config(None, ["model.image_backbone=resnet18", "model.image_weights=null",
                                "model.backbone_upto=layer2", "model.embed_dim=16"]).model
    model = create_model(config, Vocabulary.build(["make red"])).train()
    assert any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in model.modules())
    reference, target = images
    same = mmgrad(model, reference, TEXTS, reference.clone())
    assert torch.count_nonzero(same) == 0
    different = mmgrad(model, reference, TEXTS, target)
    assert torch.count_nonzero(different) > 0
    assert model.training  # MMGrad leaves the mode as it found it
