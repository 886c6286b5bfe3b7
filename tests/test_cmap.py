"""CMAP (`cirlab.models.cmap`), its multi-level image features, the BiGRU text encoder and the level cache."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cirlab.checkpoint import load_checkpoint, save_checkpoint
from cirlab.config import load_config
from cirlab.encoders.multilevel import CrossLevelInteraction, gem
from cirlab.encoders.text import BiGRUTextEncoder, Vocabulary
from cirlab.image_batches import CachedMaps, LevelMaps, PixelImages
from cirlab.models.cmap import CMAP, CMAPOptions, reversed_attention, self_contrastive_loss
from cirlab.models.registry import create_model
from cirlab.train import train

TEXTS = ["make it red", "add a cube", "remove the sphere"]
TINY = ["model.name=cmap", "model.image_backbone=resnet18", "model.image_weights=null", "model.embed_dim=8",
        "model.text_encoder=bigru", "model.freeze_backbone=true"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(*settings: str, vocab_texts: list[str] = TEXTS) -> CMAP:
    torch.manual_seed(0)
    return create_model(load_config(None, [*TINY, *settings]).model, Vocabulary.build(vocab_texts)).eval()


def _write_images(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"i{i:02d}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)
    return paths


def _glove(path: Path, words: dict[str, float]) -> Path:
    """A GloVe-format file: each word's 300-d vector is its value in every component."""
    path.write_text("".join(f"{word} {' '.join([str(value)] * 300)}\n" for word, value in words.items()))
    return path


# -- the self-contrastive loss -------------------------------------------------------------------------

def test_reversed_attention_by_hand():
    attention = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    # mean 0.25 per row: 2 * 0.25 - A
    expected = torch.tensor([[0.4, 0.3, 0.2, 0.1], [-0.2, 0.4, 0.4, 0.4]])
    assert torch.allclose(reversed_attention(attention), expected, atol=1e-7)
    assert torch.allclose(reversed_attention(attention).sum(dim=1), torch.ones(2))


def test_self_contrastive_hinge_by_hand():
    # A = [0.75, 0.25] -> rev(A) = [0.25, 0.75]; target [1, 1]: kept view [3, 1]/sqrt(10), ignored [1, 3]/sqrt(10).
    attention = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    targets = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    high, low = 3 / math.sqrt(10), 1 / math.sqrt(10)
    # first: 0.6 + 0.9487 - 0.3162 = 1.2325; second: 0.6 + 0.3162 - 0.9487 < 0, so 0
    assert self_contrastive_loss(anchors, attention, targets, 0.6).item() == pytest.approx(0.6 + high - low, abs=1e-6)
    # margin 0.7 makes the second one count too: 0.7 - 0.6325 = 0.0675
    both = (0.7 + high - low) + (0.7 + low - high)
    assert self_contrastive_loss(anchors, attention, targets, 0.7).item() == pytest.approx(both, abs=1e-6)


# -- scores and the objective ----------------------------------------------------------------------------

def _state(batch: int, levels: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(batch, 4 + levels, dim, generator=generator)
    rows[:, 2:4] = rows[:, 2:4].softmax(dim=-1)  # A_m, A_p
    return rows


def test_score_is_the_per_pair_definition():
    model = _model()
    state = _state(3, 3, 8, seed=1)
    targets = F.normalize(torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    expected = torch.zeros(3, 5)
    for i in range(3):
        transformed, modification, preservation = state[i, 1], state[i, 2], state[i, 3]
        for j in range(5):
            for k in range(3):
                t = targets[j, k]
                expected[i, j] += (transformed * F.normalize(modification * t, dim=0)).sum()
                expected[i, j] += (state[i, 4 + k] * F.normalize(preservation * t, dim=0)).sum()
    assert torch.allclose(model.score(state, targets), expected, atol=1e-5)
    assert torch.allclose(model.score(state, targets.reshape(5, -1)), expected, atol=1e-5)  # as an index stores them
    # The code's EM-only and IS-only ablations score with one term; together they make the full score.
    em_only, is_only = _model("model.options.scores=em"), _model("model.options.scores=is")
    em_expected = torch.zeros(3, 5)
    for i in range(3):
        for j in range(5):
            for k in range(3):
                em_expected[i, j] += (state[i, 1] * F.normalize(state[i, 2] * targets[j, k], dim=0)).sum()
    assert torch.allclose(em_only.score(state, targets), em_expected, atol=1e-5)
    assert torch.allclose(is_only.score(state, targets), expected - em_expected, atol=1e-5)
    assert not torch.allclose(em_expected, expected - em_expected, atol=1e-3)
    with pytest.raises(ValueError, match="B x 7 x d"):
        model.score(state[:, :6], targets)


def test_training_loss_is_matching_plus_weighted_self_contrastive():
    model = _model()
    state, targets = _state(4, 3, 8, seed=3), F.normalize(torch.randn(4, 3, 8), dim=-1)
    labels = torch.arange(4)
    matching = sum(F.cross_entropy(math.exp(2.65926) * scores, labels) for scores in model.level_scores(state, targets))
    anchor, preservation = state[:, 0], state[:, 3]
    contrastive = sum(weight * self_contrastive_loss(anchor, preservation, targets[:, k], margin)
                      for k, (weight, margin) in enumerate([(1.0, 0.6), (1.0, 0.4), (0.5, 0.3)]))
    loss = model.training_loss(state, targets, retrieval_loss=None)
    assert loss.item() == pytest.approx((matching + contrastive).item(), rel=1e-5)
    assert contrastive.item() > 0.1  # so the comparisons below can fail
    ablation = _model("model.options.sc_weight=0")
    assert ablation.training_loss(state, targets, None).item() == pytest.approx(matching.item(), rel=1e-5)
    figure = _model("model.options.sc_transformed_weight=1.0")  # anchor m + E_m
    mixed = sum(weight * self_contrastive_loss(state[:, 0] + state[:, 1], preservation, targets[:, k], margin)
                for k, (weight, margin) in enumerate([(1.0, 0.6), (1.0, 0.4), (0.5, 0.3)]))
    assert figure.training_loss(state, targets, None).item() == pytest.approx((matching + mixed).item(), rel=1e-5)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown CMAP option"):
        _model("model.options.margin=0.5")
    with pytest.raises(ValueError, match="margins needs one value per level"):
        _model("model.options.margins=[0.6,0.4]")
    with pytest.raises(ValueError, match="unknown resnet18 level"):
        _model("model.options.levels=[layer2,layer5]")
    with pytest.raises(ValueError, match="past the end of the resnet18 trunk"):
        _model("model.backbone_upto=layer3")
    with pytest.raises(ValueError, match="ordered from the lowest"):
        _model("model.options.levels=[layer3,layer2,layer4]")
    with pytest.raises(ValueError, match="scores must be one of both, em, is"):
        _model("model.options.scores=text")


# -- multi-level features ---------------------------------------------------------------------------------

def test_resnet50_cross_level_shapes():
    model = _model("model.image_backbone=resnet50", "model.embed_dim=512")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps = model.image_encoder.feature_maps(pixels)
        levels = model.image_encoder.interaction(maps)
        features = model.encode_targets(pixels)
        state = model.encode_queries(pixels, ["make it red"])
    assert [tuple(m.shape[1:]) for m in maps] == [(512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    # H1 = C4; H2 on C4's 7x7 grid with C3's channels; H3 on C3's 14x14 grid with C2's channels
    assert [tuple(h.shape[1:]) for h in levels] == [(2048, 7, 7), (1024, 7, 7), (512, 14, 14)]
    assert features.shape == (1, 3, 512) and state.shape == (1, 7, 512)
    assert torch.allclose(features.norm(dim=-1), torch.ones(1, 3))
    assert torch.allclose(state[:, 2:4].sum(dim=-1), torch.ones(1, 2))  # the two attentions are softmaxes


def test_efficientnet_levels_match_resnet_strides():
    model = _model("model.image_backbone=efficientnet_lite0", "model.image_weights=default")
    with torch.no_grad():
        maps = model.image_encoder.feature_maps(torch.randn(1, 3, 128, 128))
    assert model.image_encoder.levels == ("stage3", "stage5", "head")
    assert [tuple(m.shape[1:]) for m in maps] == [(40, 16, 16), (112, 8, 8), (1280, 4, 4)]


def test_interaction_shrinks_the_lower_map_onto_the_higher_grid():
    interaction = CrossLevelInteraction([1, 1])
    with torch.no_grad():
        interaction.lateral[0].weight.fill_(2.0)      # 1x1: 2 x the higher map
        interaction.lateral[0].bias.zero_()
        interaction.smooth[0].weight.zero_()
        interaction.smooth[0].weight[0, 0, 1, 1] = 1.0  # 3x3 identity, plus a bias
        interaction.smooth[0].bias.fill_(0.5)
    lower, higher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.tensor([[[[10.0]]]])
    top, fused = interaction([lower, higher])
    assert torch.equal(top, higher)
    # bilinear 2x2 -> 1x1 (align_corners=False) samples the centre: the mean 2.5; + 2 * 10 + 0.5
    assert fused.shape == (1, 1, 1, 1) and fused.item() == pytest.approx(23.0)


def test_gem_by_hand():
    feature_map = torch.tensor([[[[1.0, 8.0]], [[-5.0, 0.0]]]])  # 2 channels of 1 x 2
    pooled = gem(feature_map, 3.0)
    assert pooled[0, 0].item() == pytest.approx(((1 + 512) / 2) ** (1 / 3))
    assert pooled[0, 1].item() == pytest.approx(1e-6, rel=1e-3)  # negatives are clamped to 1e-6


# -- the BiGRU text encoder ------------------------------------------------------------------------------

def test_bigru_feature_does_not_depend_on_padding():
    torch.manual_seed(0)
    encoder = BiGRUTextEncoder(Vocabulary.build(TEXTS + ["a much longer text than the others"]), out_dim=8).eval()
    together = encoder(TEXTS + ["a much longer text than the others", ""])
    alone = torch.cat([encoder([text]) for text in TEXTS + ["a much longer text than the others", ""]])
    assert together.shape == (5, 8)
    assert torch.allclose(together, alone, atol=1e-6)
    tokens, mask = encoder.forward_tokens(TEXTS)
    assert tokens.shape == (3, 3, 8) and mask.sum().item() == 9


def test_bigru_reads_word_vectors_and_freezes_them(tmp_path):
    vocab = Vocabulary.build(TEXTS)
    encoder = BiGRUTextEncoder(vocab, out_dim=8, word_vectors=_glove(tmp_path / "g.txt", {"red": 0.5, "cube": -1.0,
                                                                                          "unused": 3.0}))
    rows = dict(zip(vocab.to_list(), encoder.embedding.weight, strict=True))
    assert torch.equal(rows["red"], torch.full((300,), 0.5)) and torch.equal(rows["cube"], torch.full((300,), -1.0))
    assert not encoder.embedding.weight.requires_grad
    assert BiGRUTextEncoder(vocab, out_dim=8).embedding.weight.requires_grad  # learned without a file


def test_bad_word_vector_files_are_named(tmp_path):
    vocab = Vocabulary.build(TEXTS)
    with pytest.raises(ValueError, match="word-vector file not found"):
        BiGRUTextEncoder(vocab, word_vectors=tmp_path / "missing.txt")
    (tmp_path / "small.txt").write_text("red 0.1 0.2\n")
    with pytest.raises(ValueError, match="2-d word vectors; the bigru text encoder takes 300-d"):
        BiGRUTextEncoder(vocab, word_vectors=tmp_path / "small.txt")
    (tmp_path / "short.txt").write_text("red 0.1 0.2 0.3\ncube 0.1\n")
    with pytest.raises(ValueError, match="short.txt, line 2: expected a word and 3 numbers"):
        BiGRUTextEncoder(vocab, word_vectors=tmp_path / "short.txt")
    (tmp_path / "text.txt").write_text("red 0.1 zero 0.3\n")
    with pytest.raises(ValueError, match="text.txt, line 1: 'red' has a value that is not a number"):
        BiGRUTextEncoder(vocab, word_vectors=tmp_path / "text.txt")
    with pytest.raises(ValueError, match="is for the bigru text encoder, not 'lstm'"):
        _model("model.text_encoder=lstm", f"model.text_weights={tmp_path / 'short.txt'}")


def test_checkpoint_keeps_the_word_vectors_frozen_without_the_file(tmp_path):
    glove = _glove(tmp_path / "glove.txt", {"red": 0.25, "sphere": 2.0})
    model = _model(f"model.text_weights={glove}")
    config = load_config(None, [*TINY, f"model.text_weights={glove}"])
    save_checkpoint(tmp_path / "ckpt", model, config, model.text_encoder.vocab)
    glove.unlink()  # a checkpoint holds the vectors itself
    loaded = load_checkpoint(tmp_path / "ckpt").model.eval()
    assert not loaded.text_encoder.embedding.weight.requires_grad
    assert torch.equal(loaded.text_encoder.embedding.weight, model.text_encoder.embedding.weight)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        scores = model.score(model.encode_queries(pixels, TEXTS[:2]), model.encode_targets(pixels))
        reloaded = loaded.score(loaded.encode_queries(pixels, TEXTS[:2]), loaded.encode_targets(pixels))
    assert torch.equal(scores, reloaded)


# -- cached multi-level maps -------------------------------------------------------------------------------

def test_cached_maps_give_the_uncached_scores(tmp_path):
    model = _model("model.image_backbone=efficientnet_lite0", "model.image_weights=default", "model.embed_dim=16")
    pixels = PixelImages(_write_images(tmp_path, 6, 64, seed=4), progress=False)
    cached = CachedMaps(model.image_encoder, pixels, "cpu", batch_size=4, progress=False)
    assert [level.dtype for level in cached.levels] == [torch.float16] * 3
    batch = cached.batch([0, 1, 2, 3, 4, 5])
    assert isinstance(batch, LevelMaps) and len(batch) == 6
    texts = ["make it red", "add a cube"] * 3
    with torch.no_grad():
        images = pixels.batch(range(6))
        exact = model.score(model.encode_queries(images, texts), model.encode_targets(images))
        from_cache = model.score(model.encode_queries(batch, texts), model.encode_targets(batch))
    assert not torch.equal(exact, from_cache)  # float16 storage rounds the maps ...
    assert torch.allclose(exact, from_cache, atol=2e-3)  # ... by no more than its precision


def test_training_caches_the_levels_and_leaves_the_backbone_frozen(tiny_css, tmp_path):
    config = load_config(None, [f"data.root={tiny_css}", *TINY, "model.image_backbone=efficientnet_lite0",
                                "model.image_weights=default", "train.optimizer=adamw", "train.lr=0.01",
                                "train.batch_size=4", "train.iterations=2", "train.eval_every=2",
                                "data.val_fraction=0.2"])
    image_cache: dict = {}
    run = train(config, tmp_path / "run", progress=False, image_cache=image_cache)
    caches = [value for key, value in image_cache.items() if key.startswith("maps:")]
    assert len(caches) == 1 and caches[0].multilevel
    trained = load_checkpoint(run.run_dir / "last").model
    fresh = _model("model.image_backbone=efficientnet_lite0", "model.image_weights=default")
    assert all(torch.equal(a, b) for a, b in zip(trained.image_encoder.backbone.state_dict().values(),
                                                fresh.image_encoder.backbone.state_dict().values(), strict=True))
    assert trained.logit_scale.item() != pytest.approx(2.65926, abs=1e-4)  # the heads did train


# -- recipes ----------------------------------------------------------------------------------------------

def test_recipes_build_and_the_garments_ones_share_tirgs_budget():
    paths = sorted(Path("configs").glob("*/cmap*.yaml"))
    assert [f"{p.parent.name}/{p.name}" for p in paths] == [
        "css/cmap_cpu.yaml", "fashion200k/cmap.yaml", "fashioniq/cmap.yaml", "garments/cmap.yaml",
        "garments/cmap_no_scl.yaml", "shoes/cmap.yaml"]
    for path in paths:
        config = load_config(path)
        assert config.model.name == "cmap" and config.train.optimizer == "adamw", path
        CMAPOptions.from_dict(config.model.options)  # every option name is one CMAP knows
        if config.model.image_weights == "default":  # the offline recipes build as they are
            assert isinstance(create_model(config.model, Vocabulary.build(TEXTS)), CMAP)
    cmap, ablation, tirg = (load_config(f"configs/garments/{name}.yaml") for name in ("cmap", "cmap_no_scl", "tirg"))

    def budget(config):
        return (config.data, config.model.image_backbone, config.model.image_weights, config.model.freeze_backbone,
                config.train.batch_size, config.train.iterations, config.train.sampler, config.protocol)

    assert budget(cmap) == budget(tirg)
    assert (cmap.model.options["sc_weight"], ablation.model.options["sc_weight"]) == (1.0, 0.0)
    ablation.model.options["sc_weight"] = 1.0
    assert ablation.to_dict() == cmap.to_dict()  # the ablation differs in nothing else
