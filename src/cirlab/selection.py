"""Which checkpoint a run keeps as `best`: the three ways the references select, as one choice.

- "carve" (default): hold out the queries of `data.val_fraction` of the training source images and keep the
  checkpoint with the best validation metric. The honest choice for synthetic data, and the only one for
  benchmarks without a validation split of their own.
- "val": train on the whole training split and select on the benchmark's own validation split, as the CLIP4Cir
  and OFFSET code do on FashionIQ and CIRR. Those papers also report on that split, so the reported number is
  then the selected one: the protocol text says so.
- "last": train on the whole training split and keep the last checkpoint, as the TIRG code does.

Checkpoints are never selected on a test split.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod

import torch

from cirlab.config import Config, ConfigError
from cirlab.data.benchmarks import Benchmark, load_benchmark
from cirlab.data.records import RetrievalSplit, carve_validation
from cirlab.evaluate import css_protocol, evaluate_benchmark, evaluate_split
from cirlab.image_batches import ImageBatches
from cirlab.models.base import CIRModel
from cirlab.provenance import OWN_VALIDATION_SPLIT

SELECTIONS: tuple[str, ...] = ("carve", "val", "last")


def metric_value(metrics: dict[str, float], expression: str) -> float:
    """The validation metric `expression` names: one metric ("R@1"), or a sum of several ("R@10+R@50", as the
    OFFSET code selects on Shoes); a name the metrics lack raises ConfigError."""
    names = [name.strip() for name in expression.split("+")]
    missing = [name for name in names if name not in metrics]
    if missing:
        raise ConfigError(f"train.select_metric={expression!r}: {missing[0]!r} is not among the validation metrics "
                          f"({', '.join(sorted(metrics))})")
    return sum(metrics[name] for name in names)


class Selection(ABC):
    """What the loop trains on, and how a checkpoint is judged."""

    def __init__(self, train_part: RetrievalSplit, metric: str) -> None:
        self.train_part = train_part
        self.metric = metric

    @abstractmethod
    def validate(self, model: CIRModel, images: ImageBatches, device: torch.device) -> dict[str, float] | None:
        """Validation metrics of `model`, or None when checkpoints are not compared."""

    @abstractmethod
    def describe(self) -> str:
        """The choice in words, for metrics files and result tables."""

    def record(self) -> dict[str, object]:
        """What the metrics log's header says of the choice."""
        return {"selection": self.describe(), "train_queries": len(self.train_part.queries)}


class CarvedValidation(Selection):
    def __init__(self, config: Config, train_split: RetrievalSplit) -> None:
        train_part, self.val_part = carve_validation(train_split, config.data.val_fraction, config.train.seed)
        super().__init__(train_part, config.train.select_metric or "R@1")
        self.protocol = css_protocol(config.protocol)
        self.fraction = config.data.val_fraction

    def validate(self, model: CIRModel, images: ImageBatches, device: torch.device) -> dict[str, float]:
        return evaluate_split(model, self.val_part, images, self.protocol, device, progress=False)

    def describe(self) -> str:
        return (f"best {self.metric} on a validation split carved from train (the queries of "
                f"{self.fraction:.0%} of the source images, {len(self.val_part.queries)} queries), trained on the rest")

    def record(self) -> dict[str, object]:
        return {**super().record(), "val_queries": len(self.val_part.queries)}


class BenchmarkValidation(Selection):
    def __init__(self, config: Config, train_split: RetrievalSplit, image_cache: dict[str, ImageBatches]) -> None:
        fmt = config.data.format
        if fmt not in OWN_VALIDATION_SPLIT:
            raise ConfigError(f"train.selection=val needs a benchmark with a validation split of its own "
                              f"({', '.join(OWN_VALIDATION_SPLIT)}); {fmt} has none: use carve or last")
        split = OWN_VALIDATION_SPLIT[fmt]
        validation_config = dataclasses.replace(config, protocol=dataclasses.replace(config.protocol, split=split))
        self.benchmark: Benchmark = load_benchmark(validation_config)
        self.image_cache = image_cache  # the validation images are decoded (and mapped) once for the whole run
        super().__init__(train_split, config.train.select_metric or "avg")
        self.split = split

    def validate(self, model: CIRModel, images: ImageBatches, device: torch.device) -> dict[str, float]:
        return evaluate_benchmark(model, self.benchmark, device, progress=False,
                                  image_cache=self.image_cache)

    def describe(self) -> str:
        queries = sum(len(e.queries) for e in self.benchmark.evalsets)
        return (f"best {self.metric} on the benchmark's own {self.split} split ({queries} queries), "
                "trained on the whole train split")


class LastCheckpoint(Selection):
    def __init__(self, train_split: RetrievalSplit) -> None:
        super().__init__(train_split, metric="")

    def validate(self, model: CIRModel, images: ImageBatches, device: torch.device) -> None:
        return None

    def describe(self) -> str:
        return "the last checkpoint, trained on the whole train split (no validation)"


def checkpoint_selection(config: Config, train_split: RetrievalSplit,
                         image_cache: dict[str, ImageBatches]) -> Selection:
    """The run's `train.selection` (see the module docstring)."""
    choice = config.train.selection
    if choice == "carve":
        return CarvedValidation(config, train_split)
    if config.train.early_stop_patience and choice == "last":
        raise ConfigError("train.early_stop_patience needs a validation metric: use train.selection=carve or val")
    if choice == "val":
        return BenchmarkValidation(config, train_split, image_cache)
    if choice == "last":
        return LastCheckpoint(train_split)
    raise ConfigError(f"unknown train.selection {choice!r} (known: {', '.join(SELECTIONS)})")
