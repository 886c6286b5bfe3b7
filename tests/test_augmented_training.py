"""Training under a random augmentation: exact resume, photo and mask cut by one window, refused combinations."""

import numpy as np
import pytest
import torch
from fixtures.materialise import materialise
from PIL import Image
from safetensors.torch import load_file

from cirlab.config import ConfigError, load_config
from cirlab.image_batches import PixelImages
from cirlab.images import Preprocessing, stored_image
from cirlab.masks.batches import MaskedImages, MaskPixels
from cirlab.train import train

TINY = ["model.image_backbone=resnet18", "model.image_weights=random", "model.backbone_upto=layer2",
        "model.embed_dim=16", "train.batch_size=2", "train.eval_every=2", "train.log_every=1",
        "data.image_size=16", "train.sampler=shuffled", "train.loss=batch_classification", "train.selection=last"]
CROP_FLIP = ["data.resize_mode=pad", "data.pre_crop_size=20", "data.augment=crop_flip"]


def _config(root, *overrides):
    return load_config(None, ["data.format=fashioniq", f"data.root={root}", "data.categories=[dress]",
                              "protocol.caption_join=cmap", *TINY, *overrides])


def _textured_fashioniq(tmp_path):
    """The FashionIQ fixture with noise images: its solid colours look the same through every window."""
    root = materialise("fashioniq", tmp_path)
    rng = np.random.default_rng(0)
    for path in sorted((root / "images").iterdir()):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    return root


def test_augmented_training_resumes_exactly_and_differs_from_plain(tmp_path):
    root = _textured_fashioniq(tmp_path)
    straight = train(_config(root, *CROP_FLIP, "train.iterations=4"), tmp_path / "a", progress=False)
    train(_config(root, *CROP_FLIP, "train.iterations=2"), tmp_path / "b", progress=False)
    train(_config(root, *CROP_FLIP, "train.iterations=4"), tmp_path / "b", resume=True, progress=False)
    plain = train(_config(root, "data.resize_mode=pad", "data.pre_crop_size=20", "train.iterations=4"),
                  tmp_path / "c", progress=False)
    a, b, c = (load_file(run / "last" / "model.safetensors") for run in (straight.run_dir, tmp_path / "b",
                                                                         plain.run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the windows did change what was trained on
    assert "rng.augment" in load_file(tmp_path / "b" / "last" / "trainer.safetensors")


def _images(tmp_path, count=3):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_a_photo_and_its_mask_are_cut_by_the_same_window(tmp_path):
    spec = Preprocessing(size=(16, 16), pre_crop_size=(24, 24), augment="resized_crop")
    paths = _images(tmp_path)
    photos = PixelImages(paths, progress=False, size=spec)
    # each mask is its photo's red channel, stored as the photo is (the same fit)
    reds = [np.asarray(stored_image(Image.fromarray(np.asarray(Image.open(p))[..., 0]).convert("RGB"), spec))[..., 0]
            for p in paths]
    masked = MaskedImages(photos, MaskPixels(torch.from_numpy(np.stack(reds))[:, None], photos.preprocessing))
    batch = masked.batch([2, 0, 1], generator=torch.Generator().manual_seed(3))
    assert batch.images.shape == batch.masks.shape == (3, 3, 16, 16)
    assert torch.allclose(batch.masks[:, 0], batch.images[:, 0], atol=1e-5)
    evaluation = masked.batch([2, 0, 1])
    assert torch.allclose(evaluation.masks[:, 0], evaluation.images[:, 0], atol=1e-5)
    assert not torch.allclose(batch.images, evaluation.images)


def test_augmentation_is_refused_where_it_cannot_be_followed(tmp_path, tiny_css):
    root = materialise("fashioniq", tmp_path)
    frozen = ["model.image_backbone=efficientnet_lite0", "model.backbone_upto=stage3", "model.freeze_backbone=true"]
    with pytest.raises(ConfigError, match="set train.cache_features=false"):
        train(_config(root, *CROP_FLIP, *frozen, "train.iterations=1"), tmp_path / "a", progress=False)
    mmgrad = load_config(None, [f"data.root={tiny_css}", *TINY[:5], "data.augment=resized_crop",
                                "train.mmgrad.weight=0.1", "train.iterations=1"])
    with pytest.raises(ConfigError, match="data.augment=resized_crop cannot be used with MMGrad's edit masks"):
        train(mmgrad, tmp_path / "b", progress=False)
