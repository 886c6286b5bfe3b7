"""The registry of benchmark readers: a run's config in, its training split and evaluation sets out.

Training works on a `RetrievalSplit` (images by index, queries by index, an identity label per image);
evaluation works on the readers' `EvalSet`s, whose hit rules and exclusions are explicit. CSS keeps
its own label-based split for training and TIRG's protocol, and is also expressed as an `EvalSet`,
so `cirlab eval` runs one evaluation path for every benchmark.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.config import Config, ConfigError, DataConfig
from cirlab.data.circo import SPLITS as CIRCO_SPLITS
from cirlab.data.circo import load_circo
from cirlab.data.cirr import SPLITS as CIRR_SPLITS
from cirlab.data.cirr import load_cirr
from cirlab.data.css import CSSSplit, load_css
from cirlab.data.css3d import render_folder
from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import (
    MISSING_IMAGE_POLICIES,
    EvalQuery,
    EvalSet,
    KeptCount,
    TrainingSet,
    evalset_without_missing,
    raise_missing_images,
    training_without_missing,
)
from cirlab.data.fashion200k import load_fashion200k
from cirlab.data.fashioniq import CATEGORIES, combine_categories, load_fashioniq
from cirlab.data.fashioniq import SPLITS as FASHIONIQ_SPLITS
from cirlab.data.folder import load_folder
from cirlab.data.mitstates import load_mitstates
from cirlab.data.records import Query, Redraw, RetrievalSplit
from cirlab.data.shoes import load_shoes

CSS_KS = (1, 5, 10, 50)
# The protocol keys each format accepts (besides `ks`); see ProtocolConfig.
PROTOCOL_CHOICES: dict[str, tuple[str, ...]] = {
    "css": ("split", "remove_reference"),
    "fashioniq": ("split", "gallery", "reference", "caption_join"),
    "cirr": ("split",),
    "shoes": (),
    "fashion200k": (),
    "mitstates": (),
    "folder": ("gallery", "reference"),
    "circo": ("split", "reference", "caption_join"),
}
_OPTIONAL_CHOICES = ("split", "gallery", "reference", "caption_join")
# The evaluation splits (protocol.split) of the formats that have several; `cirlab data check` counts each.
EVAL_SPLITS: dict[str, tuple[str, ...]] = {"fashioniq": FASHIONIQ_SPLITS[1:], "cirr": CIRR_SPLITS[1:],
                                           "circo": CIRCO_SPLITS}
# Benchmarks released for evaluation alone: a model trains on another and is evaluated with --set data.format=...
EVALUATION_ONLY = ("circo",)


MetricsByName = dict[str, dict[str, float]]


@dataclass
class Benchmark:
    """What training and evaluation need of one dataset."""

    train: RetrievalSplit
    evalsets: list[EvalSet]    # several for FashionIQ (one per category), one otherwise
    # Per-set metrics (keyed by set name) -> the reported ones; None: the single set's own metrics.
    combine: Callable[[MetricsByName], dict[str, float]] | None = None
    # What data.missing_images=skip kept of each split (training, then evaluation); empty under "error".
    kept: list[KeptCount] = field(default_factory=list)


def _css_split(name: str, targets: CSSSplit, references: CSSSplit | None = None) -> RetrievalSplit:
    """The queries over `targets`' images; with `references` (another render of the same scenes),
    every query's reference image comes from it: those images follow the gallery, as references only."""
    queries = [Query(source, text, target) for source, text, target in targets.queries()]
    if references is None:
        return RetrievalSplit(name, list(targets.image_paths), targets.labels, queries)
    count = len(targets.image_paths)
    labels = np.concatenate([targets.labels, np.full(count, -1)])  # scene labels are >= 0: never a hit
    return RetrievalSplit(name, targets.image_paths + references.image_paths, labels,
                          [Query(count + q.reference, q.text, q.target) for q in queries], gallery_size=count)


def css_renders(config: DataConfig) -> tuple[str, str]:
    """The (reference, target and gallery) renders of a CSS config: "2d" or "3d" each."""
    return config.query_render or config.render, config.target_render or config.render


def load_splits(config: DataConfig) -> tuple[RetrievalSplit, RetrievalSplit]:
    """CSS (train, test) splits with TIRG's scene labels, in the configured renders.

    With different renders (2D-to-3D: query_render=2d, target_render=3d) every query keeps its
    scenes: its reference image is the source scene's 2D render and its target the target scene's 3D
    render, for training, validation and test alike, and the gallery holds 3D renders only. The
    papers leave the training pairs of this setting open; this is the plain reading (the query side
    is always 2D, the target side always 3D), and it keeps TIRG's sampler, hard-negative pairs
    included, unchanged.
    """
    if config.format != "css":
        raise ValueError(f"label-based splits exist for CSS only, not '{config.format}'")
    root = Path(config.root)
    query_render, target_render = css_renders(config)
    targets = load_css(root, images=render_folder(root, target_render))
    if query_render == target_render:
        return _css_split("train", targets.train), _css_split("test", targets.test)
    references = load_css(root, images=render_folder(root, query_render))
    return _css_split("train", targets.train, references.train), _css_split("test", targets.test, references.test)


def css_evalset(split: RetrievalSplit, remove_reference: bool, ks: tuple[int, ...] = CSS_KS,
                renders: tuple[str, str] = ("2d", "2d"), map_ks: tuple[int, ...] = ()) -> EvalSet:
    """TIRG's CSS protocol as an EvalSet: every gallery image with the target's label is a hit.

    Reference-only images (`split.gallery_size`) get ids prefixed with their folder, so they never
    clash with the gallery's; removing the reference then removes the reference scene's own
    gallery image, as TIRG removes the query's own image index.
    """
    size = len(split.image_paths) if split.gallery_size is None else split.gallery_size
    ids = ([path.name for path in split.image_paths[:size]]
           + [f"{path.parent.name}/{path.name}" for path in split.image_paths[size:]])
    same_label: dict[int, list[str]] = defaultdict(list)
    for image, label in zip(ids[:size], split.labels[:size].tolist()):
        same_label[label].append(image)
    queries = [EvalQuery(ids[q.reference], q.text, frozenset(same_label[int(split.labels[q.target])]),
                         frozenset([ids[q.reference % size]]) if remove_reference else frozenset())
               for q in split.queries]
    removal = "removed (that exact image only)" if remove_reference else "kept"
    if remove_reference and size < len(split.image_paths):
        removal = "the reference scene's own gallery image removed (that image only)"
    images = renders[0] if renders[0] == renders[1] else f"references {renders[0]}, gallery and targets {renders[1]}"
    return EvalSet(benchmark="css", split=split.name, gallery=ids[:size], image_paths=dict(zip(ids, split.image_paths)),
                   queries=queries, protocol={"images": images, "gallery": "all images of the split",
                                              "reference": removal,
                                              "hit": "retrieved image has the target's label (same scene)"},
                   ks=ks, map_ks=map_ks)


def training_split(training: TrainingSet) -> RetrievalSplit:
    """Triplets over image ids as a split over image indices; each image is its own identity. The
    training set's `draws`, if any, become the split's redraw information over the same indices."""
    ids = list(training.image_paths)
    index = {image: position for position, image in enumerate(ids)}
    queries = [Query(index[t.reference], t.text, index[t.target]) for t in training.triplets]
    if not queries:
        raise ValueError("the benchmark has no training triplets")
    variants = [t.variants for t in training.triplets] if any(t.variants for t in training.triplets) else None
    return RetrievalSplit("train", [training.image_paths[image] for image in ids], np.arange(len(ids)), queries,
                          redraw=Redraw(training.draws, ids) if training.draws is not None else None,
                          text_variants=variants)


def _merged(sets: list[TrainingSet]) -> TrainingSet:
    if len(sets) == 1:
        return sets[0]  # keeps its draws
    return TrainingSet([t for s in sets for t in s.triplets], {k: v for s in sets for k, v in s.image_paths.items()})


def _choices(config: Config) -> dict[str, Any]:
    """The protocol choices set in `config`, refused when the benchmark does not have them."""
    fmt = config.data.format
    chosen = {key: getattr(config.protocol, key) for key in _OPTIONAL_CHOICES if getattr(config.protocol, key)}
    unknown = sorted(set(chosen) - set(PROTOCOL_CHOICES[fmt]))
    if unknown:
        accepted = ", ".join(PROTOCOL_CHOICES[fmt]) or "none besides ks"
        raise ConfigError(f"protocol.{unknown[0]} does not apply to {fmt} (its protocol choices: {accepted})")
    return chosen


def _css(config: Config, root: Path, choices: dict[str, Any]) -> Benchmark:
    train, test = load_splits(config.data)
    split = choices.get("split", "test")
    if split not in ("test", "train"):
        raise ConfigError(f"unknown CSS split {split!r} (known: test, train)")
    return Benchmark(train, [css_evalset(test if split == "test" else train, config.protocol.remove_reference,
                                         renders=css_renders(config.data),
                                         map_ks=tuple(config.protocol.map_ks or ()))])


def _fashioniq(config: Config, root: Path, choices: dict[str, Any]) -> Benchmark:
    categories = config.data.categories or list(CATEGORIES)
    corrections = config.data.caption_corrections
    loaded = [load_fashioniq(root, category, **choices, train_captions=config.data.train_captions,
                             corrections=Path(corrections.format(category=category)) if corrections else None)
              for category in categories]
    return _triplet_benchmark(config, loaded, combine=lambda per_set: combine_categories(
        {name.removeprefix("fashioniq-"): metrics for name, metrics in per_set.items()}))


def _folder(config: Config, root: Path, choices: dict[str, Any]) -> Benchmark:
    if not config.data.eval_file:
        raise ConfigError("the folder format needs data.eval_file (a JSONL of {reference, text, target})")
    train_file = root / config.data.train_file if config.data.train_file else None
    return _triplet_benchmark(config, [load_folder(root, root / config.data.eval_file, train_file, **choices)])


def _simple(load: Callable[..., tuple[TrainingSet, EvalSet]], seeded: bool = False,
            finds_images: bool = False) -> Callable[..., Benchmark]:
    """A reader of (root, protocol choices) -> (training set, evaluation set). `finds_images`: it looks images up
    by name below the root (Shoes), so it takes data.missing_images itself: an image it cannot find has no path."""
    def read(config: Config, root: Path, choices: dict[str, Any]) -> Benchmark:
        options: dict[str, Any] = {"seed": config.train.seed} if seeded else {}
        if finds_images:
            options["missing_images"] = config.data.missing_images
        return _triplet_benchmark(config, [load(root, **choices, **options)])
    return read


def _triplet_benchmark(config: Config, loaded: list[tuple[TrainingSet, EvalSet]],
                       combine: Callable[[MetricsByName], dict[str, float]] | None = None) -> Benchmark:
    """The benchmark of a reader's (training set, evaluation set) pairs, one per FashionIQ category, under
    data.missing_images: "error" refuses a missing image now rather than when training decodes it; "skip"
    leaves missing images out and records what is kept."""
    kept: list[KeptCount] = []
    if config.data.missing_images == "error":
        raise_missing_images([images for training, evalset in loaded
                              for images in (training.image_paths, evalset.image_paths)],
                             f"cirlab data check {config.data.root} --format {config.data.format}")
    else:
        loaded, kept = _without_missing(loaded)
    return Benchmark(training_split(_merged([training for training, _ in loaded])), [e for _, e in loaded],
                     combine, kept)


def _without_missing(loaded: list[tuple[TrainingSet, EvalSet]]
                     ) -> tuple[list[tuple[TrainingSet, EvalSet]], list[KeptCount]]:
    """Every pair without its missing images, and the counts: training splits first, then evaluation splits."""
    pairs, training_counts, eval_counts = [], [], []
    for training, evalset in loaded:
        training, training_count = training_without_missing(training, f"{evalset.benchmark} train")
        evalset, eval_count = evalset_without_missing(evalset)
        if eval_count.total and not eval_count.kept:
            raise DataFormatError(f"{eval_count.split}: {eval_count.describe()}: every query names a missing image, "
                                  "so nothing is left to evaluate")
        pairs.append((training, evalset))
        training_counts.append(training_count)
        eval_counts.append(eval_count)
    return pairs, training_counts + eval_counts


def _evaluation_only(load: Callable[..., EvalSet]) -> Callable[..., Benchmark]:
    """A reader of (root, protocol choices) -> evaluation set, for a benchmark without a training split (CIRCO):
    its training split is empty (a model trains on another benchmark), data.missing_images as for the others."""
    def read(config: Config, root: Path, choices: dict[str, Any]) -> Benchmark:
        evalset, kept = load(root, **choices), []
        if config.data.missing_images == "error":
            raise_missing_images([evalset.image_paths],
                                 f"cirlab data check {config.data.root} --format {config.data.format}")
        else:
            evalset, count = evalset_without_missing(evalset)
            kept = [count]
        return Benchmark(RetrievalSplit("train", [], np.zeros(0, dtype=np.int64), []), [evalset], kept=kept)
    return read


_READERS: dict[str, Callable[[Config, Path, dict[str, Any]], Benchmark]] = {
    "css": _css,
    "fashioniq": _fashioniq,
    "cirr": _simple(load_cirr),
    "shoes": _simple(load_shoes, finds_images=True),
    "fashion200k": _simple(load_fashion200k, seeded=True),
    "mitstates": _simple(load_mitstates, seeded=True),
    "folder": _folder,
    "circo": _evaluation_only(load_circo),
}


def refuse_training_on(config: Config) -> None:
    """A benchmark without a training split cannot be trained on; say what to do instead."""
    if config.data.format in EVALUATION_ONLY:
        raise ConfigError(f"{config.data.format} has no training split: train on another benchmark (CIRR is the "
                          f"closest), then evaluate with cirlab eval RUN/best --set data.format={config.data.format} "
                          f"--set data.root=...")


def load_benchmark(config: Config) -> Benchmark:
    """Read the benchmark `config.data.format` from `config.data.root` under the configured protocol."""
    fmt = config.data.format
    if fmt not in _READERS:
        raise ConfigError(f"unknown data format '{fmt}' (known: {', '.join(_READERS)})")
    if config.protocol.map_ks and fmt != "css":
        raise ConfigError(f"protocol.map_ks is offered on CSS (several ground truths per query), not on {fmt}")
    if config.data.missing_images not in MISSING_IMAGE_POLICIES:
        raise ConfigError(f"unknown data.missing_images {config.data.missing_images!r} "
                          f"(known: {', '.join(MISSING_IMAGE_POLICIES)})")
    if config.data.missing_images == "skip" and fmt == "css":
        raise ConfigError("data.missing_images=skip does not apply to css: its splits index every image by position, "
                          "so its reader needs them all")
    if config.data.train_captions != "join" and fmt != "fashioniq":
        raise ConfigError(f"data.train_captions={config.data.train_captions} is for FashionIQ's two captions, "
                          f"not {fmt}")
    if config.data.caption_corrections and (fmt, config.protocol.caption_join) != ("fashioniq", "offset"):
        raise ConfigError("data.caption_corrections applies to FashionIQ with protocol.caption_join=offset only")
    root = Path(config.data.root)
    if not root.exists():
        raise FileNotFoundError(f"data.root {root} does not exist")
    return _READERS[fmt](config, root, _choices(config))
