"""The training loop: plain PyTorch, one process (CPU or one GPU) or several under torchrun (DDP, see
cirlab.distributed), checkpoints and exact resume.

Recipe defaults follow the TIRG code (SGD, momentum 0.9, lr 0.01, batch 32, soft triplet on CSS).
Checkpoints are selected as `train.selection` says (cirlab.selection: a validation split carved from the training
data by default, the benchmark's own val split, or the last checkpoint), never on test.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cirlab.acceleration import autocast_dtype, grad_scaler, prepare_model, to_channels_last, uses_channels_last
from cirlab.checkpoint import load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from cirlab.config import Config, ConfigError
from cirlab.data.benchmarks import css_renders, load_benchmark, refuse_training_on
from cirlab.data.records import Query, RetrievalSplit
from cirlab.devices import resolve_device
from cirlab.distributed import DistContext
from cirlab.encoders.image import create_backbone, image_initialisation
from cirlab.encoders.regions import REGION_CACHE, attach_regions
from cirlab.encoders.text import Vocabulary
from cirlab.explain.supervision import EditMasks, edit_masks, pixel_difference_masks
from cirlab.explain.training import check_mmgrad_config, mmgrad_attention_loss
from cirlab.image_batches import CachedMaps, ImageBatches, PixelImages, refuse_cached_augmentation
from cirlab.images import Preprocessing
from cirlab.losses import batch_classification_loss, sample_soft_triplets, soft_triplet_loss
from cirlab.masks.batches import MaskedImages, attach_masks
from cirlab.models.base import CIRModel
from cirlab.models.registry import create_model
from cirlab.selection import Selection, checkpoint_selection, metric_value

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


class TrainingForward(nn.Module):
    """A step's forward as one module, since DDP synchronises the gradients of work done inside the forward
    it wraps: query and target features (under autocast when `amp_dtype` is set), then what the model's loss
    sees of them in float32 (`CIRModel.loss_features`: by default its learnable scaled normalisation).
    The references and the targets each take their own pass through the image tower, as in the TIRG code."""

    def __init__(self, model: CIRModel, amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def forward(self, references: torch.Tensor, texts: list[str],
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            references, targets = to_channels_last(references), to_channels_last(targets)
        with self.autocast(references.device):
            queries = self.model.encode_queries(references, texts)
            candidates = self.model.encode_targets(targets)
        return self.model.loss_features(queries.float(), candidates.float())


class DistinctImagesForward(TrainingForward):
    """The forward of `train.distinct_images`: each distinct image of the step passes the image tower once, and
    the references' features are composed from their rows (`CIRModel.queries_from_image_features`)."""

    def forward(self, images: torch.Tensor, texts: list[str], reference_rows: torch.Tensor,
                target_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = to_channels_last(images)
        with self.autocast(images.device):
            features = self.model.encode_targets(images)
            queries = self.model.queries_from_image_features(features[reference_rows], texts)
        return self.model.loss_features(queries.float(), features[target_rows].float())


def distinct_rows(references: list[int], targets: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Each image of a step once, in order of first appearance, and the rows of the references and the targets
    among them."""
    images = list(dict.fromkeys(references + targets))
    row = {image: i for i, image in enumerate(images)}
    return images, torch.tensor([row[i] for i in references]), torch.tensor([row[i] for i in targets])


def step_inputs(batch: list[Query], images: ImageBatches, device: torch.device, distinct: bool,
                augment_rng: torch.Generator | None = None) -> tuple[Any, ...]:
    """What a step's forward takes: (distinct images, texts, reference rows, target rows) for
    `DistinctImagesForward`, else (references, texts, targets), cut by `augment_rng`'s windows where given."""
    texts = [q.text for q in batch]
    if distinct:
        order, reference_rows, target_rows = distinct_rows([q.reference for q in batch], [q.target for q in batch])
        return images.batch(order, device), texts, reference_rows.to(device), target_rows.to(device)
    augmenting = {} if augment_rng is None else {"generator": augment_rng}
    return (images.batch([q.reference for q in batch], device, **augmenting), texts,
            images.batch([q.target for q in batch], device, **augmenting))


def train_step(forward: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               inputs: tuple[Any, ...], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               ctx: DistContext) -> torch.Tensor:
    """One optimizer step on this rank's slice of the batch (`forward(*inputs)`). The loss is that of the whole
    global batch (features gathered from every rank, see cirlab.distributed), so its value is the same on every
    rank."""
    queries, candidates = forward(*inputs)
    loss = loss_fn(ctx.gather_with_grad(queries), ctx.gather_with_grad(candidates))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")


def build_optimizer(model: CIRModel, config: Config) -> torch.optim.Optimizer:
    """`train.optimizer` over trainable parameters; a trainable backbone gets `backbone_lr_mult` x lr, and
    with `text_lr_mult` != 1 the text encoder's trainable parameters get a group of their own at that multiple.

    Weight decay applies to every parameter (BN, the scale and TIRG's `a` included), as in the TIRG code.
    """
    if config.train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{config.train.optimizer}' (known: {', '.join(OPTIMIZERS)})")
    backbone = {id(p) for p in model.image_encoder.backbone.parameters()}
    # Only a multiplier other than 1 adds a group, so the optimizer state of earlier runs still resumes.
    text = {id(p) for p in model.text_encoder.parameters()} if config.train.text_lr_mult != 1.0 else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = backbone | text
    groups = [{"params": [p for p in trainable if id(p) not in grouped], "lr": config.train.lr}]
    backbone_params = [p for p in trainable if id(p) in backbone]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": config.train.lr * config.train.backbone_lr_mult})
    text_params = [p for p in trainable if id(p) in text]
    if text_params:
        groups.append({"params": text_params, "lr": config.train.lr * config.train.text_lr_mult})
    for group in groups:
        group["initial_lr"] = group["lr"]
    if config.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.train.lr, weight_decay=config.train.weight_decay)
    return torch.optim.SGD(groups, lr=config.train.lr, momentum=config.train.momentum,
                           weight_decay=config.train.weight_decay)


def learning_rate_factor(config: Config, step: int) -> float:
    """The lr multiplier at `step` (0-based): lr_decay_factor once per lr_decay_every steps, or once per
    lr_milestones step passed."""
    every, milestones = config.train.lr_decay_every, config.train.lr_milestones
    if every and milestones:
        raise ValueError("set train.lr_decay_every or train.lr_milestones, not both")
    decays = step // every if every else sum(step >= milestone for milestone in milestones or [])
    return config.train.lr_decay_factor ** decays


def _set_learning_rate(optimizer: torch.optim.Optimizer, config: Config, step: int) -> None:
    factor = learning_rate_factor(config, step)
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


def _pixels_key(config: Config) -> str:
    """What decides a split's decoded images: runs that agree on it share them through `image_cache`."""
    data = config.data
    return f"pixels:{data.format}:{data.root}:{Preprocessing.from_config(data)}:{css_renders(data)}"


def _training_images(config: Config, model: CIRModel, pixels: PixelImages, image_cache: dict[str, ImageBatches],
                     device: torch.device, progress: bool) -> ImageBatches:
    """Pixels, or with a frozen backbone its maps computed once (shared through `image_cache`)."""
    if not (config.model.freeze_backbone and config.train.cache_features):
        return pixels
    # The output channels tell one map from a multi-level backbone's several (and which levels), so
    # models sharing `image_cache` never get each other's maps.
    backbone = (config.model.image_backbone, config.model.image_weights, config.model.backbone_upto,
                model.image_encoder.backbone.out_channels)
    key = f"maps:{_pixels_key(config)}:{backbone}"
    if key not in image_cache:
        image_cache[key] = CachedMaps(model.image_encoder, pixels, device, progress=progress)
    return image_cache[key]


def _augmentation_rng(config: Config, images: ImageBatches, attention: AttentionTerm | None,
                      rank: int) -> torch.Generator | None:
    """The generator of the training augmentation's windows (None without one). Each rank augments its own slice
    of the batch, so each has its own stream. Refuses the images an augmentation cannot follow: region boxes
    (LBF) and MMGrad's edit masks are computed on the evaluation view."""
    augment = Preprocessing.from_config(config.data).augment
    if augment == "none":
        return None
    if not isinstance(images, (PixelImages, MaskedImages)) or attention is not None:
        what = "MMGrad's edit masks" if attention is not None else f"this model's {type(images).__name__}"
        raise ConfigError(f"data.augment={augment} cannot be used with {what}, which follow the evaluation view "
                          "of each image: set data.augment=none")
    return torch.Generator().manual_seed(config.train.seed * 1_000 + 1 + rank)


def distinct_images(config: Config, model: CIRModel, augment_rng: torch.Generator | None,
                    attention: AttentionTerm | None) -> bool:
    """Whether steps embed each distinct image once (`train.distinct_images`): for a model that composes its
    queries from image features, and never with a random augmentation (a reference and a target that are one
    image would share a window) or MMGrad's attention term (which differentiates each reference's own pass)."""
    return (config.train.distinct_images and augment_rng is None and attention is None
            and model.composes_image_features)


def _rng_tensors(triplet_rng: torch.Generator, device: torch.device,
                 augment_rng: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Every torch generator the loop draws from, for an exact resume."""
    states = {"rng.triplets": triplet_rng.get_state(), "rng.torch": torch.get_rng_state()}
    if augment_rng is not None:
        states["rng.augment"] = augment_rng.get_state()
    if device.type == "cuda":  # dropout draws from the device's own generator
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True,
          image_cache: dict[str, ImageBatches] | None = None, overwrite: bool = False,
          ctx: DistContext | None = None) -> TrainResult:
    """Train `config` into `run_dir` (best/ and last/ checkpoints, metrics.jsonl).

    Under torchrun, `ctx` (from `cirlab.distributed.process_group`) makes every rank train its slice of a
    global batch of world size x batch_size; rank 0 alone logs, evaluates and writes checkpoints.

    With `resume`, training continues from `run_dir/last` exactly where it stopped. A folder that
    already holds a run is refused unless `resume` or `overwrite` says what to do with it. `image_cache`
    lets several runs in one process share decoded images and cached backbone maps.
    """
    run_dir = Path(run_dir)
    if not resume and not overwrite and (run_dir / METRICS).exists():
        raise FileExistsError(f"{run_dir} already holds a training run: pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
    ctx = ctx or DistContext(device=resolve_device(config.train.device))
    device, progress = ctx.device, progress and ctx.is_main
    torch.manual_seed(config.train.seed)
    learning_rate_factor(config, 0)  # refuses a contradictory schedule before any work
    refuse_cached_augmentation(config)
    refuse_training_on(config)
    benchmark = load_benchmark(config)
    train_split = benchmark.train
    image_cache = image_cache if image_cache is not None else {}
    selection = checkpoint_selection(config, train_split, image_cache)
    train_part = selection.train_part
    pixels_key = _pixels_key(config)
    if pixels_key not in image_cache:
        image_cache[pixels_key] = PixelImages(train_split.image_paths, progress=progress,
                                              size=Preprocessing.from_config(config.data))
    pixels = image_cache[pixels_key]

    if resume:
        checkpoint = load_checkpoint(run_dir / LAST)
        trained_by = checkpoint.trainer_state.get("world_size", 1)
        if trained_by != ctx.world_size:  # the global batch, and so the sampler's draws, depend on it
            raise ValueError(f"{run_dir} was trained by {trained_by} process(es); resume it with as many, "
                             f"not {ctx.world_size}")
        model, vocab, config = checkpoint.model, checkpoint.vocab, _with_schedule(checkpoint.config, config)
    else:
        if config.model.pooling == "flatten" and not config.model.map_size:
            config.model.map_size = _backbone_map_size(config, pixels)
        vocab = Vocabulary.build(train_split.all_texts())  # redrawn texts (Fashion200k, MIT-States) included
        model = create_model(config.model, vocab)
        # recorded in the checkpoint: a null data.image_size means "the native size", fixed here once
        model.preprocessing = pixels.preprocessing
    model.to(device)
    prepare_model(model, config.train, device)
    attention = _attention_setup(config, ctx, model)  # refuses impossible settings before any caching

    images = _training_images(config, model, pixels, image_cache, device, progress)
    # Region models (LBF) get each image's boxes attached, computed or read once per split.
    images = attach_regions(model, images, pixels, train_split.image_paths, Path(config.data.root) / REGION_CACHE,
                            progress)
    # Mask models (OFFSET) get each image's dominant-portion mask, from the dataset's mask cache.
    images = attach_masks(model, images, pixels, train_split.image_paths, Path(config.data.root), device, progress)
    augment_rng = _augmentation_rng(config, images, attention, ctx.rank)

    amp_dtype = autocast_dtype(config.train, device)
    distinct = distinct_images(config, model, augment_rng, attention)
    forward = ctx.wrap((DistinctImagesForward if distinct else TrainingForward)(
        model, amp_dtype, uses_channels_last(config.train, device)), config.train.sync_batchnorm)
    scaler = grad_scaler(amp_dtype, device)
    if ctx.rank:  # dropout masks must differ between ranks, as they differ between one process's samples
        torch.manual_seed(config.train.seed + ctx.rank)
    optimizer = build_optimizer(model, config)
    sampler = make_sampler(config.train.sampler, train_part, config.train.batch_size * ctx.world_size,
                           config.train.seed)
    triplet_rng = torch.Generator().manual_seed(config.train.seed)
    start_step, best, stale = 0, {}, 0
    if resume:
        optimizer_from_tensors(optimizer, checkpoint.trainer_tensors, checkpoint.trainer_state["optimizer"])
        sampler.restore(checkpoint.trainer_state["sampler"])
        triplet_rng.set_state(checkpoint.trainer_tensors["rng.triplets"])
        torch.set_rng_state(checkpoint.trainer_tensors[ctx.key("rng.torch")])
        if device.type == "cuda" and ctx.key("rng.cuda") in checkpoint.trainer_tensors:
            torch.cuda.set_rng_state(checkpoint.trainer_tensors[ctx.key("rng.cuda")], device)
        scaler.load_state_dict(checkpoint.trainer_state.get("grad_scaler", {}))
        if augment_rng is not None:
            augment_rng.set_state(checkpoint.trainer_tensors[ctx.key("rng.augment")])
        start_step, best = checkpoint.trainer_state["step"], checkpoint.trainer_state["best_val"]
        stale = checkpoint.trainer_state.get("evaluations_without_gain", 0)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(run_dir / METRICS, fresh=not resume)
    if ctx.is_main and not resume:
        log.write({"config": config.to_dict(), **selection.record(),
                   "image_tower": image_initialisation(config.model.image_backbone, config.model.image_weights),
                   # data.missing_images=skip: what of each split was there to train and select on
                   **({"kept": {c.split: c.describe() for c in benchmark.kept}} if benchmark.kept else {})})
    loss_fn = partial(model.training_loss, retrieval_loss=partial(compute_loss, config.train.loss,
                                                                  generator=triplet_rng))
    model.train()
    bar = tqdm(range(start_step, config.train.iterations), desc=f"training {config.model.name}", unit="step",
               disable=not progress, initial=start_step, total=config.train.iterations)
    started = time.perf_counter()
    for step in bar:
        _set_learning_rate(optimizer, config, step)
        # The whole global batch is drawn before sharding, so every rank consumes the sampler's RNG alike.
        batch = ctx.shard(train_part.draw_batch(sampler.next_batch(), sampler.rng))
        attending = attention is not None and step >= attention.config.start_step
        inputs = step_inputs(batch, images, device, distinct, augment_rng)
        # (references, texts, targets): attention never comes with distinct images
        step_loss = attention.adding_to(loss_fn, model, batch, *inputs, pixels, device) if attending else loss_fn
        loss = train_step(forward, optimizer, scaler, inputs, step_loss, ctx)
        done = step + 1
        if ctx.is_main and (done % config.train.log_every == 0 or done == config.train.iterations):
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.write({"step": done, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                       "seconds": round(time.perf_counter() - started, 4),  # a GPU step is milliseconds
                       **({"attention_loss": attention.last} if attending else {})})
        checkpointing = done % config.train.eval_every == 0 or done == config.train.iterations
        # Gathering every rank's RNG states (for an exact resume) is a collective: all ranks take part.
        rng_states = ctx.gather_states(_rng_tensors(triplet_rng, device, augment_rng)) if checkpointing else {}
        if ctx.is_main and checkpointing:
            best, stale = _select(selection, model, images, device, best, stale, done, log,
                                  lambda: save_checkpoint(run_dir / BEST, model, config, vocab))
            trainer_tensors, optimizer_meta = optimizer_to_tensors(optimizer)
            trainer_tensors.update(rng_states)
            save_checkpoint(run_dir / LAST, model, config, vocab, trainer_tensors,
                            {"step": done, "best_val": best, "evaluations_without_gain": stale,
                             "optimizer": optimizer_meta, "sampler": sampler.state(), "world_size": ctx.world_size,
                             "grad_scaler": scaler.state_dict()})
        patience = config.train.early_stop_patience
        if checkpointing and patience and ctx.broadcast_flag(stale >= patience):
            if ctx.is_main:
                log.write({"step": done, "early_stop": f"{stale} evaluations without a better {selection.metric}"})
            break
    return TrainResult(run_dir, best)


def _select(selection: Selection, model: CIRModel, images: ImageBatches, device: torch.device,
            best: dict[str, float], stale: int, step: int, log: MetricsLog,
            save_best: Callable[[], None]) -> tuple[dict[str, float], int]:
    """Validate at a checkpoint and keep `best` as the selection says; returns the best validation metrics so
    far and the number of evaluations in a row without a gain."""
    val = selection.validate(model, images, device)
    if val is None:  # the last checkpoint is the selected one
        save_best()
        return best, 0
    log.write({"step": step, "val": val})
    if not best or metric_value(val, selection.metric) > metric_value(best, selection.metric):
        save_best()
        return val, 0
    return best, stale + 1


class AttentionTerm:
    """MMGrad training: adds weight x L_att(MMGrad map, edit mask) of the step's batch to the
    retrieval loss (see cirlab.explain.training); `last` keeps the latest L_att for the log."""

    def __init__(self, config: Config, masks: EditMasks | None) -> None:
        self.config = config.train.mmgrad
        self.masks = masks
        self.last = 0.0

    def _batch_masks(self, batch: list[Query], pixels: PixelImages, device: torch.device) -> torch.Tensor:
        if self.masks is not None:
            return self.masks.batch(batch, device)
        return pixel_difference_masks(pixels.batch([q.reference for q in batch], device),
                                      pixels.batch([q.target for q in batch], device))

    def adding_to(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: CIRModel,
                  batch: list[Query], references: torch.Tensor, texts: list[str], targets: torch.Tensor,
                  pixels: PixelImages, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        masks = self._batch_masks(batch, pixels, device)

        def with_attention(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            term = mmgrad_attention_loss(model, references, texts, targets, masks, self.config)
            self.last = term.item()
            return loss_fn(queries, candidates) + self.config.weight * term
        return with_attention


def _attention_setup(config: Config, ctx: DistContext, model: CIRModel) -> AttentionTerm | None:
    settings = config.train.mmgrad
    if not settings.weight:
        return None
    check_mmgrad_config(settings, config.model.freeze_backbone)
    if not settings.detached and (blocker := model.double_backward_blocker()):
        raise ValueError(blocker)
    if ctx.world_size > 1:  # DDP does not support torch.autograd.grad inside its step
        raise ValueError("MMGrad training (train.mmgrad.weight > 0) runs in one process, not under torchrun")
    return AttentionTerm(config, edit_masks(settings.masks, Path(config.data.root), "train", settings.side))


def _with_schedule(saved: Config, requested: Config) -> Config:
    """On resume the saved run config wins, except how long to train and how often to check."""
    saved.train.iterations = requested.train.iterations
    saved.train.eval_every = requested.train.eval_every
    saved.train.log_every = requested.train.log_every
    return saved
