"""OFFSET: focus projection, focus revision, the loss terms, the towers it runs on, and training end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cirlab.checkpoint import load_checkpoint
from cirlab.config import ModelConfig, load_config
from cirlab.data.garments import generate_garments
from cirlab.encoders.clip import create_clip_backbone
from cirlab.encoders.image import ImageEncoder, create_backbone
from cirlab.encoders.text import LSTMTextEncoder, Vocabulary
from cirlab.evaluate import evaluate_checkpoint
from cirlab.image_batches import PixelImages
from cirlab.index.build import build_index
from cirlab.index.search import search_index
from cirlab.masks.batches import MaskedBatch, attach_masks
from cirlab.models.offset import (
    OFFSET,
    FocusProjection,
    FocusRevision,
    OffsetOptions,
    focus_regularisation,
)
from cirlab.models.registry import create_model
from cirlab.train import train

TEXTS = ["make it red", "has long sleeves and a star print"]


def _offset(dim: int = 16, **options: object) -> OFFSET:
    """OFFSET on EfficientNet-Lite0 cut after stage 2 (24 channels) and a small LSTM."""
    torch.manual_seed(0)
    image = ImageEncoder(create_backbone("efficientnet_lite0", upto="stage2"), out_dim=dim, freeze_backbone=True)
    text = LSTMTextEncoder(Vocabulary.build(TEXTS), word_dim=8, hidden_dim=12, out_dim=dim)
    return OFFSET(image, text, dim, OffsetOptions.from_dict({"masks": "none", **options})).eval()


def _pixels(count: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def _clip_offset(**options: object) -> OFFSET:
    """OFFSET on the tiny random-init CLIP ViT (width 64, 4 x 4 patches, 32-d features, 16-token text context)."""
    pytest.importorskip("open_clip")
    config = ModelConfig(name="offset", embed_dim=32, image_backbone="clip:cirlab-tiny-vit", image_weights=None,
                         backbone_upto="tokens", pooling="tower", text_encoder="clip:cirlab-tiny-vit",
                         options={"masks": "none", "heads": 2, **options})
    torch.manual_seed(0)
    return create_model(config, None).eval()


@pytest.mark.parametrize("points", [1, 3, 4, 8])
def test_focus_projection_shapes_for_several_p(points, one_torch_thread):
    tokens = torch.randn(3, 5, 16)
    projected = FocusProjection(16, points)(tokens)
    assert projected.shape == (3, points, 16)
    same = tokens[:, :1].expand(-1, 5, -1)      # softmax weights sum to one: pooling copies of a token gives it back
    torch.testing.assert_close(FocusProjection(16, points)(same), same[:, :1].expand(-1, points, -1))

    model = _offset(focus_channels=points)
    with torch.no_grad():
        targets, queries = model.encode_targets(_pixels()), model.encode_queries(_pixels(), TEXTS)
    assert targets.shape == (2, 2 * points, 16) and queries.shape == (2, 16)
    assert model.focus_weights.shape == (2 * points,)


def test_focus_projection_ignores_padding():
    projection = FocusProjection(8, 2)
    tokens = torch.randn(1, 3, 8)
    padded = projection(tokens, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(padded, projection(tokens[:, :2]))


def _fixed_revision(split: str) -> FocusRevision:
    """D = 1: H = sigmoid([h, -h]) with h = LeakyReLU(visual + text)."""
    revision = FocusRevision(1, split)
    first, second = revision.gates[0], revision.gates[2]
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 1.0]]))
        first.bias.zero_()
        second.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        second.bias.zero_()
    return revision


def test_revision_is_gamma_image_plus_beta_text():
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    leaky = lambda x: x if x > 0 else 0.01 * x  # noqa: E731
    visual, textual = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[-3.0], [0.5]]])
    h = [leaky(1 - 3), leaky(2 + 0.5)]          # -0.02, 2.5
    revised = _fixed_revision("per_token")(visual, textual)
    expected = [sigmoid(h[0]) * 1 + sigmoid(-h[0]) * -3, sigmoid(h[1]) * 2 + sigmoid(-h[1]) * 0.5]
    torch.testing.assert_close(revised, torch.tensor([[[expected[0]], [expected[1]]]]))
    # The code's reshape: the 2 x 2 gates read as 4 x 1, gamma = the first two rows (token 0's two halves),
    # beta = the last two (token 1's).
    code = _fixed_revision("code")(visual, textual)
    gates = [sigmoid(h[0]), sigmoid(-h[0]), sigmoid(h[1]), sigmoid(-h[1])]
    expected = [gates[0] * 1 + gates[2] * -3, gates[1] * 2 + gates[3] * 0.5]
    torch.testing.assert_close(code, torch.tensor([[[expected[0]], [expected[1]]]]))


def test_focus_regularisation_of_a_hand_computed_case():
    codes = torch.eye(2)                                    # p_i = softmax(<z_i, z_j>) = (e, 1)/(e+1), (1, e)/(e+1)
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    targets = torch.eye(2)                                  # q_i = (e, 1)/(e+1) for both queries
    e = math.e
    expected = (0 + (e - 1) / (e + 1)) / 2                  # KL(p_1 || q_1) = 0; KL(p_2 || q_2) = (e-1)/(e+1)
    assert focus_regularisation(queries, targets, codes, tau=1.0).item() == pytest.approx(expected)
    assert focus_regularisation(queries, targets, codes, tau=0.5).item() > expected  # sharper: further apart


def test_loss_is_batch_classification_plus_kappa_kl(one_torch_thread):
    model = _offset()
    queries, candidates = torch.randn(4, 16), torch.randn(4, 8, 16)
    loss = model.training_loss(*model.loss_features(queries, candidates), retrieval_loss=None)
    cosine = F.normalize(queries, dim=-1) @ F.normalize(candidates.mean(1), dim=-1).T
    codes = F.normalize(F.normalize(candidates, dim=-1).flatten(1), dim=-1)   # focus weights start at one
    soft = (codes @ codes.T / 0.1).softmax(dim=1)
    kl = (soft * (soft.log() - (cosine / 0.1).log_softmax(dim=1))).sum(dim=1).mean()
    expected = F.cross_entropy(10 * cosine, torch.arange(4)) + 0.5 * kl
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.score(queries, candidates), cosine)
    torch.testing.assert_close(model.score(queries, candidates.flatten(1)), cosine)   # as an index stores them


def test_options_and_inputs_are_checked(one_torch_thread):
    with pytest.raises(ValueError, match="unknown OFFSET option"):
        OffsetOptions.from_dict({"P": 4})
    with pytest.raises(ValueError, match="unknown OFFSET revision_split"):
        OffsetOptions.from_dict({"revision_split": "bogus"})
    with pytest.raises(ValueError, match="unknown OFFSET text_tokens 'eot' \\(known: valid, all\\)"):
        OffsetOptions.from_dict({"text_tokens": "eot"})
    with pytest.raises(ValueError, match="do not split into 5 heads"):
        _offset(heads=5)
    model = _offset()
    with pytest.raises(ValueError, match="must come with its masks"):
        model.encode_targets(torch.randn(2, 24, 8, 8))   # cached maps without masks
    with pytest.raises(ValueError, match="made per dataset image"):
        _offset(masks="oracle").encode_targets(_pixels())


def test_code_behaviours_change_the_output_not_the_shapes(one_torch_thread):
    outputs = {}
    for name, options in {"default": {}, "code_split": {"revision_split": "code"},
                          "no_revision": {"revision": False}}.items():
        with torch.no_grad():
            outputs[name] = _offset(**options).encode_queries(_pixels(), TEXTS)
    assert all(output.shape == (2, 16) for output in outputs.values())
    assert all(not torch.allclose(outputs["default"], outputs[name]) for name in outputs if name != "default")


def test_any_tower_works_a_clip_vit(one_torch_thread):
    model = _clip_offset()
    tower = model.image_encoder.backbone
    with torch.no_grad():
        fmap = tower(_pixels())
        assert model._tokens(fmap).shape == (2, 16, 64)     # the 4 x 4 patch tokens, not the class token
        assert model.encode_targets(_pixels()).shape == (2, 8, 32)
        assert model.encode_queries(_pixels(), TEXTS).shape == (2, 32)


def test_first_token_reads_the_fused_map_through_clips_own_projection(one_torch_thread):
    """The code: G_v = [X̃'_0 @ visual.proj + g, g, ǧ], X̃'_0 the fused map's first position, with no new weights."""
    model = _clip_offset(fused_global="first_token")
    tower = model.image_encoder.backbone
    assert "visual.global_projection.weight" not in model.state_dict()
    assert "visual.global_projection.weight" in _clip_offset().state_dict()   # the mean readout has its own Linear
    with torch.no_grad():
        tower.trunk.proj.normal_()   # a projection unlike any other weight, so a stand-in could not match it
        photo_map, mask_map = model._maps(_pixels())
        photo_global, mask_global = tower.pool(photo_map), tower.pool(mask_map)
        fused = model.visual.attention(model._tokens(photo_map), model._tokens(mask_map))
        by_hand = torch.einsum("bc,cd->bd", fused[:, 0], tower.trunk.proj)
        torch.testing.assert_close(model.visual.readout(fused), by_hand)
        global_set = torch.stack([by_hand + photo_global, photo_global, mask_global], dim=1)
        points = model.options.focus_channels
        torch.testing.assert_close(model.encode_targets(_pixels())[:, :points], model.visual.focus(global_set))


def test_first_token_needs_a_tower_projection_of_the_model_size(one_torch_thread):
    with pytest.raises(ValueError, match="only CLIP towers have .*: use fused_global=mean"):
        _offset(fused_global="first_token")
    pytest.importorskip("open_clip")
    image = ImageEncoder(create_clip_backbone("clip:cirlab-tiny-vit", upto="tokens"), out_dim=16, pooling="gap")
    text = LSTMTextEncoder(Vocabulary.build(TEXTS), word_dim=8, hidden_dim=12, out_dim=16)
    with pytest.raises(ValueError, match="projects to 32, not model.embed_dim=16"):
        OFFSET(image, text, 16, OffsetOptions.from_dict({"masks": "none", "fused_global": "first_token"}))


@pytest.mark.parametrize("positions", ["valid", "all"])
def test_text_tokens_choose_the_positions_the_text_focus_pools(positions, one_torch_thread):
    """With uniform focus weights (W_b = 0) the local text set is a plain mean: over the text's own tokens
    (valid), or over all 16 positions of the CLIP context, padding included (all, the code's)."""
    model = _clip_offset(text_tokens=positions)
    texts = ["make it red", "a much longer text that runs past the sixteen tokens of the tiny text tower"]
    with torch.no_grad():
        model.textual.focus.weights[2].weight.zero_()
        tokens, real = model.text_encoder.forward_tokens(texts)
        assert real.sum(dim=1).tolist() == [5, 16]   # start, make, it, red, end; the long one fills the context
        local = model.textual.local_projection(tokens)
        weights = real.float() if positions == "valid" else torch.ones_like(real, dtype=torch.float)
        expected = (local * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        points = model.options.focus_channels
        pooled = model._textual(texts, torch.randn(2, 32))[:, points:]
    torch.testing.assert_close(pooled, expected[:, None].expand(-1, points, -1))
    short_mean_of_all = local[0].mean(dim=0)
    assert torch.allclose(pooled[0, 0], short_mean_of_all) == (positions == "all")


def test_all_text_positions_need_a_fixed_text_context(one_torch_thread):
    with pytest.raises(ValueError, match="text_tokens=all .*LSTMTextEncoder pads to the batch's longest text"):
        _offset(text_tokens="all")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """OFFSET trained for two steps on a tiny garments set, from cached maps and saliency masks built on demand."""
    work = tmp_path_factory.mktemp("offset")
    data = generate_garments(work / "garments", image_size=48, layout="fashioniq", progress=False, families=2)
    config = load_config("configs/garments/offset.yaml", [
        f"data.root={data}", "data.image_size=null", "model.embed_dim=16", "model.backbone_upto=stage3",
        "train.batch_size=4", "train.iterations=2", "train.eval_every=2", "train.log_every=1",
        "data.val_fraction=0.2"])
    train(config, work / "run", progress=False)
    return data, work / "run"


def test_training_from_cached_maps_and_an_exact_score(trained, one_torch_thread):
    data, run = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "step" in record and "loss" in record]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert (data / "dominant_masks" / "saliency" / "manifest.json").is_file()

    model = load_checkpoint(run / "best").model.eval()
    paths = sorted((data / "images").glob("*.jpg"))[:5]
    pixels = PixelImages(paths, progress=False)
    images = attach_masks(model, pixels, pixels, paths, progress=False)   # finds the cache the training built
    with torch.no_grad():
        batch = images.batch([0, 1, 2, 3, 4])
        queries, targets = model.encode_queries(batch, TEXTS * 2 + TEXTS[:1]), model.encode_targets(batch)
        expected = torch.stack([torch.stack([F.cosine_similarity(q, t.mean(0), dim=0) for t in targets])
                                for q in queries])
        torch.testing.assert_close(model.score(queries, targets), expected)
        # A bare photo gets its saliency mask computed on the fly, identical to the cached one at the file's size.
        torch.testing.assert_close(model.encode_targets(pixels.batch([0, 1])), targets[:2])
    assert isinstance(batch, MaskedBatch)

    result = evaluate_checkpoint(run / "best", progress=False)
    assert set(result["metrics"]) >= {"R@10", "R@50"} and 0 <= result["metrics"]["R@10"] <= 100


def test_an_index_ranks_by_the_exact_score(trained, tmp_path, one_torch_thread):
    data, run = trained
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    names = [path.name for path in sorted((data / "images").glob("*.jpg"))[:6]]
    for name in names:
        (gallery / name).write_bytes((data / "images" / name).read_bytes())
    model = load_checkpoint(run / "best").model.eval()
    with build_index(run / "best", gallery, tmp_path / "index", progress=False) as index:
        hits = search_index(index, model, names[0], TEXTS[0], k=6, exclude_reference=False)
        # one unit vector per image, whose cosine is the score itself: no features kept for a second stage
        assert (index.dim, index.feature_dim) == (model.embed_dim, 0)
    pixels = PixelImages([gallery / name for name in names], progress=False)
    with torch.no_grad():   # bare photos: their saliency masks are computed from the pixels
        query = model.encode_queries(pixels.batch([0]), TEXTS[:1])
        scores = model.score(query, model.encode_targets(pixels.batch(range(6))))[0]
    order = scores.argsort(descending=True).tolist()
    assert [name for name, _ in hits] == [names[i] for i in order]
    torch.testing.assert_close(torch.tensor([score for _, score in hits]), scores[order], atol=1e-5, rtol=0)
