"""Your own data: an image folder and JSONL files of {"reference", "text", "target"} records.

Each line of a JSONL file is one triplet; "reference" and "target" are image paths relative to the
image folder (forward slashes), which also serve as image ids. Absolute paths, ".." components and
paths that resolve outside the folder (through a symbolic link) are rejected.

Protocol choices: gallery = "eval_images" (every image named by the evaluation records, first-seen
order; default) or "folder" (every image file below the folder, sorted); reference = "removed"
(default) or "kept"; a hit is the record's own target image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import EvalQuery, EvalSet, TrainingSet, Triplet, missing_images, raise_first, read_lines

KEYS = ("reference", "text", "target")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
GALLERIES = ("eval_images", "folder")
REFERENCE_RULES = ("removed", "kept")
KS = (1, 5, 10, 50)


def _path_problem(value: str, folder: Path) -> str | None:
    """Why an image path is not acceptable, or None."""
    if "\\" in value:
        return "uses backslashes; separate folders with '/'"
    path = PurePosixPath(value)
    if path.is_absolute() or PureWindowsPath(value).drive:
        return "is absolute; paths must be relative to the image folder"
    if ".." in path.parts:
        return "contains '..'; paths must stay inside the image folder"
    if not (folder / path).resolve().is_relative_to(folder.resolve()):
        return "resolves outside the image folder"
    return None


def _record_problems(record: Any, where: str, folder: Path) -> list[str]:
    if not isinstance(record, dict):
        return [f"{where}: expected a JSON object, got {type(record).__name__}"]
    problems = [f"{where}: missing or non-string {key!r}" for key in KEYS
                if not isinstance(record.get(key), str) or not record[key].strip()]
    for key in ("reference", "target"):
        if isinstance(record.get(key), str) and record[key].strip():
            problem = _path_problem(record[key], folder)
            if problem:
                problems.append(f"{where}: {key} {record[key]!r} {problem}")
    return problems


def _read_records(path: Path, folder: Path) -> tuple[list[dict], list[str]]:
    records, problems = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{where}: not valid JSON ({error.msg})")
            continue
        record_problems = _record_problems(record, where, folder)
        problems += record_problems
        if not record_problems:
            records.append(record)
    return records, problems


def _image_id(value: str) -> str:
    return str(PurePosixPath(value))  # "a//b/./c.jpg" and "a/b/c.jpg" are the same image


def _folder_images(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _triplet(record: dict) -> Triplet:
    return Triplet(_image_id(record["reference"]), record["text"], _image_id(record["target"]))


def load_folder(folder: Path | str, eval_file: Path | str, train_file: Path | str | None = None, *,
                gallery: str = "eval_images", reference: str = "removed",
                ks: Sequence[int] = KS) -> tuple[TrainingSet, EvalSet]:
    """Training triplets of `train_file` (none without one) and the evaluation set of `eval_file`."""
    for name, value, known in (("gallery", gallery, GALLERIES), ("reference", reference, REFERENCE_RULES)):
        if value not in known:
            raise ValueError(f"unknown {name} {value!r} (known: {', '.join(known)})")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: missing image folder")
    eval_records, problems = _read_records(Path(eval_file), folder)
    train_records, train_problems = _read_records(Path(train_file), folder) if train_file else ([], [])
    raise_first(problems + train_problems, "check_folder")
    triplets = [_triplet(r) for r in eval_records]
    named = list(dict.fromkeys(image for t in triplets for image in (t.reference, t.target)))
    images = named if gallery == "eval_images" else _folder_images(folder)
    queries = [EvalQuery(t.reference, t.text, frozenset([t.target]),
                         frozenset([t.reference]) if reference == "removed" else frozenset()) for t in triplets]
    evalset = EvalSet(
        benchmark="folder", split=Path(eval_file).stem, gallery=images,
        image_paths={image: folder / image for image in dict.fromkeys(images + named)}, queries=queries,
        protocol={"gallery": "images named by the evaluation records" if gallery == "eval_images"
                  else "every image file of the folder", "reference": reference, "hit": "the record's target image"},
        ks=tuple(ks))
    return TrainingSet.located([_triplet(r) for r in train_records], lambda image: folder / image), evalset


def check_folder(folder: Path | str, files: Sequence[Path | str]) -> list[str]:
    """Every problem in the JSONL `files`: malformed lines and records, rejected paths, and images
    that do not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: missing image folder"]
    problems: list[str] = []
    named: dict[str, Path] = {}
    for file in files:
        try:
            records, file_problems = _read_records(Path(file), folder)
        except DataFormatError as error:
            records, file_problems = [], [str(error)]
        problems += file_problems
        named.update({image: folder / image for r in records for image in (_image_id(r["reference"]),
                                                                           _image_id(r["target"]))})
    return problems + missing_images(named)
