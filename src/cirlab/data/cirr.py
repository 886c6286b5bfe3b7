"""CIRR, dataset version rc2: the official annotation files, metrics and test-server submissions.

Layout (CLIP4Cir / SPRC; set `annotations=""` when captions/ and image_splits/ sit in the root):
    <root>/<annotations>/captions/cap.rc2.<split>.json       split in train, val, test1
    <root>/<annotations>/image_splits/split.rc2.<split>.json  {name: "./dev/dev-0-0-img0.png", ...}
    <root>/dev/..., <root>/test1/..., <root>/train/<n>/...     (paths in the split files, relative to root)

Protocol (CLIP4Cir `compute_cirr_val_metrics`): gallery = every image of the split file; the
reference is removed from each ranking; the hit is `target_hard` only (`target_soft` is ignored: it
does not always contain the target); Recall@1/5/10/50, and Recall_subset@1/2/3 ranking only the
five other members of the query's `img_set`. test1 has no targets: evaluation refuses, submission
files (`write_cirr_submissions`) do not need them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import (
    EvalQuery,
    EvalSet,
    TrainingSet,
    Triplet,
    missing_images,
    raise_first,
    ranked_ids,
    read_json,
    read_json_records,
)
from cirlab.files import atomic_write_text

SPLITS = ("train", "val", "test1")
KS = (1, 5, 10, 50)
SUBSET_KS = (1, 2, 3)
SUBMISSION_TOP = {"recall": 50, "recall_subset": 3}
PROTOCOL = {
    "gallery": "all images of the split",
    "reference": "removed",
    "hit": "target_hard (target_soft ignored)",
    "subset": "the 5 other members of the query's img_set, for Recall_subset@1/2/3",
}


def _paths(root: Path, annotations: str, split: str) -> tuple[Path, Path]:
    base = root / annotations if annotations else root
    return base / "captions" / f"cap.rc2.{split}.json", base / "image_splits" / f"split.rc2.{split}.json"


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _entry_problems(entry: Any, where: str, labelled: bool) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: expected an object, got {type(entry).__name__}"]
    problems = []
    if not isinstance(entry.get("pairid"), int) or isinstance(entry.get("pairid"), bool):
        problems.append(f"{where}: missing or non-integer 'pairid'")
    for key in ("reference", "caption") + (("target_hard",) if labelled else ()):
        if not _is_name(entry.get(key)):
            problems.append(f"{where}: missing or non-string {key!r}")
    members = entry.get("img_set", {}).get("members") if isinstance(entry.get("img_set"), dict) else None
    if not (isinstance(members, list) and all(_is_name(m) for m in members)):
        return problems + [f"{where}: 'img_set.members' must be a list of image names"]
    if entry.get("reference") not in members:
        problems.append(f"{where}: the reference is not among img_set.members")
    if labelled and _is_name(entry.get("target_hard")) and entry["target_hard"] not in members:
        problems.append(f"{where}: target_hard is not among img_set.members")
    return problems


def _read_entries(path: Path, labelled: bool) -> tuple[list[dict], list[str]]:
    return read_json_records(path, lambda entry, where: _entry_problems(entry, where, labelled), "queries")


def _read_split(path: Path, root: Path) -> tuple[dict[str, Path], list[str]]:
    names = read_json(path)
    if not isinstance(names, dict):
        return {}, [f"{path}: expected a JSON object mapping image names to relative paths"]
    problems = [f"{path}: image {name!r}: expected a relative path string, got {rel!r}"
                for name, rel in names.items() if not _is_name(rel)]
    return {name: root / rel for name, rel in names.items() if _is_name(rel)}, problems


def _unknown_images(entries: list[dict], images: dict[str, Path], path: Path, labelled: bool) -> list[str]:
    problems = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        img_set = entry.get("img_set")
        members = img_set.get("members", []) if isinstance(img_set, dict) else []
        names = [entry.get("reference"), *members] + ([entry.get("target_hard")] if labelled else [])
        unknown = sorted({n for n in names if _is_name(n) and n not in images})
        problems += [f"{path}: entry {index}: image {name!r} is not in the split file" for name in unknown]
    return problems


def _query(entry: dict) -> EvalQuery:
    reference = entry["reference"]
    targets = frozenset([entry["target_hard"]]) if "target_hard" in entry else frozenset()
    subset = tuple(m for m in entry["img_set"]["members"] if m != reference)
    return EvalQuery(reference, entry["caption"], targets, frozenset([reference]), subset, str(entry["pairid"]))


def _training_set(root: Path, annotations: str) -> TrainingSet:
    path, split_path = _paths(root, annotations, "train")
    entries, problems = _read_entries(path, labelled=True)
    images, split_problems = _read_split(split_path, root)
    raise_first(problems + split_problems, "check_cirr")
    raise_first(_unknown_images(entries, images, path, labelled=True), "check_cirr")
    return TrainingSet.located([Triplet(e["reference"], e["caption"], e["target_hard"]) for e in entries],
                               images.__getitem__)


def load_cirr(root: Path | str, split: str = "val", *, annotations: str = "cirr") -> tuple[TrainingSet, EvalSet]:
    """Training triplets (cap.rc2.train.json) and the evaluation set of `split` ("val" or "test1")."""
    if split not in SPLITS[1:]:
        raise ValueError(f"unknown CIRR split {split!r} (known: {', '.join(SPLITS[1:])})")
    root = Path(root)
    captions_path, split_path = _paths(root, annotations, split)
    labelled = split != "test1"
    entries, problems = _read_entries(captions_path, labelled)
    images, split_problems = _read_split(split_path, root)
    raise_first(problems + split_problems, "check_cirr")
    raise_first(_unknown_images(entries, images, captions_path, labelled), "check_cirr")
    evalset = EvalSet(benchmark="cirr", split=split, gallery=list(images), image_paths=images,
                      queries=[_query(e) for e in entries], protocol=dict(PROTOCOL), ks=KS)
    return _training_set(root, annotations), evalset


def cirr_average(metrics: dict[str, float]) -> float:
    """The headline "Avg" = (Recall@5 + Recall_subset@1) / 2."""
    return (metrics["R@5"] + metrics["Rsubset@1"]) / 2


def write_cirr_submissions(scores: np.ndarray | torch.Tensor, evalset: EvalSet, out_dir: Path | str,
                           name: str = "cirlab") -> tuple[Path, Path]:
    """The two files of the CIRR test server: recall_submission_<name>.json (top 50 of the gallery) and
    recall_subset_submission_<name>.json (top 3 of the subset), references removed before truncating,
    keys = pairids as strings plus "version": "rc2" and "metric"."""
    if any(q.query_id is None for q in evalset.queries):
        raise ValueError("every query needs its pairid (query_id) for a CIRR submission")
    out_dir = Path(out_dir)
    written = []
    for metric, top in SUBMISSION_TOP.items():
        rankings = ranked_ids(scores, evalset, top, within_subset=metric == "recall_subset")
        submission: dict[str, Any] = {"version": "rc2", "metric": metric}
        submission.update({q.query_id: ranking for q, ranking in zip(evalset.queries, rankings)})
        path = out_dir / f"{metric}_submission_{name}.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(submission, sort_keys=True))
        written.append(path)
    return written[0], written[1]


def check_cirr(root: Path | str, splits: tuple[str, ...] = SPLITS, annotations: str = "cirr") -> list[str]:
    """Every problem in the CIRR files of `splits`: missing or malformed files and records, query
    images absent from the split file, and missing image files."""
    root = Path(root)
    problems: list[str] = []
    for split in splits:
        captions_path, split_path = _paths(root, annotations, split)
        labelled = split != "test1"
        try:
            entries, entry_problems = _read_entries(captions_path, labelled)
        except DataFormatError as error:
            entries, entry_problems = [], [str(error)]
        try:
            images, split_problems = _read_split(split_path, root)
        except DataFormatError as error:
            images, split_problems = {}, [str(error)]
        problems += entry_problems + split_problems
        if images:
            problems += _unknown_images(entries, images, captions_path, labelled) + missing_images(images)
    return problems
