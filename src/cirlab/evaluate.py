"""Recall@K under an explicit protocol.

A protocol is data: which images form the gallery, whether the query's own reference image is
removed, what counts as a hit, and which K are reported. Every result states it.

Two paths share the embedding code: the label-based CSS split of TIRG's `test_retrieval.py`
(vectorised; training validation and the CSS benchmark), and `EvalSet`s with explicit targets and
exclusions (`cirlab eval` on every benchmark, CSS included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from cirlab.checkpoint import load_checkpoint
from cirlab.config import Config, ProtocolConfig
from cirlab.data.benchmarks import CSS_KS, Benchmark, load_benchmark, load_splits
from cirlab.data.circo import write_circo_submission
from cirlab.data.cirr import cirr_average, write_cirr_submissions
from cirlab.data.evalsets import (
    EvalSet,
    average_precisions,
    average_variant_scores,
    mean_average_precision,
    recall_subset_at_k,
)
from cirlab.data.evalsets import recall_at_k as evalset_recall_at_k
from cirlab.data.records import RetrievalSplit
from cirlab.data.regions import EDIT_REGIONS_FILE
from cirlab.devices import resolve_device
from cirlab.encoders.regions import attach_regions
from cirlab.explain.quality import explanation_quality, explanation_table
from cirlab.explain.supervision import EditMasks
from cirlab.files import atomic_write_text
from cirlab.image_batches import CachedMaps, ImageBatches, PixelImages
from cirlab.masks.batches import attach_masks
from cirlab.models.base import CIRModel
from cirlab.provenance import describe_start


@dataclass(frozen=True)
class Protocol:
    name: str
    gallery: str
    remove_reference: bool
    hit_rule: str
    ks: tuple[int, ...] = field(default=CSS_KS)

    def describe(self) -> str:
        removal = "the query's own reference image removed" if self.remove_reference else "reference kept"
        return (f"protocol {self.name}: gallery = {self.gallery}; {removal}; hit = {self.hit_rule}; "
                f"Recall@K for K in {list(self.ks)}")


def css_protocol(config: ProtocolConfig) -> Protocol:
    """TIRG's CSS protocol: gallery = every image of the split, the query's own image excluded
    (only that exact index), hit = a top-K image with the target's label (identical scene)."""
    return Protocol(name="css", gallery="all images of the split", remove_reference=config.remove_reference,
                    hit_rule="retrieved image has the target's label (same scene)", ks=tuple(config.ks or CSS_KS))


def recall_at_k(scores: torch.Tensor, references: torch.Tensor, target_labels: torch.Tensor,
                gallery_labels: torch.Tensor, ks: tuple[int, ...], remove_reference: bool) -> dict[str, float]:
    """Percentage of queries with a hit in the top K. `scores` is Q x N over the gallery."""
    scores = scores.clone()
    if remove_reference:
        scores[torch.arange(len(scores)), references] = float("-inf")
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = gallery_labels[top] == target_labels[:, None]
    return {f"R@{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.no_grad()
def embed_targets(model: CIRModel, images: ImageBatches, device: torch.device, batch_size: int = 256,
                  progress: bool = True, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Target features of `indices` (default: every image), in that order."""
    indices = list(range(len(images))) if indices is None else list(indices)
    chunks = [model.encode_targets(images.batch(indices[s:s + batch_size], device)).float()
              for s in tqdm(range(0, len(indices), batch_size), desc="embedding gallery", unit="batch",
                            disable=not progress, leave=False)]
    return torch.cat(chunks)


@torch.no_grad()
def reference_features(model: CIRModel, images: ImageBatches, references: Sequence[int], gallery: torch.Tensor,
                       gallery_rows: dict[int, int], device: torch.device,
                       progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For a model with `composes_image_features`: the target features of every reference, as a table and each
    reference's row in it. A reference in the gallery (`gallery_rows`: image index -> row of `gallery`) reuses
    the gallery's feature; any other image is embedded once, however many queries it starts."""
    missing = [image for image in dict.fromkeys(references) if image not in gallery_rows]
    extra = embed_targets(model, images, device, progress=progress, indices=missing) if missing else gallery[:0]
    rows = {**gallery_rows, **{image: len(gallery) + i for i, image in enumerate(missing)}}
    return torch.cat([gallery, extra]), torch.tensor([rows[image] for image in references], device=gallery.device)


QueryEncoder = Callable[[slice, list[str]], torch.Tensor]


def query_encoder(model: CIRModel, images: ImageBatches, references: Sequence[int], gallery: torch.Tensor,
                  gallery_rows: dict[int, int], device: torch.device, progress: bool = True) -> QueryEncoder:
    """`encode(part, texts)`: the query states of `references[part]` with `texts`. A model with
    `composes_image_features` composes them from image features embedded once (`reference_features`, reusing the
    gallery's); any other model encodes each slice's reference images."""
    if model.composes_image_features:
        table, rows = reference_features(model, images, references, gallery, gallery_rows, device, progress)
        return lambda part, texts: model.queries_from_image_features(table[rows[part]], texts).float()
    return lambda part, texts: model.encode_queries(images.batch(list(references[part]), device), texts).float()


@torch.no_grad()
def embed_queries(split: RetrievalSplit, encode: QueryEncoder, batch_size: int = 256,
                  progress: bool = True) -> torch.Tensor:
    """The query state of every query of `split`, by `encode` (`query_encoder`), in batches."""
    chunks = []
    for start in tqdm(range(0, len(split.queries), batch_size), desc="embedding queries", unit="batch",
                      disable=not progress, leave=False):
        part = slice(start, start + batch_size)
        chunks.append(encode(part, [q.text for q in split.queries[part]]))
    return torch.cat(chunks)


@torch.no_grad()
def embed_split(model: CIRModel, split: RetrievalSplit, images: ImageBatches, device: torch.device,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Query states for every query of `split` and target features for its gallery images (eval mode)."""
    was_training = model.training
    model.eval()
    size = len(images) if split.gallery_size is None else split.gallery_size
    gallery = embed_targets(model, images, device, progress=progress, indices=range(size))
    encode = query_encoder(model, images, [q.reference for q in split.queries], gallery,
                           {i: i for i in range(size)}, device, progress)
    queries = embed_queries(split, encode, progress=progress)
    model.train(was_training)
    return queries, gallery


@torch.no_grad()
def recall_from_embeddings(model: CIRModel, queries: torch.Tensor, gallery: torch.Tensor, split: RetrievalSplit,
                           protocol: Protocol, query_chunk: int = 2048) -> dict[str, float]:
    """Recall@K from precomputed states, scored with the model's exact `score`, in query chunks.

    A reference-only image (index >= the gallery size: another render of a gallery scene) removes
    that scene's own gallery image, as TIRG removes the query's own image."""
    size = gallery.shape[0]
    labels = torch.as_tensor(split.labels, device=gallery.device)
    references = torch.tensor([q.reference for q in split.queries], device=gallery.device) % size
    target_labels = labels[torch.tensor([q.target for q in split.queries], device=gallery.device)]
    labels = labels[:size]
    totals = {f"R@{k}": 0.0 for k in protocol.ks}
    for start in range(0, len(queries), query_chunk):
        end = start + query_chunk
        chunk = recall_at_k(model.score(queries[start:end], gallery), references[start:end],
                            target_labels[start:end], labels, protocol.ks, protocol.remove_reference)
        for key, value in chunk.items():
            totals[key] += value * len(queries[start:end])
    return {key: value / len(queries) for key, value in totals.items()}


def evaluate_split(model: CIRModel, split: RetrievalSplit, images: ImageBatches, protocol: Protocol,
                   device: torch.device, progress: bool = True) -> dict[str, float]:
    """Recall@K of `model` on every query of `split` against all of its images."""
    queries, gallery = embed_split(model, split, images, device, progress)
    return recall_from_embeddings(model, queries, gallery, split, protocol)


def markdown_table(rows: dict[str, dict[str, float]], protocol_text: str) -> str:
    """One row per model, one column per metric (those of the first row), the protocol stated under it."""
    metrics = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.1f}" for m in metrics) + " |")
    lines.append("")
    lines.append(protocol_text)
    return "\n".join(lines)


@torch.no_grad()
def score_evalset(model: CIRModel, evalset: EvalSet, images: ImageBatches, column: dict[str, int],
                  device: torch.device, query_chunk: int = 1024, progress: bool = True
                  ) -> list[tuple[EvalSet, torch.Tensor]]:
    """The exact Q x G scores of `evalset`, in query chunks (each with its slice of the set), so a
    large benchmark never holds the whole matrix; several text variants are averaged (FashionIQ)."""
    gallery = embed_targets(model, images, device, indices=[column[i] for i in evalset.gallery], progress=progress)
    encode = query_encoder(model, images, [column[q.reference] for q in evalset.queries], gallery,
                           {column[image]: row for row, image in enumerate(evalset.gallery)}, device, progress)
    chunks = []
    for start in tqdm(range(0, len(evalset.queries), query_chunk), desc=f"scoring {evalset.benchmark}",
                      unit="chunk", disable=not progress, leave=False):
        rows = slice(start, start + query_chunk)
        part = dataclasses.replace(evalset, queries=evalset.queries[rows])
        per_variant = [model.score(encode(rows, part.texts(v)), gallery).cpu() for v in range(part.text_variants)]
        chunks.append((part, torch.as_tensor(average_variant_scores(per_variant))))
    return chunks


def frozen_backbone_key(model: CIRModel) -> str | None:
    """A key naming a frozen backbone by its exact weights (None when the backbone trains), so runs that
    share one can share its cached maps."""
    encoder = model.image_encoder
    if not getattr(encoder, "freeze_backbone", False):
        return None
    digest = hashlib.sha1()
    for name, tensor in encoder.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _evalset_images(model: CIRModel, evalset: EvalSet, paths: list[Path], device: torch.device, progress: bool,
                    image_cache: dict[str, ImageBatches] | None) -> tuple[PixelImages, ImageBatches]:
    """The set's pixels decoded as the model's preprocessing says, and what the model reads: the pixels, or with
    an `image_cache` and a frozen backbone its float16 maps, computed once and shared by every model with the same
    backbone (as training does), which benchmarks that evaluate many runs use."""
    spec = model.preprocessing
    if image_cache is None:
        pixels = PixelImages(paths, progress=progress, size=spec)
        return pixels, pixels
    key = f"eval:{evalset.benchmark}:{evalset.split}:{spec}:{len(paths)}"
    if key not in image_cache:
        image_cache[key] = PixelImages(paths, progress=progress, size=spec)
    pixels = image_cache[key]
    backbone = frozen_backbone_key(model)
    if backbone is None:
        return pixels, pixels
    if f"{key}:maps:{backbone}" not in image_cache:
        image_cache[f"{key}:maps:{backbone}"] = CachedMaps(model.image_encoder, pixels, device, progress=progress)
    return pixels, image_cache[f"{key}:maps:{backbone}"]


def _scored_chunks(model: CIRModel, evalset: EvalSet, device: torch.device, progress: bool, query_chunk: int,
                   image_cache: dict[str, ImageBatches] | None = None
                   ) -> list[tuple[EvalSet, torch.Tensor]]:
    """The exact scores of `evalset` in query chunks, from its images decoded once, the model in eval mode."""
    ids = list(evalset.image_paths)
    paths = [evalset.image_paths[i] for i in ids]
    pixels, images = _evalset_images(model, evalset, paths, device, progress, image_cache)
    images = attach_regions(model, images, pixels, paths, progress=progress)  # region models (LBF)
    images = attach_masks(model, images, pixels, paths, device=device, progress=progress)  # mask models (OFFSET)
    column = {image: position for position, image in enumerate(ids)}
    was_training = model.training
    model.eval()
    chunks = score_evalset(model, evalset, images, column, device, query_chunk, progress)
    model.train(was_training)
    return chunks


def evaluate_evalset(model: CIRModel, evalset: EvalSet, device: torch.device, ks: Sequence[int] | None = None,
                     progress: bool = True, query_chunk: int = 1024,
                     image_cache: dict[str, ImageBatches] | None = None) -> dict[str, float]:
    """Recall@K of `model` on one evaluation set, plus mAP@K where the set asks for it (`map_ks`, per aspect with
    `aspect_k`) and CIRR's Recall_subset where queries have sets."""
    with_subsets = all(q.subset is not None for q in evalset.queries)
    totals: dict[str, float] = {}
    precisions: list[dict[int, np.ndarray]] = []  # per query: a per-aspect mean is not a mean of chunk means
    for part, scores in _scored_chunks(model, evalset, device, progress, query_chunk, image_cache):
        metrics = evalset_recall_at_k(scores, part, ks)
        if with_subsets:
            metrics.update(recall_subset_at_k(scores, part))
        if part.map_ks:
            precisions.append(average_precisions(scores, part))
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + value * len(part.queries)
    result = {key: value / len(evalset.queries) for key, value in totals.items()}
    if precisions:
        result.update(mean_average_precision({k: np.concatenate([p[k] for p in precisions]) for k in precisions[0]},
                                             evalset))
    if with_subsets and {"R@5", "Rsubset@1"} <= set(result):
        result["avg"] = cirr_average(result)
    return result


class SubmissionFormat(NamedTuple):
    """How a benchmark's test server wants a checkpoint's rankings."""

    split: str  # the protocol.split written unless the overrides choose one: the split whose labels are withheld
    write: Callable[..., tuple[Path, ...]]  # (scores, evalset, out_dir, name) -> the files written


SUBMISSIONS: dict[str, SubmissionFormat] = {
    "cirr": SubmissionFormat("test1", write_cirr_submissions),    # recall_ and recall_subset_submission_RUN.json
    "circo": SubmissionFormat("test", write_circo_submission),    # circo_submission_RUN.json
}


def write_submission(folder: Path, out_dir: Path, overrides: list[str] | None = None,
                     progress: bool = True) -> tuple[Path, ...]:
    """The test-server files of a checkpoint's benchmark (`SUBMISSIONS`), for `protocol.split`, by default the
    benchmark's test split; the benchmark may be another than the training one (`--set data.format=circo`)."""
    checkpoint = load_checkpoint(folder, overrides)
    config = checkpoint.config
    if config.data.format not in SUBMISSIONS:
        raise ValueError(f"test-server submissions are written for {', '.join(SUBMISSIONS)}; this checkpoint's "
                         f"benchmark is {config.data.format}")
    submission = SUBMISSIONS[config.data.format]
    if not any(o.split("=", 1)[0].strip() == "protocol.split" for o in overrides or []):
        config = dataclasses.replace(config, protocol=dataclasses.replace(config.protocol, split=submission.split))
    (evalset,) = load_benchmark(config).evalsets
    device = resolve_device(config.train.device)
    model = checkpoint.model.to(device)
    chunks = _scored_chunks(model, evalset, device, progress, query_chunk=1024)
    scores = torch.cat([scores for _, scores in chunks])
    return submission.write(scores, evalset, out_dir, name=Path(folder).resolve().parent.name or "cirlab")


def evaluate_benchmark(model: CIRModel, benchmark: Benchmark, device: torch.device, ks: Sequence[int] | None = None,
                       progress: bool = True,
                       image_cache: dict[str, ImageBatches] | None = None) -> dict[str, float]:
    """Metrics of every evaluation set; several sets (FashionIQ categories) are reported per set and
    averaged as the benchmark's papers do. `image_cache`: see `_evalset_images`."""
    per_set = {evalset.benchmark: evaluate_evalset(model, evalset, device, ks, progress,
                                                   image_cache=image_cache)
               for evalset in benchmark.evalsets}
    if benchmark.combine is None:
        (metrics,) = per_set.values()
        return metrics
    return benchmark.combine(per_set)


def evaluate_explanations(model: CIRModel, config: Config, split_name: str, device: torch.device, queries: int,
                          method: str = "mmgrad", progress: bool = True) -> dict[str, Any]:
    """Explanation quality on `queries` sampled queries of a CSS split, from its edit-region sidecar."""
    if config.data.format != "css":
        raise ValueError("explanation metrics need ground-truth edit regions, which only the CSS generator writes "
                         f"next to its data (this checkpoint's benchmark is {config.data.format})")
    train_split, test_split = load_splits(config.data)
    split = test_split if split_name == "test" else train_split
    masks = EditMasks(Path(config.data.root) / EDIT_REGIONS_FILE, split_name)
    images = PixelImages(split.image_paths, progress=progress, size=model.preprocessing)
    return explanation_quality(model, split.queries, images, masks, device, method=method, count=queries)


def evaluate_checkpoint(folder: Path, overrides: list[str] | None = None, progress: bool = True,
                        explain_queries: int = 0, explain_method: str = "mmgrad",
                        image_cache: dict[str, ImageBatches] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint folder under its benchmark's protocol; returns a JSON-ready result.
    With `explain_queries`, explanation metrics on that many queries are added (CSS). `image_cache` lets
    evaluations of several runs share decoded images and a frozen backbone's maps (`_evalset_images`)."""
    checkpoint = load_checkpoint(folder, overrides)
    config = checkpoint.config
    benchmark = load_benchmark(config)
    device = resolve_device(config.train.device)
    model = checkpoint.model.to(device)
    metrics = evaluate_benchmark(model, benchmark, device, config.protocol.ks, progress,
                                 image_cache)
    first = benchmark.evalsets[0]
    provenance = describe_start(config)
    result = {"checkpoint": str(folder), "benchmark": config.data.format, "split": first.split,
              "queries": sum(len(e.queries) for e in benchmark.evalsets),
              "gallery": sum(len(e.gallery) for e in benchmark.evalsets),
              "protocol": {**first.protocol, **provenance}, "protocol_text": "\n".join(
                  [*(e.describe() for e in benchmark.evalsets), "; ".join(f"{k}: {v}" for k, v in provenance.items())]),
              "metrics": metrics, "config": config.to_dict()}
    if explain_queries:
        result["explanations"] = evaluate_explanations(model, config, first.split, device, explain_queries,
                                                       explain_method, progress)
    return result


def result_paths(out: Path) -> tuple[Path, Path]:
    """The .json and .md files for `--out`: a given .json or .md suffix is honoured, any other dot is kept
    (`x.json` -> x.json and x.md; `run.v2` -> run.v2.json and run.v2.md)."""
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")


def write_result(result: dict[str, Any], out: Path) -> tuple[str, tuple[Path, Path]]:
    """The result as JSON (everything) and markdown (the table and its protocol) at `result_paths(out)`,
    each written atomically; returns the table and the two paths."""
    table = markdown_table({result["config"]["model"]["name"]: result["metrics"]}, result["protocol_text"])
    if "explanations" in result:
        table += "\n\n" + explanation_table(result["explanations"])
    paths = result_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in zip(paths, (json.dumps(result, indent=2), table + "\n"), strict=True):
        atomic_write_text(path, text)
    return table, paths
