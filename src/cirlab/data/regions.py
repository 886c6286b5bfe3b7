"""Ground-truth edit regions: the sidecar a synthetic generator writes next to its dataset.

One JSON line per query (split, reference image, target image, text) says which pixels the text
talks about, as a box and an exact mask in both images. Explanation metrics read it; the format is
specified field by field in docs/formats.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cirlab.data.errors import DataFormatError
from cirlab.files import atomic_write_text

EDIT_REGIONS_FILE = "edit_regions.jsonl"
FIELDS = ("split", "reference", "target", "text", "edit", "attribute",
          "reference_box", "target_box", "reference_mask", "target_mask")


def encode_rle(mask: np.ndarray) -> dict[str, list[int]]:
    """Run lengths of the row-major flattened mask, alternating False/True, starting with False."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"expected a 2-D bool mask, got {mask.dtype} of shape {mask.shape}")
    flat = mask.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)  # the first run is always False, possibly empty
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode_rle(rle: Any) -> np.ndarray:
    """The H x W bool mask of an `encode_rle` dict; DataFormatError if the dict is malformed."""
    if not isinstance(rle, dict) or set(rle) != {"size", "counts"}:
        raise DataFormatError("a mask must be an object with exactly 'size' and 'counts'")
    size, counts = rle["size"], rle["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_count(v) for v in size)):
        raise DataFormatError(f"mask 'size' must be [height, width], got {size!r}")
    if not (isinstance(counts, list) and all(_is_count(v) for v in counts)):
        raise DataFormatError("mask 'counts' must be a list of non-negative integers")
    height, width = size
    if sum(counts) != height * width:
        raise DataFormatError(f"mask counts sum to {sum(counts)}, expected {height} x {width} = {height * width}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(height, width)


def mask_box(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] in pixels with exclusive x1/y1; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


@dataclass(eq=False)
class EditRegion:
    """Where the edit of one query happens, in the reference and in the target image."""

    split: str
    reference: int
    target: int
    text: str
    edit: str                 # CSS: "add" | "remove" | "make"
    attribute: str | None     # what "make" changes ("color" | "size" | "shape"); None otherwise
    reference_box: list[int] | None
    target_box: list[int] | None
    reference_mask: np.ndarray
    target_mask: np.ndarray

    @classmethod
    def from_masks(cls, split: str, reference: int, target: int, text: str, edit: str, attribute: str | None,
                   reference_mask: np.ndarray, target_mask: np.ndarray) -> EditRegion:
        return cls(split, reference, target, text, edit, attribute, mask_box(reference_mask), mask_box(target_mask),
                   reference_mask, target_mask)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "reference": self.reference, "target": self.target, "text": self.text,
                "edit": self.edit, "attribute": self.attribute,
                "reference_box": self.reference_box, "target_box": self.target_box,
                "reference_mask": encode_rle(self.reference_mask), "target_mask": encode_rle(self.target_mask)}


def write_edit_regions(path: Path, records: Iterable[EditRegion]) -> int:
    """Write the sidecar atomically (all lines or nothing); returns the number of records."""
    lines = [json.dumps(record.to_json(), separators=(",", ":")) + "\n" for record in records]
    atomic_write_text(Path(path), "".join(lines))
    return len(lines)


def _index(record: dict[str, Any], name: str) -> int:
    value = record[name]
    if not _is_count(value):
        raise DataFormatError(f"'{name}' must be a non-negative integer image index, got {value!r}")
    return value


def _string(record: dict[str, Any], name: str, optional: bool = False) -> str | None:
    value = record[name]
    if not (isinstance(value, str) or (optional and value is None)):
        raise DataFormatError(f"'{name}' must be a string{' or null' if optional else ''}, got {value!r}")
    return value


def _mask_and_box(record: dict[str, Any], side: str) -> tuple[np.ndarray, list[int] | None]:
    try:
        mask = decode_rle(record[f"{side}_mask"])
    except DataFormatError as error:
        raise DataFormatError(f"'{side}_mask': {error}") from None
    box = record[f"{side}_box"]
    if box != mask_box(mask):
        raise DataFormatError(f"'{side}_box' {box!r} is not the bounding box {mask_box(mask)!r} of '{side}_mask'")
    return mask, box


def _parse_record(record: Any) -> EditRegion:
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise DataFormatError(f"missing field(s) {', '.join(missing)}")
    reference_mask, reference_box = _mask_and_box(record, "reference")
    target_mask, target_box = _mask_and_box(record, "target")
    if record["target_mask"] == record["reference_mask"]:
        target_mask = reference_mask  # one array for both sides halves the memory of a large sidecar
    reference_mask.flags.writeable = False  # possibly shared, so read-only
    target_mask.flags.writeable = False
    return EditRegion(_string(record, "split"), _index(record, "reference"), _index(record, "target"),
                      _string(record, "text"), _string(record, "edit"), _string(record, "attribute", optional=True),
                      reference_box, target_box, reference_mask, target_mask)


def read_edit_regions(path: Path) -> list[EditRegion]:
    """Every record of a sidecar; DataFormatError naming the file and line for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such edit-region file")
    regions = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                regions.append(_parse_record(json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError:
                raise DataFormatError(f"{path}:{number}: not UTF-8 text") from None
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            except DataFormatError as error:
                raise DataFormatError(f"{path}:{number}: {error}") from None
    return regions
