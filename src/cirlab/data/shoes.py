"""Shoes relative captions (Guo et al. 2018 on the Attribute Discovery images) and its evaluation.

Layout (raw files of XiaoxiaoGuo/fashion-retrieval plus the image zip):
    <root>/relative_captions_shoes.json   [{"ImageName" (target), "ReferenceImageName", "RelativeCaption"}]
    <root>/train_im_names.txt, <root>/eval_im_names.txt   one image basename per line
    <root>/womens_<category>/<subdir>/img_womens_<category>_<n>.jpg   (found by basename anywhere below root)

Protocol (ARTEMIS): gallery = the eval images in file order; queries = triplets whose two images are
both eval images; single caption, surrounding whitespace stripped; reference removed; R@1/10/50.
Training triplets = triplets whose two images are both train images.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import (
    MISSING_IMAGE_POLICIES,
    EvalQuery,
    EvalSet,
    TrainingSet,
    Triplet,
    raise_first,
    read_json,
    read_lines,
)

CAPTIONS_FILE = "relative_captions_shoes.json"
TRAIN_NAMES = "train_im_names.txt"
EVAL_NAMES = "eval_im_names.txt"
KS = (1, 10, 50)
PROTOCOL = {
    "gallery": "eval_im_names.txt",
    "reference": "removed",
    "queries": "triplets with both images in eval_im_names.txt",
    "caption": "RelativeCaption with surrounding whitespace stripped",
    "hit": "the triplet's target image",
}
_KEYS = ("ReferenceImageName", "RelativeCaption", "ImageName")


def _read_triplets(path: Path) -> tuple[list[dict], list[str]]:
    entries = read_json(path)
    if not isinstance(entries, list):
        return [], [f"{path}: expected a JSON list of triplets"]
    problems = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{path}: entry {index}: expected an object, got {type(entry).__name__}")
            continue
        problems += [f"{path}: entry {index}: missing or non-string {key!r}"
                     for key in _KEYS if not isinstance(entry.get(key), str) or not entry[key].strip()]
    return entries, problems


def _well_formed(entry: Any) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(key), str) for key in _KEYS)


def _read_names(path: Path) -> list[str]:
    return [line.strip() for line in read_lines(path) if line.strip()]


def _index_images(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Basename -> path of every .jpg below root; basenames are unique in the release."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.jpg")):
        found[path.name].append(path)
    problems = [f"image {name!r}: found {len(paths)} times ({', '.join(map(str, paths))})"
                for name, paths in found.items() if len(paths) > 1]
    return {name: paths[0] for name, paths in found.items()}, problems


def _split_problems(entries: list[dict], train: set[str], evaluation: set[str], path: Path) -> list[str]:
    problems = []
    for index, entry in enumerate(entries):
        if not _well_formed(entry):
            continue
        pair = {entry.get("ReferenceImageName"), entry.get("ImageName")}
        if not (pair <= train or pair <= evaluation):
            problems.append(f"{path}: entry {index}: reference and target are not both train or both eval images")
    return problems


def _load(root: Path) -> tuple[list[dict], list[str], list[str], dict[str, Path], list[str]]:
    captions_path = root / CAPTIONS_FILE
    entries, problems = _read_triplets(captions_path)
    train, evaluation = _read_names(root / TRAIN_NAMES), _read_names(root / EVAL_NAMES)
    problems += _split_problems(entries, set(train), set(evaluation), captions_path)
    images, image_problems = _index_images(root)
    return entries, train, evaluation, images, problems + image_problems


def _triplets(entries: list[dict], names: set[str]) -> list[dict[str, Any]]:
    return [e for e in entries if e["ReferenceImageName"] in names and e["ImageName"] in names]


def load_shoes(root: Path | str, *, missing_images: str = "error") -> tuple[TrainingSet, EvalSet]:
    """Training triplets and the evaluation set (the release has one evaluation split, "eval").

    `missing_images`: "error" refuses a listed image not found below the root; "skip" gives it a path that does
    not exist (<root>/<name>), so `cirlab.data.evalsets`' skipping leaves it out as any missing file."""
    if missing_images not in MISSING_IMAGE_POLICIES:
        raise ValueError(f"unknown missing_images {missing_images!r} (known: {', '.join(MISSING_IMAGE_POLICIES)})")
    root = Path(root)
    entries, train, evaluation, found, problems = _load(root)
    raise_first(problems, "check_shoes")
    needed = set(train) | set(evaluation)
    missing = sorted(needed - set(found))
    if missing and missing_images == "error":
        raise DataFormatError(f"{root}: image {missing[0]!r} not found below the root "
                              f"({len(missing)} missing; check_shoes lists them all)")
    images = {name: found.get(name, root / name) for name in sorted(needed)}
    queries = [EvalQuery(e["ReferenceImageName"], e["RelativeCaption"].strip(), frozenset([e["ImageName"]]),
                         frozenset([e["ReferenceImageName"]])) for e in _triplets(entries, set(evaluation))]
    evalset = EvalSet(benchmark="shoes", split="eval", gallery=list(evaluation), image_paths=images, queries=queries,
                      protocol=dict(PROTOCOL), ks=KS)
    train_triplets = [Triplet(e["ReferenceImageName"], e["RelativeCaption"].strip(), e["ImageName"])
                      for e in _triplets(entries, set(train))]
    return TrainingSet.located(train_triplets, images.__getitem__), evalset


def check_shoes(root: Path | str) -> list[str]:
    """Every problem: missing or malformed files and triplets, triplets straddling the splits,
    duplicate image basenames, and listed or triplet images not found below the root."""
    root = Path(root)
    try:
        entries, problems = _read_triplets(root / CAPTIONS_FILE)
    except DataFormatError as error:
        entries, problems = [], [str(error)]
    names: dict[str, list[str]] = {}
    for file in (TRAIN_NAMES, EVAL_NAMES):
        try:
            names[file] = _read_names(root / file)
        except DataFormatError as error:
            names[file], problems = [], problems + [str(error)]
    problems += _split_problems(entries, set(names[TRAIN_NAMES]), set(names[EVAL_NAMES]), root / CAPTIONS_FILE)
    images, image_problems = _index_images(root)
    listed = dict.fromkeys(names[TRAIN_NAMES] + names[EVAL_NAMES])
    listed.update(dict.fromkeys(e[key] for e in entries if _well_formed(e) for key in _KEYS[::2]))
    return problems + image_problems + [f"image {name!r}: no file of that name below {root}"
                                        for name in listed if name not in images]
