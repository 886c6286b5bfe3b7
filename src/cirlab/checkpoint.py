"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint folder holds `model.safetensors`, `config.json` (the resolved run config) and
`vocab.json` and `preprocessing.json` (the model's `cirlab.images.Preprocessing`: input size, resize mode,
pre-crop size, training augmentation, and the steps in words); a resumable one adds `trainer.safetensors`
(optimizer buffers, torch RNG state) and `trainer.json` (step, optimizer hyper-parameters, sampler RNG state,
best score so far). A folder is written under a temporary name and renamed into place, so a crash never leaves
a half-written checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cirlab.config import Config, load_config
from cirlab.encoders.text import Vocabulary
from cirlab.images import Preprocessing, PreprocessingError
from cirlab.models.base import CIRModel
from cirlab.models.registry import create_model

MODEL_FILE, CONFIG_FILE, VOCAB_FILE = "model.safetensors", "config.json", "vocab.json"
TRAINER_TENSORS, TRAINER_JSON = "trainer.safetensors", "trainer.json"
PREPROCESSING_FILE = "preprocessing.json"


# The torch.nn.init functions that draw random initial values; the layers cirlab builds initialise through them.
_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_")
_INIT_LOCK = threading.Lock()


@contextmanager
def _without_random_init() -> Iterator[None]:
    """Build modules without drawing their random initial values: a checkpoint overwrites every parameter and
    buffer (its state dict is loaded strictly), and the draws were most of the time of loading one (0.15 of
    0.19 s for a small TIRG; `cirlab search` pays it on every start). Loads are serialised, as the functions are
    swapped for the whole process."""
    with _INIT_LOCK:
        originals = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}
        try:
            for name in _RANDOM_INITS:
                setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for name, function in originals.items():
                setattr(torch.nn.init, name, function)


class CheckpointError(ValueError):
    """A checkpoint folder that is missing or does not hold what cirlab writes."""


@dataclass
class Checkpoint:
    model: CIRModel
    config: Config
    vocab: Vocabulary
    trainer_state: dict[str, Any] | None
    trainer_tensors: dict[str, torch.Tensor] | None


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-ready tensors and JSON-ready hyper-parameters."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for name, value in meta["scalars"].items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, model: CIRModel, config: Config, vocab: Vocabulary,
                    trainer_tensors: dict[str, torch.Tensor] | None = None,
                    trainer_state: dict[str, Any] | None = None) -> None:
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, staging / MODEL_FILE)
    _write_json(staging / CONFIG_FILE, config.to_dict())
    _write_json(staging / VOCAB_FILE, vocab.to_list())
    _write_json(staging / PREPROCESSING_FILE, model.preprocessing.to_dict())
    if trainer_tensors is not None:
        save_file(trainer_tensors, staging / TRAINER_TENSORS)
    if trainer_state is not None:
        _write_json(staging / TRAINER_JSON, trainer_state)
    _fsync_folder(staging)
    retired = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(retired, ignore_errors=True)
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read ({error})") from error


def _preprocessing(folder: Path, config: Config) -> Preprocessing:
    """How the model was trained to see images: as recorded (a file with only a size, from before the other
    settings existed, means "crop"), or for checkpoints older than the file, from data.image_size."""
    if (folder / PREPROCESSING_FILE).is_file():
        recorded = _read_json(folder / PREPROCESSING_FILE)
        try:
            return Preprocessing.from_dict(recorded)
        except (KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{folder / PREPROCESSING_FILE}: no valid 'size' ({error!r})") from None
        except PreprocessingError as error:
            raise CheckpointError(f"{folder / PREPROCESSING_FILE}: {error}") from None
    if config.data.image_size is None:
        # written before the native size was recorded: guessing it would feed photos at a wrong size
        raise CheckpointError(
            f"{folder}: trained at the images' native size, which older checkpoints do not record; "
            f"write it as {{\"size\": [HEIGHT, WIDTH]}} to {folder / PREPROCESSING_FILE} (64 x 64 for CSS)")
    return Preprocessing(size=config.data.image_size)


def load_checkpoint(folder: Path, overrides: list[str] | None = None) -> Checkpoint:
    """Rebuild the model of a checkpoint folder (with its own config, plus optional overrides)."""
    folder = Path(folder)
    for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: not a cirlab checkpoint (missing {name})")
    config = load_config(base=_read_json(folder / CONFIG_FILE), overrides=overrides)
    vocab = Vocabulary.from_list(_read_json(folder / VOCAB_FILE))
    # The backbone's and word vectors' weights come from the checkpoint itself, never from a path or package.
    with _without_random_init():
        model = create_model(dataclasses.replace(config.model, image_weights=None, text_weights=None), vocab)
    model.preprocessing = _preprocessing(folder, config)
    try:
        model.load_state_dict(load_file(folder / MODEL_FILE))
    except (RuntimeError, OSError) as error:
        raise CheckpointError(f"{folder / MODEL_FILE}: does not fit model '{config.model.name}' ({error})") from error
    trainer_state = _read_json(folder / TRAINER_JSON) if (folder / TRAINER_JSON).is_file() else None
    trainer_tensors = load_file(folder / TRAINER_TENSORS) if (folder / TRAINER_TENSORS).is_file() else None
    return Checkpoint(model, config, vocab, trainer_state, trainer_tensors)
