"""CIRCO (Baldrati et al., ICCV 2023): the released annotations over COCO 2017 unlabeled, mAP@K and the server file.

Layout (the miccunifi/CIRCO README):
    <root>/annotations/val.json, test.json       lists of {id, reference_img_id, target_img_id, relative_caption,
                                                 shared_concept, gt_img_ids} (+ semantic_aspects on val; test has
                                                 no target_img_id or gt_img_ids)
    <root>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json   {"images": [{"id", "file_name"}, ...]}
    <root>/COCO2017_unlabeled/unlabeled2017/<file_name>

Protocol (CIRCO's src/evaluation.py, the code of its test server, and SEARLE's validate.py):
- gallery = every image of image_info_unlabeled2017.json (the whole unlabeled set), for val and test alike;
- reference: "kept" in the ranking (default: neither the server nor SEARLE removes it) or "removed";
- mAP@K for K in 5, 10, 25, 50 over `gt_img_ids`: AP@K = sum over k <= K of P@k x rel_k, / min(K, |gt_img_ids|);
- Recall@K for the same K on `target_img_id` alone; mAP@10 per semantic aspect (val);
- caption_join, the text the model sees: "caption" (default), the relative caption alone, as SEARLE's code feeds
  it (inside its zero-shot template "a photo of $ that ...", which is SEARLE's, not a supervised model's);
  or "concept": "<shared_concept> but <relative_caption>", the shared concept the annotators wrote to remove
  ambiguities, which zero-shot follow-ups prepend in variants of that form.
The test split has no labels: evaluation refuses it and `write_circo_submission` writes the server's file.
CIRCO has no training split: train on another benchmark and evaluate with `--set data.format=circo`.
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
    missing_images,
    raise_first,
    ranked_ids,
    read_json,
    read_json_records,
)
from cirlab.files import atomic_write_text

SPLITS = ("val", "test")
KS = (5, 10, 25, 50)
ASPECT_K = 10
SUBMISSION_TOP = 50
REFERENCE_RULES = ("kept", "removed")
CAPTION_JOINS = {
    "caption": "relative_caption alone (SEARLE's text, without its zero-shot template)",
    "concept": "'<shared_concept> but <relative_caption>'",
}
ANNOTATIONS_DIR = Path("annotations")
COCO_DIR = Path("COCO2017_unlabeled")
IMAGE_INFO = COCO_DIR / "annotations" / "image_info_unlabeled2017.json"
IMAGES_DIR = COCO_DIR / "unlabeled2017"


def _annotations(root: Path, split: str) -> Path:
    return root / ANNOTATIONS_DIR / f"{split}.json"


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _ground_truth_problems(entry: dict, where: str) -> list[str]:
    truths = entry.get("gt_img_ids")
    if not (isinstance(truths, list) and truths and all(_is_id(t) for t in truths)):
        return [f"{where}: 'gt_img_ids' must be a non-empty list of integer image ids"]
    problems = [f"{where}: 'gt_img_ids' lists an image twice"] if len(set(truths)) < len(truths) else []
    if _is_id(entry.get("target_img_id")) and entry["target_img_id"] not in truths:
        problems.append(f"{where}: target_img_id {entry['target_img_id']} is not among gt_img_ids")
    return problems


def _entry_problems(entry: Any, where: str, labelled: bool) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: expected an object, got {type(entry).__name__}"]
    ids = ("id", "reference_img_id") + (("target_img_id",) if labelled else ())
    problems = [f"{where}: missing or non-integer {key!r}" for key in ids if not _is_id(entry.get(key))]
    problems += [f"{where}: missing or empty {key!r}" for key in ("relative_caption", "shared_concept")
                 if not _is_text(entry.get(key))]
    aspects = entry.get("semantic_aspects", [])
    if not (isinstance(aspects, list) and all(_is_text(a) for a in aspects)):
        problems.append(f"{where}: 'semantic_aspects' must be a list of strings")
    return problems + (_ground_truth_problems(entry, where) if labelled else [])


def _duplicate_ids(entries: list, path: Path) -> list[str]:
    """Query ids key the server's file, so each may appear once."""
    seen: set[int] = set()
    problems = []
    for index, entry in enumerate(entries):
        query_id = entry.get("id") if isinstance(entry, dict) else None
        if _is_id(query_id) and query_id in seen:
            problems.append(f"{path}: entry {index}: query id {query_id} is used twice")
        if _is_id(query_id):
            seen.add(query_id)
    return problems


def _read_entries(root: Path, split: str) -> tuple[list[dict], list[str]]:
    path = _annotations(root, split)
    entries, problems = read_json_records(path, lambda e, where: _entry_problems(e, where, split == "val"),
                                          "queries")
    return entries, problems + _duplicate_ids(entries, path)


def _read_image_info(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Image id (as a string) -> file, in the order of the image-info file: the gallery's column order."""
    path = root / IMAGE_INFO
    info = read_json(path)
    images = info.get("images") if isinstance(info, dict) else None
    if not isinstance(images, list):
        return {}, [f"{path}: expected a COCO image-info object with an 'images' list"]
    paths: dict[str, Path] = {}
    problems = []
    for index, image in enumerate(images):
        if not (isinstance(image, dict) and _is_id(image.get("id")) and _is_text(image.get("file_name"))):
            problems.append(f"{path}: image {index}: expected an integer 'id' and a 'file_name' string")
        elif str(image["id"]) in paths:
            problems.append(f"{path}: image {index}: id {image['id']} is listed twice")
        else:
            paths[str(image["id"])] = root / IMAGES_DIR / image["file_name"]
    return paths, problems


def _named_images(entry: dict) -> list[Any]:
    return [entry.get("reference_img_id"), entry.get("target_img_id"), *(entry.get("gt_img_ids") or [])]


def _unknown_images(entries: list, images: dict[str, Path], root: Path, split: str) -> list[str]:
    path = _annotations(root, split)
    problems = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict):
            unknown = dict.fromkeys(i for i in _named_images(entry) if _is_id(i) and str(i) not in images)
            problems += [f"{path}: entry {index}: image {image} is not in {IMAGE_INFO.name}" for image in unknown]
    return problems


def _text(entry: dict, caption_join: str) -> str:
    if caption_join == "concept":
        return f"{entry['shared_concept']} but {entry['relative_caption']}"
    return entry["relative_caption"]


def _query(entry: dict, labelled: bool, reference_removed: bool, caption_join: str) -> EvalQuery:
    reference = str(entry["reference_img_id"])
    return EvalQuery(reference, _text(entry, caption_join),
                     targets=frozenset([str(entry["target_img_id"])]) if labelled else frozenset(),
                     excluded=frozenset([reference]) if reference_removed else frozenset(),
                     query_id=str(entry["id"]),
                     ground_truths=frozenset(str(t) for t in entry["gt_img_ids"]) if labelled else frozenset(),
                     aspects=tuple(entry.get("semantic_aspects", ())) if labelled else ())


def _protocol(reference: str, caption_join: str) -> dict[str, str]:
    return {
        "gallery": f"every image of {IMAGE_INFO.name} (the whole COCO 2017 unlabeled set)",
        "reference": reference,
        "text": CAPTION_JOINS[caption_join],
        "mAP": "over gt_img_ids: AP@K = sum over k <= K of P@k x rel_k / min(K, |gt_img_ids|)",
        "hit": "Recall@K on target_img_id alone",
    }


def _check_choice(name: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"unknown CIRCO {name} {value!r} (known: {', '.join(known)})")


def load_circo(root: Path | str, split: str = "val", *, reference: str = "kept",
               caption_join: str = "caption") -> EvalSet:
    """The evaluation set of `split` ("val" or "test") over the whole image set; see the module docstring."""
    _check_choice("split", split, SPLITS)
    _check_choice("reference rule", reference, REFERENCE_RULES)
    _check_choice("caption join", caption_join, tuple(CAPTION_JOINS))
    root = Path(root)
    entries, problems = _read_entries(root, split)
    images, image_problems = _read_image_info(root)
    raise_first(problems + image_problems, "check_circo")
    raise_first(_unknown_images(entries, images, root, split), "check_circo")
    labelled = split == "val"
    queries = [_query(entry, labelled, reference == "removed", caption_join) for entry in entries]
    return EvalSet(benchmark="circo", split=split, gallery=list(images), image_paths=images, queries=queries,
                   protocol=_protocol(reference, caption_join), ks=KS, map_ks=KS,
                   aspect_k=ASPECT_K if labelled else None)


def write_circo_submission(scores: np.ndarray | torch.Tensor, evalset: EvalSet, out_dir: Path | str,
                           name: str = "cirlab") -> tuple[Path]:
    """The CIRCO test server's file, circo_submission_<name>.json: every query id (they must run from 0 without a
    gap, as the server asserts) -> its top 50 image ids as integers (the README's format), excluded ids removed."""
    ids = [q.query_id for q in evalset.queries]
    if sorted(int(i) for i in ids if i is not None and i.isdigit()) != list(range(len(ids))):
        raise ValueError(f"{evalset.benchmark} {evalset.split}: a CIRCO submission needs query ids 0 to "
                         f"{len(ids) - 1}, each once")
    rankings = ranked_ids(scores, evalset, SUBMISSION_TOP)
    submission = {query_id: [int(image) for image in ranking] for query_id, ranking in zip(ids, rankings)}
    path = Path(out_dir) / f"circo_submission_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(dict(sorted(submission.items(), key=lambda item: int(item[0])))))
    return (path,)


def check_circo(root: Path | str, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Every problem of a CIRCO folder: missing or malformed annotation and image-info files and records, query
    images absent from the image info, and missing image files."""
    root = Path(root)
    try:
        images, problems = _read_image_info(root)
    except DataFormatError as error:
        images, problems = {}, [str(error)]
    for split in splits:
        try:
            entries, entry_problems = _read_entries(root, split)
        except DataFormatError as error:
            entries, entry_problems = [], [str(error)]
        problems += entry_problems + (_unknown_images(entries, images, root, split) if images else [])
    return problems + missing_images(images)
