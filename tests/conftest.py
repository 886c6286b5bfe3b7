from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from cirlab.config import load_config
from cirlab.data.css import generate_css
from cirlab.index.build import build_index
from cirlab.train import train

# Trains in seconds: ResNet-18 cut after layer2, random weights, 2 steps.
TINY_MODEL = ["model.image_backbone=resnet18", "model.image_weights=null", "model.backbone_upto=layer2",
              "model.embed_dim=16", "train.batch_size=4", "train.iterations=2", "train.eval_every=2",
              "data.val_fraction=0.2"]


class TinyIndex(NamedTuple):
    checkpoint: Path
    index: Path
    gallery: Path


@pytest.fixture(scope="session")
def tiny_css(tmp_path_factory) -> Path:
    """A tiny synthetic CSS dataset (2 edit families per split), generated once per test session."""
    return generate_css(tmp_path_factory.mktemp("css") / "tiny", preset="demo", seed=1, progress=False, families=2)


@pytest.fixture(scope="session")
def tiny_index(tiny_css, tmp_path_factory) -> TinyIndex:
    """A TINY_MODEL checkpoint trained on `tiny_css` and the index of its images, built once per test session."""
    work = tmp_path_factory.mktemp("tiny_index")
    train(load_config(None, [f"data.root={tiny_css}", "train.seed=0", *TINY_MODEL]), work / "run", progress=False)
    built = TinyIndex(work / "run" / "best", work / "index", tiny_css / "images")
    build_index(built.checkpoint, built.gallery, built.index, progress=False).close()
    return built


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread than on a contended pool; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
