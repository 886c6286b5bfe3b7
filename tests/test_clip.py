"""CLIP towers through open_clip: exact loading, token views, frozen-tower caching, learning-rate groups, errors.

Every model here is one of the tiny random-init configs shipped for tests (clip_configs/); nothing is
downloaded.
"""

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cirlab.checkpoint import load_checkpoint, save_checkpoint
from cirlab.config import load_config
from cirlab.encoders.clip import CLIPImageTower, CLIPTextEncoder, create_clip_backbone, create_clip_text_encoder
from cirlab.encoders.image import ImageEncoder, create_backbone
from cirlab.encoders.text import Vocabulary, create_text_encoder
from cirlab.image_batches import CachedMaps, PixelImages
from cirlab.images import normalise
from cirlab.models.registry import create_model
from cirlab.train import BEST, _training_images, build_optimizer, train

TEXTS = ["make it red!", "a much longer text that runs past the sixteen tokens of the tiny text tower for sure"]
SIZES = {"cirlab-tiny-vit": 32, "cirlab-tiny-rn": 64}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[open_clip.CLIP, str]]:
    """Each tiny config as open_clip builds it (standard CLIP layout), saved: ViT as safetensors, RN as .pt."""
    create_clip_backbone("clip:cirlab-tiny-vit")  # registers cirlab's tiny configs with open_clip
    folder = tmp_path_factory.mktemp("clip")
    models = {}
    for seed, name in enumerate(SIZES):
        torch.manual_seed(seed)
        reference = open_clip.create_model(name).eval()
        state = {key: value.contiguous() for key, value in reference.state_dict().items()}
        if name.endswith("vit"):
            path = folder / f"{name}.safetensors"
            save_file(state, path)
        else:
            path = folder / f"{name}.pt"
            torch.save(state, path)
        models[name] = reference, str(path)
    return models


def _tiny_combiner(*settings: str, backbone: str = "clip:cirlab-tiny-vit"):
    config = load_config(None, ["model.name=combiner", f"model.image_backbone={backbone}", "model.pooling=tower",
                                "model.text_encoder=clip:cirlab-tiny-vit", "model.embed_dim=32",
                                "model.image_weights=random", *settings])
    torch.manual_seed(0)
    return config, create_model(config.model, Vocabulary.build(TEXTS))


@pytest.mark.parametrize("name", list(SIZES))
def test_towers_loaded_from_a_saved_checkpoint_reproduce_open_clip_exactly(saved, name):
    reference, path = saved[name]
    pixels = torch.randn(2, 3, SIZES[name], SIZES[name])
    with torch.no_grad():
        for output in ("embedding", "tokens"):
            tower = create_clip_backbone(f"clip:{name}", path, output).eval()
            assert torch.equal(tower.pool(tower(pixels)), reference.encode_image(tower.clip_pixels(pixels)))
        text = create_clip_text_encoder(f"clip:{name}", 32, path).eval()
        assert torch.equal(text(TEXTS), reference.encode_text(open_clip.get_tokenizer(name)(TEXTS)))


def test_the_tower_turns_cirlab_batches_into_clip_normalised_pixels():
    tower = create_clip_backbone("clip:cirlab-tiny-vit")
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert torch.allclose(tower.clip_pixels(normalise(pixels)), (pixels / 255 - mean) / std, atol=1e-5)


def test_vit_token_map_holds_open_clips_own_patch_tokens(saved):
    reference, path = saved["cirlab-tiny-vit"]
    tower = create_clip_backbone("clip:cirlab-tiny-vit", path, "tokens").eval()
    pixels = torch.randn(2, 3, 32, 32)
    reference.visual.output_tokens = True
    with torch.no_grad():
        fmap = tower(pixels)
        _, tokens = reference.visual(tower.clip_pixels(pixels))
    reference.visual.output_tokens = False
    assert fmap.shape == (2, 64, 1, 17)  # width 64; class token + 4 x 4 patches of 8 px
    assert tower.grid_size == (4, 4) and tower.token_dim == 64
    assert torch.equal(tower.patch_tokens(fmap), tokens)
    assert tower.project_tokens(tokens).shape == (2, 16, 32)


def test_vit_token_projection_is_clips_own_proj_that_pools_the_class_token(saved):
    reference, path = saved["cirlab-tiny-vit"]
    tower = create_clip_backbone("clip:cirlab-tiny-vit", path, "tokens").eval()
    with torch.no_grad():
        fmap = tower(torch.randn(2, 3, 32, 32))
        class_token = tower.trunk.ln_post(fmap[:, :, 0, 0])
        projected = tower.project_tokens(class_token)
        assert torch.allclose(projected, class_token @ reference.visual.proj, atol=1e-6)   # the saved CLIP's proj
        assert torch.allclose(projected, tower.pool(fmap), atol=1e-6)


def test_resnet_token_projection_is_the_attention_pool_on_one_repeated_token(saved):
    _, path = saved["cirlab-tiny-rn"]
    tower = create_clip_backbone("clip:cirlab-tiny-rn", path, "tokens").eval()
    token = torch.randn(1, 256)
    fmap = token[:, :, None, None].expand(1, 256, 2, 2)
    assert tower.patch_tokens(fmap).shape == (1, 4, 256)
    with torch.no_grad():
        tower.trunk.attnpool.positional_embedding.zero_()  # every key and value is then the same token
        assert torch.allclose(tower.pool(fmap), tower.project_tokens(token), atol=1e-5)


def test_text_tokens_are_masked_from_start_to_end_token_and_pool_at_the_end(saved):
    reference, path = saved["cirlab-tiny-vit"]
    text = create_clip_text_encoder("clip:cirlab-tiny-vit", None, path).eval()
    with torch.no_grad():
        tokens, mask = text.forward_tokens(TEXTS)
        pooled = text(TEXTS)
    assert tokens.shape == (2, 16, 32) and text.token_dim == 32 and text.out_dim == 32
    # start, "make", "it", "red", "!", end; the long text is cut to the 16-token context, end token last
    assert mask.sum(dim=1).tolist() == [6, 16]
    ends = torch.tensor([5, 15])
    assert torch.allclose(tokens[torch.arange(2), ends] @ reference.text_projection, pooled, atol=1e-6)


def test_text_pooled_and_tokens_come_from_one_pass_over_a_fixed_context(saved):
    _, path = saved["cirlab-tiny-vit"]
    text = create_clip_text_encoder("clip:cirlab-tiny-vit", None, path).eval()
    calls = []
    text.text.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        pooled, tokens, mask = text.pooled_and_tokens(TEXTS)
        assert len(calls) == 1
        assert torch.equal(pooled, text(TEXTS))
        separate_tokens, separate_mask = text.forward_tokens(TEXTS)
    assert torch.equal(tokens, separate_tokens) and torch.equal(mask, separate_mask)
    assert text.context_length == 16 and tokens.shape[1] == 16
    assert text.forward_tokens(TEXTS[:1])[0].shape[1] == 16   # a short text alone still has every position


def test_frozen_tower_cached_features_give_the_uncached_outputs(tmp_path):
    paths = []
    rng = np.random.default_rng(0)
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    pixels = PixelImages(paths, progress=False)
    config, model = _tiny_combiner("model.freeze_backbone=true", "model.freeze_text=true")
    model.eval()
    cached = _training_images(config, model, pixels, {}, torch.device("cpu"), progress=False)
    assert isinstance(cached, CachedMaps) and len(cached) == 5 and cached.batch([0]).shape == (1, 32, 1, 1)
    with torch.no_grad():
        uncached = model.encode_targets(pixels.batch([3, 1]))
        # float16 storage is the cache's only change
        assert torch.equal(model.encode_targets(cached.batch([3, 1])), uncached.half().float())
        queries = model.encode_queries(pixels.batch([3, 1]), TEXTS)
        assert torch.allclose(model.encode_queries(cached.batch([3, 1]), TEXTS), queries, atol=1e-3)


def test_towers_train_with_separate_learning_rates():
    config, model = _tiny_combiner("train.lr=0.001", "train.backbone_lr_mult=0.1", "train.text_lr_mult=0.01")
    groups = build_optimizer(model, config).param_groups
    assert [group["lr"] for group in groups] == pytest.approx([1e-3, 1e-4, 1e-5])
    image, text = set(model.image_encoder.backbone.parameters()), set(model.text_encoder.parameters())
    assert set(groups[1]["params"]) == image and set(groups[2]["params"]) == text
    assert set(groups[0]["params"]) == set(model.parameters()) - image - text


def test_frozen_towers_leave_only_the_combiner_to_train():
    config, model = _tiny_combiner("model.freeze_backbone=true", "model.freeze_text=true",
                                   "train.text_lr_mult=0.01")
    groups = build_optimizer(model, config).param_groups
    assert len(groups) == 1
    assert set(groups[0]["params"]) == set(model.parameters()) - set(model.image_encoder.parameters()) \
        - set(model.text_encoder.parameters())
    model.train()
    assert not model.text_encoder.training and not model.image_encoder.backbone.training


def test_a_checkpoint_keeps_fine_tuned_towers_for_a_second_stage(saved, tmp_path):
    """A cirlab checkpoint reloads without the weight files it was built from, and its model.safetensors
    gives the towers' weights to a second stage (CLIP4Cir: fine-tune with sum fusion, then train the Combiner)."""
    _, path = saved["cirlab-tiny-vit"]
    config, model = _tiny_combiner(f"model.image_weights={path}", f"model.text_weights={path}",
                                   "model.options.fusion=sum")
    with torch.no_grad():
        model.image_encoder.backbone.trunk.proj.add_(1.0)  # "fine-tuned": differs from the file
        model.text_encoder.text.text_projection.mul_(2.0)
    config.model = dataclasses.replace(config.model, image_weights=str(tmp_path / "gone.safetensors"),
                                       text_weights=str(tmp_path / "gone.safetensors"))
    vocab = Vocabulary.build(TEXTS)
    save_checkpoint(tmp_path / "stage1", model, config, vocab)
    reloaded = load_checkpoint(tmp_path / "stage1").model
    for (key, value), (other, loaded) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert key == other and torch.equal(value, loaded)
    stage1 = str(tmp_path / "stage1" / "model.safetensors")
    tower = create_clip_backbone("clip:cirlab-tiny-vit", stage1)
    text = create_text_encoder("clip:cirlab-tiny-vit", None, out_dim=32, weights=stage1, freeze=True)
    assert torch.equal(tower.trunk.proj, model.image_encoder.backbone.trunk.proj)
    assert torch.equal(text.text.text_projection, model.text_encoder.text.text_projection)
    assert isinstance(tower, CLIPImageTower) and isinstance(text, CLIPTextEncoder)


def test_bad_names_and_weights_are_named(saved, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip config 'ViT-B-33'.*ViT-B-32"):
        create_backbone("clip:ViT-B-33")
    with pytest.raises(ValueError, match="name an open_clip config"):
        create_text_encoder("clip:hf-hub:org/model", None)
    with pytest.raises(ValueError, match="CLIP image weights file not found: .*missing.safetensors"):
        create_backbone("clip:cirlab-tiny-vit", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="does not fit the visual tower of clip:cirlab-tiny-vit"):
        create_backbone("clip:cirlab-tiny-vit", weights=saved["cirlab-tiny-rn"][1])
    (tmp_path / "broken.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="cannot read CLIP weights file .*broken.safetensors"):
        create_backbone("clip:cirlab-tiny-vit", weights=str(tmp_path / "broken.safetensors"))
    save_file({"logit_scale": torch.ones(())}, tmp_path / "no_towers.safetensors")
    with pytest.raises(ValueError, match="holds no text tower"):
        create_text_encoder("clip:cirlab-tiny-vit", None, 32, weights=str(tmp_path / "no_towers.safetensors"))
    with pytest.raises(ValueError, match="no CLIP weights ship offline.*open_clip:<tag> to download, or random"):
        create_backbone("clip:cirlab-tiny-vit", weights="default")
    with pytest.raises(ValueError, match="no CLIP weights ship offline"):
        create_text_encoder("clip:cirlab-tiny-vit", None, 32, weights="default")
    with pytest.raises(ValueError, match="open_clip has no weights 'nope' for ViT-B-32 .*openai"):
        create_backbone("clip:ViT-B-32", weights="open_clip:nope")


def test_sizes_that_do_not_fit_the_tower_are_named():
    tower = create_clip_backbone("clip:cirlab-tiny-vit")
    with pytest.raises(ValueError, match="takes 32 x 32 images, got 64 x 64: set data.image_size=32"):
        tower(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="gives 32-d text features, not 512: set model.embed_dim=32"):
        create_text_encoder("clip:cirlab-tiny-vit", None, out_dim=512)
    with pytest.raises(ValueError, match="own 32-d feature: set model.embed_dim=32"):
        ImageEncoder(tower, out_dim=512, pooling="tower")
    with pytest.raises(ValueError, match='pooling="tower" needs a backbone with its own pooling head'):
        ImageEncoder(create_backbone("resnet18", weights=None, upto="layer1"), out_dim=64, pooling="tower")
    with pytest.raises(ValueError, match="patch tokens need the token map"):
        tower.patch_tokens(torch.zeros(1, 32, 1, 1))
    with pytest.raises(ValueError, match="model.freeze_text is for CLIP text towers"):
        create_text_encoder("lstm", Vocabulary.build(TEXTS), freeze=True)


@pytest.mark.slow
def test_training_on_frozen_cached_towers_keeps_them_as_loaded(saved, tiny_css, tmp_path):
    _, path = saved["cirlab-tiny-vit"]
    config = load_config(None, [
        f"data.root={tiny_css}", "data.image_size=32", "data.val_fraction=0.2", "model.name=combiner",
        "model.image_backbone=clip:cirlab-tiny-vit", f"model.image_weights={path}", "model.pooling=tower",
        "model.freeze_backbone=true", "model.text_encoder=clip:cirlab-tiny-vit", f"model.text_weights={path}",
        "model.freeze_text=true", "model.embed_dim=32", "train.loss=batch_classification", "train.optimizer=adamw",
        "train.lr=0.001", "train.batch_size=4", "train.iterations=2", "train.eval_every=2"])
    result = train(config, tmp_path / "run", progress=False)
    assert 0 <= result.best_val["R@1"] <= 100
    trained = load_checkpoint(tmp_path / "run" / BEST).model.state_dict()
    loaded = create_model(config.model, None).state_dict()
    towers = [key for key in trained if key.startswith(("image_encoder.", "text_encoder."))]
    assert len(towers) > 40 and all(torch.equal(trained[key], loaded[key]) for key in towers)


def test_a_training_step_keeps_clips_batchnorm_in_eval_mode_while_its_weights_learn(saved):
    """CLIP4Cir calls clip_model.eval() once and fine-tunes from there: running statistics stay pretrained."""
    _, path = saved["cirlab-tiny-rn"]
    tower = create_clip_backbone("clip:cirlab-tiny-rn", path).train()
    norms = [module for module in tower.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert norms and not any(norm.training for norm in norms)
    with torch.no_grad():  # open_clip zero-initialises each block's last BatchNorm, which would starve the others
        for norm in norms:
            norm.weight.fill_(1.0)
    before = [norm.running_mean.clone() for norm in norms]
    tower.pool(tower(torch.randn(4, 3, 64, 64))).square().sum().backward()
    assert all(torch.equal(norm.running_mean, old) for norm, old in zip(norms, before, strict=True))
    assert all(norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0 for norm in norms)
    tower.batchnorm_statistics = "train"
    assert all(norm.training for norm in tower.train().modules() if isinstance(norm, torch.nn.BatchNorm2d))
