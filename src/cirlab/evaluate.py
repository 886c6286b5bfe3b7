"""Recall@K under an explicit protocol (TIRG's `test_retrieval.py` for CSS).

A protocol is data: which images form the gallery, whether the query's own reference image is
removed, what counts as a hit, and which K are reported. Every result states it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cirlab.checkpoint import load_checkpoint
from cirlab.config import ProtocolConfig
from cirlab.data.benchmarks import load_splits
from cirlab.data.records import RetrievalSplit
from cirlab.data.tensors import ImageBatches, PixelImages
from cirlab.devices import resolve_device
from cirlab.files import atomic_write_text
from cirlab.models.base import CIRModel


@dataclass(frozen=True)
class Protocol:
    name: str
    gallery: str
    remove_reference: bool
    hit_rule: str
    ks: tuple[int, ...] = field(default=(1, 5, 10, 50))

    def describe(self) -> str:
        removal = "the query's own reference image removed" if self.remove_reference else "reference kept"
        return (f"protocol {self.name}: gallery = {self.gallery}; {removal}; hit = {self.hit_rule}; "
                f"Recall@K for K in {list(self.ks)}")


def css_protocol(config: ProtocolConfig) -> Protocol:
    """TIRG's CSS protocol: gallery = every image of the split, the query's own image excluded
    (only that exact index), hit = a top-K image with the target's label (identical scene)."""
    return Protocol(name="css", gallery="all images of the split", remove_reference=config.remove_reference,
                    hit_rule="retrieved image has the target's label (same scene)", ks=tuple(config.ks))


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
                  progress: bool = True) -> torch.Tensor:
    chunks = [model.encode_targets(images.batch(range(s, min(s + batch_size, len(images))), device)).float()
              for s in tqdm(range(0, len(images), batch_size), desc="embedding gallery", unit="batch",
                            disable=not progress, leave=False)]
    return torch.cat(chunks)


@torch.no_grad()
def embed_queries(model: CIRModel, split: RetrievalSplit, images: ImageBatches, device: torch.device,
                  batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(split.queries), batch_size), desc="embedding queries", unit="batch",
                      disable=not progress, leave=False):
        queries = split.queries[start:start + batch_size]
        references = images.batch([q.reference for q in queries], device)
        chunks.append(model.encode_queries(references, [q.text for q in queries]).float())
    return torch.cat(chunks)


@torch.no_grad()
def embed_split(model: CIRModel, split: RetrievalSplit, images: ImageBatches, device: torch.device,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Query states for every query of `split` and target features for all of its images (eval mode)."""
    was_training = model.training
    model.eval()
    gallery = embed_targets(model, images, device, progress=progress)
    queries = embed_queries(model, split, images, device, progress=progress)
    model.train(was_training)
    return queries, gallery


@torch.no_grad()
def recall_from_embeddings(model: CIRModel, queries: torch.Tensor, gallery: torch.Tensor, split: RetrievalSplit,
                           protocol: Protocol, query_chunk: int = 2048) -> dict[str, float]:
    """Recall@K from precomputed states, scored with the model's exact `score`, in query chunks."""
    labels = torch.as_tensor(split.labels, device=gallery.device)
    references = torch.tensor([q.reference for q in split.queries], device=gallery.device)
    target_labels = labels[torch.tensor([q.target for q in split.queries], device=gallery.device)]
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


def markdown_table(rows: dict[str, dict[str, float]], protocol: Protocol) -> str:
    """One row per model, one column per metric, the protocol stated under the table."""
    metrics = [f"R@{k}" for k in protocol.ks]
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.1f}" for m in metrics) + " |")
    lines.append("")
    lines.append(protocol.describe())
    return "\n".join(lines)


def evaluate_checkpoint(folder: Path, overrides: list[str] | None = None, split_name: str = "test",
                        progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint folder on its benchmark's `split_name` split; returns a JSON-ready result."""
    checkpoint = load_checkpoint(folder, overrides)
    config = checkpoint.config
    train_split, test_split = load_splits(config.data)
    split = {"train": train_split, "test": test_split}[split_name]
    device = resolve_device(config.train.device)
    model = checkpoint.model.to(device)
    protocol = css_protocol(config.protocol)
    metrics = evaluate_split(model, split, PixelImages(split.image_paths, progress=progress), protocol, device,
                             progress=progress)
    return {"checkpoint": str(folder), "split": split_name, "queries": len(split.queries),
            "gallery": len(split.image_paths), "protocol": asdict(protocol), "protocol_text": protocol.describe(),
            "metrics": metrics, "config": config.to_dict()}


def write_result(result: dict[str, Any], out: Path) -> str:
    """`out`.json (everything) and `out`.md (the table and its protocol), each written atomically;
    returns the table."""
    protocol = Protocol(**{**result["protocol"], "ks": tuple(result["protocol"]["ks"])})
    table = markdown_table({result["config"]["model"]["name"]: result["metrics"]}, protocol)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", table + "\n")):
        atomic_write_text(out.with_suffix(suffix), text)
    return table
