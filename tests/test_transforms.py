"""Per-recipe preprocessing as data: the spec from the data config, its random training windows, the refusal of
cached backbone maps under augmentation, and its record in the checkpoint that the model carries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cirlab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cirlab.config import ConfigError, load_config
from cirlab.encoders.text import Vocabulary
from cirlab.image_batches import refuse_cached_augmentation
from cirlab.images import CropWindow, Preprocessing, cut_window, draw_window
from cirlab.models.registry import create_model

TINY_MODEL = ["model.name=tirg", "model.image_backbone=resnet18", "model.image_weights=null",
              "model.backbone_upto=layer2", "model.embed_dim=16"]
CMAP_KEYS = ["data.image_size=224", "data.resize_mode=pad", "data.pre_crop_size=256", "data.interpolation=bilinear",
             "data.augment=crop_flip"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_data_config_names_the_spec():
    spec = Preprocessing.from_config(load_config(None, CMAP_KEYS).data)
    assert spec == Preprocessing(size=(224, 224), resize_mode="pad", pre_crop_size=(256, 256),
                                 interpolation="bilinear", augment="crop_flip")
    assert spec.stored_size == (256, 256) and spec.fill == 255 and spec.is_random
    clip4cir = Preprocessing.from_config(load_config(None, ["data.image_size=224", "data.resize_mode=targetpad"]).data)
    assert (clip4cir.pad_ratio, clip4cir.fill, clip4cir.is_random) == (1.25, 0, False)
    assert Preprocessing.from_config(load_config(None, []).data) == Preprocessing()  # defaults: today's "crop"


@pytest.mark.parametrize(("override", "key"), [
    ("data.resize_mode=squash", "data.resize_mode"), ("data.augment=flip", "data.augment"),
    ("data.interpolation=nearest", "data.interpolation"), ("data.pad_ratio=0.5", "data.pad_ratio"),
    ("data.pad_fill=300", "data.pad_fill"), ("data.pre_crop_size=200", "data.pre_crop_size"),
    ("data.augment_scale=[0.5]", "data.augment_scale"), ("data.augment_scale=[0.9, 1.5]", "data.augment_scale"),
    ("data.image_size=0", "data.image_size")])
def test_a_bad_setting_names_its_key(override, key):
    data = load_config(None, ["data.image_size=224", override]).data
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")):
        Preprocessing.from_config(data)


def test_padding_needs_a_size_to_pad_to():
    with pytest.raises(ConfigError, match=r"'data.resize_mode' 'pad' needs an image size"):
        Preprocessing.from_config(load_config(None, ["data.resize_mode=pad"]).data)


def test_resized_crop_windows_keep_the_drawn_area_fraction_and_aspect():
    spec = Preprocessing(size=32, augment="resized_crop", augment_scale=(0.5, 0.6))
    generator = torch.Generator().manual_seed(0)
    windows = [draw_window(spec, (200, 200), generator) for _ in range(200)]
    for window in windows:
        assert 0.49 <= window.height * window.width / 200 ** 2 <= 0.61  # sides rounded to whole pixels
        assert 3 / 4 - 0.02 <= window.width / window.height <= 4 / 3 + 0.02
        assert 0 <= window.top <= 200 - window.height and 0 <= window.left <= 200 - window.width
        assert not window.flip
    assert len({(window.top, window.left) for window in windows}) > 150


def test_resized_crop_falls_back_to_the_widest_centred_window_when_nothing_fits():
    # a 10 x 100 strip has no window of 90-100% of its area with aspect <= 4/3: the centred 10 x 13 is taken
    window = draw_window(Preprocessing(size=8, augment="resized_crop"), (10, 100), torch.Generator().manual_seed(0))
    assert window == CropWindow(top=0, left=43, height=10, width=13)


def test_cut_window_resizes_to_the_size_and_mirrors():
    pixels = torch.arange(50, dtype=torch.uint8).repeat(3, 50, 1)  # every row counts columns 0-49
    mirrored = cut_window(pixels, CropWindow(5, 10, 20, 20, flip=True), (20, 20))
    assert mirrored[0, 0].tolist() == list(range(29, 9, -1))
    assert cut_window(torch.full((3, 50, 50), 77, dtype=torch.uint8), CropWindow(0, 0, 50, 40), (32, 32)).eq(77).all()


def test_cached_backbone_maps_refuse_a_random_augmentation():
    cached = CMAP_KEYS + ["model.freeze_backbone=true", "train.cache_features=true"]
    with pytest.raises(ConfigError, match="computed once.*set train.cache_features=false"):
        refuse_cached_augmentation(load_config(None, cached))
    for fix in ("train.cache_features=false", "data.augment=none", "model.freeze_backbone=false"):
        refuse_cached_augmentation(load_config(None, cached + [fix]))


def _saved(folder: Path, preprocessing: Preprocessing) -> Path:
    torch.manual_seed(0)
    config = load_config(None, TINY_MODEL)
    vocab = Vocabulary.build(["make red"])
    model = create_model(config.model, vocab)
    model.preprocessing = preprocessing
    save_checkpoint(folder, model, config, vocab)
    return folder


def test_the_preprocessing_round_trips_through_a_checkpoint(tmp_path: Path):
    spec = Preprocessing(size=(48, 40), resize_mode="targetpad", pad_ratio=1.5, pad_fill=128, pre_crop_size=(56, 48),
                         interpolation="bilinear", augment="resized_crop", augment_scale=(0.8, 1.0))
    folder = _saved(tmp_path / "checkpoint", spec)
    recorded = json.loads((folder / "preprocessing.json").read_text())
    assert (recorded["size"], recorded["pre_crop_size"], recorded["augment_scale"]) == ([48, 40], [56, 48], [0.8, 1.0])
    assert "pad to side ratio 1.5 where it is larger (grey 128)" in recorded["steps"][1]
    loaded = load_checkpoint(folder).model
    assert loaded.preprocessing == spec and loaded.image_size == (48, 40)


def test_an_older_checkpoint_that_records_only_a_size_loads_as_crop(tmp_path: Path):
    folder = _saved(tmp_path / "older", Preprocessing(size=(48, 40), resize_mode="pad"))
    older = {"size": [64, 64], "steps": ["decode to upright RGB", "bicubic scale to cover size, centre crop"]}
    (folder / "preprocessing.json").write_text(json.dumps(older))
    assert load_checkpoint(folder).model.preprocessing == Preprocessing(size=(64, 64), resize_mode="crop")


def test_a_bad_recorded_setting_is_named(tmp_path: Path):
    folder = _saved(tmp_path / "bad", Preprocessing(size=32))
    (folder / "preprocessing.json").write_text(json.dumps({"size": [32, 32], "resize_mode": "squash"}))
    with pytest.raises(CheckpointError, match=r"preprocessing.json: preprocessing 'resize_mode' must be one of"):
        load_checkpoint(folder)


def test_setting_a_models_image_size_keeps_the_rest_of_its_preprocessing():
    model = create_model(load_config(None, TINY_MODEL).model, Vocabulary.build(["x"]))
    assert model.image_size is None and model.preprocessing == Preprocessing()
    model.preprocessing = Preprocessing(size=32, resize_mode="pad")
    model.image_size = 64  # what training writes today, for a null data.image_size resolved to the native size
    assert model.preprocessing == Preprocessing(size=64, resize_mode="pad")
