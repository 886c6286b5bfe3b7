"""Every recipe under configs/ trains two steps and evaluates, on the matching fixture or tiny generated data.

A recipe runs as written except for what this machine cannot hold, each substitution stated here:
- its data: the fixture of its format (tests/fixtures/), or tiny generated data of the same layout where the
  fixture has too few training triplets (CIRR) and for the synthetic benchmarks (CSS, garments);
- its weight files: stand-ins of the same kind written by the test (random ResNet state dicts under torchvision's
  file names, a small GloVe text file, tiny open_clip towers in place of the named CLIP configs);
- its size: 2 steps of batch 2 (1 on the Shoes fixture, whose validation carve leaves one training triplet),
  and images at 32 px (a CLIP tower: its tiny config's size);
- CLIPSeg masks, which need CLIPSeg's weights: the offline saliency masks.
A new recipe is covered as soon as it is added.
"""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
from fixtures.materialise import materialise
from safetensors.torch import save_file
from torchvision.models import resnet18, resnet50

from cirlab.config import Config, load_config
from cirlab.data.cirr_scenes import generate_cirr
from cirlab.data.css import generate_css
from cirlab.data.garments import generate_garments
from cirlab.encoders.clip import create_clip_backbone
from cirlab.evaluate import evaluate_checkpoint
from cirlab.train import train

CONFIGS = Path(__file__).parent.parent / "configs"
RECIPES = sorted(path.relative_to(CONFIGS).as_posix() for path in CONFIGS.rglob("*.yaml"))
TINY_CLIP = {"vit": ("cirlab-tiny-vit", 32), "rn": ("cirlab-tiny-rn", 64)}  # stand-in tower, its image size
CLIP_EMBED = 32
SMALL_SIDE = 32
RESNETS = {"resnet18": resnet18, "resnet50": resnet50}


class StandIns:
    """Data and weight files written once per module, on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: dict[str, Path] = {}

    def _once(self, key: str, make) -> Path:
        if key not in self.made:
            self.made[key] = make(self.folder / key)
        return self.made[key]

    def data(self, config: Config) -> Path:
        data = config.data
        if data.format == "css":
            return self._once("css", lambda out: generate_css(out, seed=1, progress=False, families=2, with_3d=True))
        if "garments" in data.root:
            return self._once("garments", lambda out: generate_garments(out, seed=1, image_size=64, progress=False,
                                                                      families=2))
        if data.format == "cirr":
            return self._once("cirr", lambda out: generate_cirr(out, seed=1, progress=False, sets=3))
        return self._once(data.format, lambda out: materialise(data.format, out))

    def resnet(self, name: str, file_name: str) -> Path:
        def write(folder: Path) -> Path:
            folder.mkdir()
            torch.save(RESNETS[name](weights=None).state_dict(), folder / file_name)
            return folder / file_name
        return self._once(f"{name}-{file_name}", write)

    def glove(self, file_name: str) -> Path:
        def write(folder: Path) -> Path:
            folder.mkdir()
            words = ["is", "red", "blue", "and", "has", "long", "sleeves", "replace", "with", "dress"]
            lines = [" ".join([word, *(f"{(i * 7 + d) % 11 / 10 - 0.5:.2f}" for d in range(300))])
                     for i, word in enumerate(words)]
            (folder / file_name).write_text("\n".join(lines) + "\n")
            return folder / file_name
        return self._once(f"glove-{file_name}", write)

    def clip(self, tiny: str, file_name: str) -> Path:
        def write(folder: Path) -> Path:
            folder.mkdir()
            create_clip_backbone(f"clip:{tiny}")  # registers the tiny configs with open_clip
            torch.manual_seed(0)
            state = {k: v.contiguous() for k, v in open_clip.create_model(tiny).state_dict().items()}
            path = folder / file_name
            save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
            return path
        return self._once(f"{tiny}-{file_name}", write)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> StandIns:
    return StandIns(tmp_path_factory.mktemp("recipes"))


def _is_file(weights: str | None) -> bool:
    return weights not in (None, "default", "random") and not weights.startswith("open_clip:")


def _tiny_clip(name: str) -> tuple[str, int]:
    return TINY_CLIP["vit" if "ViT" in name else "rn"]


def _shrunk(config: Config, stand_ins: StandIns, root: Path) -> list[str]:
    """The overrides that make `config` run here (see the module docstring)."""
    data, model = config.data, config.model
    overrides = [f"data.root={root}", "train.iterations=2", "train.eval_every=2", "train.log_every=1",
                 f"train.batch_size={1 if data.format == 'shoes' else 2}", "train.device=cpu"]
    if data.format == "fashioniq" and "garments" not in data.root:
        overrides.append("data.categories=[dress]")  # the fixture has the dress files only
    if data.caption_corrections:
        (root / "corrections_dress.json").write_text('{"yello": "yellow"}')
        overrides.append(f"data.caption_corrections={root}/corrections_{{category}}.json")
    side = SMALL_SIDE
    if model.image_backbone.startswith("clip:"):
        tiny, side = _tiny_clip(model.image_backbone)
        overrides += [f"model.image_backbone=clip:{tiny}", f"model.embed_dim={CLIP_EMBED}"]
    overrides.append(f"data.image_size={side}")
    if data.pre_crop_size:  # the recipe's ratio of pre-crop to crop (CMAP: 256 / 224)
        overrides.append(f"data.pre_crop_size={math.ceil(side * data.pre_crop_size / data.image_size)}")
    if model.text_encoder.startswith("clip:"):
        overrides.append(f"model.text_encoder=clip:{_tiny_clip(model.text_encoder)[0]}")
    if _is_file(model.image_weights):
        name = Path(model.image_weights).name
        path = (stand_ins.clip(_tiny_clip(model.image_backbone)[0], name) if model.image_backbone.startswith("clip:")
                else stand_ins.resnet(model.image_backbone, name))
        overrides.append(f"model.image_weights={path}")
    if _is_file(model.text_weights):
        name = Path(model.text_weights).name
        path = (stand_ins.clip(_tiny_clip(model.text_encoder)[0], name) if model.text_encoder.startswith("clip:")
                else stand_ins.glove(name))
        overrides.append(f"model.text_weights={path}")
    if model.options.get("masks") == "clipseg":
        overrides.append("model.options.masks=saliency")
    return overrides


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_and_evaluates(recipe: str, stand_ins: StandIns, tmp_path: Path, one_torch_thread) -> None:
    config = load_config(CONFIGS / recipe)
    root = stand_ins.data(config)
    run = tmp_path / "run"
    result = train(load_config(CONFIGS / recipe, _shrunk(config, stand_ins, root)), run, progress=False)
    assert (run / "best" / "model.safetensors").is_file() and (run / "last" / "trainer.json").is_file()
    evaluation = evaluate_checkpoint(run / "best", progress=False)
    metrics = evaluation["metrics"]
    assert metrics and all(0.0 <= value <= 100.0 for value in metrics.values()), metrics
    assert evaluation["protocol"]["checkpoint"] and evaluation["protocol"]["image tower"]
    if config.train.selection == "last":
        assert result.best_val == {}
