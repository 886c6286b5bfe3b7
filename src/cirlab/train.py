"""The training loop: plain PyTorch, one process (CPU or one GPU), checkpoints and exact resume.

Recipe defaults follow the TIRG code (SGD, momentum 0.9, lr 0.01, batch 32, soft triplet on CSS).
Checkpoints are selected on a validation split carved from the training data, never on test.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cirlab.checkpoint import load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from cirlab.config import Config
from cirlab.data.benchmarks import load_benchmark
from cirlab.data.records import RetrievalSplit, carve_validation
from cirlab.data.tensors import CachedMaps, ImageBatches, PixelImages
from cirlab.devices import resolve_device
from cirlab.encoders.image import create_backbone
from cirlab.encoders.text import Vocabulary
from cirlab.evaluate import css_protocol, evaluate_split
from cirlab.losses import batch_classification_loss, sample_soft_triplets, soft_triplet_loss
from cirlab.models.base import CIRModel
from cirlab.models.registry import create_model

BEST, LAST, METRICS = "best", "last", "metrics.jsonl"


class Sampler(ABC):
    """Draws training batches (query indices) from a seeded RNG whose state is JSON-serialisable."""

    def __init__(self, split: RetrievalSplit, batch_size: int, seed: int) -> None:
        self.split = split
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def next_batch(self) -> list[int]:
        """Indices into the split's queries."""

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def restore(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


class PairSampler(Sampler):
    """TIRG's CSS sampler: batches of pairs that share a source image but differ in text.

    The first query of a pair is drawn as the code does (a random text, then a random pair with
    that text); the second keeps the source and takes another of its queries, which gives each
    query a hard negative (same image, other text).
    """

    def __init__(self, split: RetrievalSplit, batch_size: int, seed: int) -> None:
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch size must be even and >= 2 for pair sampling, got {batch_size}")
        super().__init__(split, batch_size, seed)

    def _first(self) -> int:
        group = self.split.text_groups[self.rng.integers(len(self.split.text_groups))]
        return group[self.rng.integers(len(group))]

    def _second(self, first: int) -> int:
        query = self.split.queries[first]
        others = [i for i in self.split.queries_by_source[query.reference] if self.split.queries[i].text != query.text]
        return others[self.rng.integers(len(others))] if others else self._first()

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            first = self._first()
            batch += [first, self._second(first)]
        return batch


class ShuffledSampler(Sampler):
    """Batches of distinct queries drawn uniformly, as the usual shuffled data loader of FashionIQ,
    CIRR or Shoes training does (those benchmarks have no same-source pair structure to exploit)."""

    def __init__(self, split: RetrievalSplit, batch_size: int, seed: int) -> None:
        if not 1 <= batch_size <= len(split.queries):
            raise ValueError(f"batch size must be between 1 and the {len(split.queries)} training queries, "
                             f"got {batch_size}")
        super().__init__(split, batch_size, seed)

    def next_batch(self) -> list[int]:
        return self.rng.choice(len(self.split.queries), size=self.batch_size, replace=False).tolist()


SAMPLERS = {"pairs": PairSampler, "shuffled": ShuffledSampler}


def make_sampler(name: str, split: RetrievalSplit, batch_size: int, seed: int) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}' (known: {', '.join(SAMPLERS)})")
    return SAMPLERS[name](split, batch_size, seed)


def compute_loss(name: str, queries: torch.Tensor, targets: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    if name == "soft_triplet":
        return soft_triplet_loss(queries, targets, sample_soft_triplets(len(queries), generator=generator))
    if name == "batch_classification":
        return batch_classification_loss(queries, targets)
    raise ValueError(f"unknown loss '{name}' (known: soft_triplet, batch_classification)")


def build_optimizer(model: CIRModel, config: Config) -> torch.optim.SGD:
    """SGD over trainable parameters; a trainable backbone gets `backbone_lr_mult` x lr.

    Weight decay applies to every parameter (BN, the scale and TIRG's `a` included), as in the code.
    """
    backbone = {id(p) for p in model.image_encoder.backbone.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in backbone], "lr": config.train.lr}]
    backbone_params = [p for p in trainable if id(p) in backbone]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": config.train.lr * config.train.backbone_lr_mult})
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.SGD(groups, lr=config.train.lr, momentum=config.train.momentum,
                           weight_decay=config.train.weight_decay)


def _set_learning_rate(optimizer: torch.optim.Optimizer, config: Config, step: int) -> None:
    every = config.train.lr_decay_every
    factor = config.train.lr_decay_factor ** (step // every) if every else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _backbone_map_size(config: Config, images: PixelImages) -> list[int]:
    backbone = create_backbone(config.model.image_backbone, weights=None, upto=config.model.backbone_upto).eval()
    with torch.no_grad():
        return list(backbone(images.batch([0])).shape[2:])


@dataclass
class TrainResult:
    run_dir: Path
    best_val: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


class MetricsLog:
    """Append-only JSONL: one line per logged step or evaluation, flushed at once."""

    def __init__(self, path: Path, fresh: bool) -> None:
        self.path = path
        if fresh:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _training_images(config: Config, model: CIRModel, pixels: PixelImages, image_cache: dict[str, ImageBatches],
                     device: torch.device, progress: bool) -> ImageBatches:
    """Pixels, or with a frozen backbone its maps computed once (shared through `image_cache`)."""
    if not (config.model.freeze_backbone and config.train.cache_features):
        return pixels
    backbone = (config.model.image_backbone, config.model.image_weights, config.model.backbone_upto)
    key = f"maps:{config.data.format}:{config.data.root}:{config.data.image_size}:{backbone}"
    if key not in image_cache:
        image_cache[key] = CachedMaps(model.image_encoder, pixels, device, progress=progress)
    return image_cache[key]


def _rng_tensors(triplet_rng: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Every torch generator the loop draws from, for an exact resume."""
    states = {"rng.triplets": triplet_rng.get_state(), "rng.torch": torch.get_rng_state()}
    if device.type == "cuda":  # dropout draws from the device's own generator
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True,
          image_cache: dict[str, ImageBatches] | None = None, overwrite: bool = False) -> TrainResult:
    """Train `config` into `run_dir` (best/ and last/ checkpoints, metrics.jsonl).

    With `resume`, training continues from `run_dir/last` exactly where it stopped. A folder that
    already holds a run is refused unless `resume` or `overwrite` says what to do with it. `image_cache`
    lets several runs in one process share decoded images and cached backbone maps.
    """
    run_dir = Path(run_dir)
    if not resume and not overwrite and (run_dir / METRICS).exists():
        raise FileExistsError(f"{run_dir} already holds a training run: pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
    device = resolve_device(config.train.device)
    torch.manual_seed(config.train.seed)
    train_split = load_benchmark(config).train
    train_part, val_part = carve_validation(train_split, config.data.val_fraction, config.train.seed)
    image_cache = image_cache if image_cache is not None else {}
    pixels_key = f"pixels:{config.data.format}:{config.data.root}:{config.data.image_size}"
    if pixels_key not in image_cache:
        image_cache[pixels_key] = PixelImages(train_split.image_paths, progress=progress, size=config.data.image_size)
    pixels = image_cache[pixels_key]

    if resume:
        checkpoint = load_checkpoint(run_dir / LAST)
        model, vocab, config = checkpoint.model, checkpoint.vocab, _with_schedule(checkpoint.config, config)
    else:
        if config.model.pooling == "flatten" and not config.model.map_size:
            config.model.map_size = _backbone_map_size(config, pixels)
        vocab = Vocabulary.build(q.text for q in train_split.queries)
        model = create_model(config.model, vocab)
    model.to(device)

    images = _training_images(config, model, pixels, image_cache, device, progress)

    optimizer = build_optimizer(model, config)
    sampler = make_sampler(config.train.sampler, train_part, config.train.batch_size, config.train.seed)
    triplet_rng = torch.Generator().manual_seed(config.train.seed)
    start_step, best = 0, {"R@1": -1.0}
    if resume:
        optimizer_from_tensors(optimizer, checkpoint.trainer_tensors, checkpoint.trainer_state["optimizer"])
        sampler.restore(checkpoint.trainer_state["sampler"])
        triplet_rng.set_state(checkpoint.trainer_tensors["rng.triplets"])
        torch.set_rng_state(checkpoint.trainer_tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in checkpoint.trainer_tensors:
            torch.cuda.set_rng_state(checkpoint.trainer_tensors["rng.cuda"], device)
        start_step, best = checkpoint.trainer_state["step"], checkpoint.trainer_state["best_val"]

    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / METRICS, fresh=not resume)
    if not resume:
        log.write({"config": config.to_dict(), "train_queries": len(train_part.queries),
                   "val_queries": len(val_part.queries)})
    protocol = css_protocol(config.protocol)
    use_amp = config.train.amp and device.type == "cuda"
    model.train()
    bar = tqdm(range(start_step, config.train.iterations), desc=f"training {config.model.name}", unit="step",
               disable=not progress, initial=start_step, total=config.train.iterations)
    started = time.perf_counter()
    for step in bar:
        _set_learning_rate(optimizer, config, step)
        batch = [train_part.queries[i] for i in sampler.next_batch()]
        references = images.batch([q.reference for q in batch], device)
        targets = images.batch([q.target for q in batch], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            query_features = model.encode_queries(references, [q.text for q in batch])
            target_features = model.encode_targets(targets)
        loss = compute_loss(config.train.loss, model.normalization(query_features.float()),
                            model.normalization(target_features.float()), triplet_rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % config.train.log_every == 0 or done == config.train.iterations:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.write({"step": done, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                       "seconds": round(time.perf_counter() - started, 2)})
        if done % config.train.eval_every == 0 or done == config.train.iterations:
            val = evaluate_split(model, val_part, images, protocol, device, progress=False)
            log.write({"step": done, "val": val})
            if val["R@1"] > best["R@1"]:
                best = val
                save_checkpoint(run_dir / BEST, model, config, vocab)
            trainer_tensors, optimizer_meta = optimizer_to_tensors(optimizer)
            trainer_tensors.update(_rng_tensors(triplet_rng, device))
            save_checkpoint(run_dir / LAST, model, config, vocab, trainer_tensors,
                            {"step": done, "best_val": best, "optimizer": optimizer_meta,
                             "sampler": sampler.state()})
    return TrainResult(run_dir, best)


def _with_schedule(saved: Config, requested: Config) -> Config:
    """On resume the saved run config wins, except how long to train and how often to check."""
    saved.train.iterations = requested.train.iterations
    saved.train.eval_every = requested.train.eval_every
    saved.train.log_every = requested.train.log_every
    return saved
