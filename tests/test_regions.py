"""The edit-region sidecar: RLE masks, boxes, and the JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cirlab.data.errors import DataFormatError
from cirlab.data.regions import EditRegion, decode_rle, encode_rle, mask_box, read_edit_regions, write_edit_regions


def _square_mask() -> np.ndarray:
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 2:4] = True  # rows 1-2, columns 2-3
    return mask


def test_rle_of_a_known_mask() -> None:
    # Row-major: 7 False, 2 True, 3 False, 2 True, 6 False.
    assert encode_rle(_square_mask()) == {"size": [4, 5], "counts": [7, 2, 3, 2, 6]}


def test_rle_starting_with_true_has_an_empty_first_run() -> None:
    mask = np.zeros((2, 3), dtype=bool)
    mask[0, :2] = True
    assert encode_rle(mask)["counts"] == [0, 2, 4]
    assert encode_rle(np.ones((2, 2), dtype=bool))["counts"] == [0, 4]
    assert encode_rle(np.zeros((2, 2), dtype=bool))["counts"] == [4]


def test_rle_round_trip_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 7), (64, 64), (5, 128)]:
        for density in (0.0, 0.1, 0.5, 1.0):
            mask = rng.random(shape) < density
            rle = encode_rle(mask)
            assert sum(rle["counts"]) == mask.size
            assert np.array_equal(decode_rle(rle), mask)


def test_encode_rejects_non_bool_masks() -> None:
    with pytest.raises(ValueError):
        encode_rle(np.zeros((2, 2), dtype=np.uint8))


@pytest.mark.parametrize("rle, fault", [
    ({"size": [2, 2], "counts": [1, 2]}, "sum to 3"),
    ({"size": [2, 2], "counts": [1, -1, 4]}, "non-negative"),
    ({"size": [2], "counts": [4]}, "size"),
    ({"counts": [4]}, "exactly"),
])
def test_decode_rejects_malformed_rle(rle: dict, fault: str) -> None:
    with pytest.raises(DataFormatError, match=fault):
        decode_rle(rle)


def test_mask_box_is_exclusive_xyxy() -> None:
    assert mask_box(_square_mask()) == [2, 1, 4, 3]
    assert mask_box(np.zeros((3, 3), dtype=bool)) is None


def _records() -> list[EditRegion]:
    square = _square_mask()
    corner = np.zeros((4, 5), dtype=bool)
    corner[0, 0] = True
    return [EditRegion.from_masks("test", 3, 9, "remove top-left object", "remove", None, square, square),
            EditRegion.from_masks("train", 0, 1, "make circle red", "make", "color", corner, square)]


def test_write_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "edit_regions.jsonl"
    assert write_edit_regions(path, _records()) == 2
    first = json.loads(path.read_text().splitlines()[0])
    assert list(first) == ["split", "reference", "target", "text", "edit", "attribute", "reference_box",
                           "target_box", "reference_mask", "target_mask"]
    assert first["reference_box"] == [2, 1, 4, 3]
    assert first["reference_mask"] == {"size": [4, 5], "counts": [7, 2, 3, 2, 6]}
    read = read_edit_regions(path)
    for got, want in zip(read, _records(), strict=True):
        assert (got.split, got.reference, got.target, got.text, got.edit, got.attribute) == \
            (want.split, want.reference, want.target, want.text, want.edit, want.attribute)
        assert got.reference_box == want.reference_box and got.target_box == want.target_box
        assert np.array_equal(got.reference_mask, want.reference_mask)
        assert np.array_equal(got.target_mask, want.target_mask)
    assert read[1].target_box == [2, 1, 4, 3] and read[1].reference_box == [0, 0, 1, 1]
    assert not read[0].reference_mask.flags.writeable  # shared between both sides, so read-only


def _write_line(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "regions.jsonl"
    good = json.dumps(_records()[0].to_json())
    path.write_text(good + "\n" + line + "\n")
    return path


@pytest.mark.parametrize("mutate, fault", [
    (lambda r: r.pop("target_mask"), "missing field"),
    (lambda r: r.update(reference=-1), "'reference' must be a non-negative integer"),
    (lambda r: r.update(text=5), "'text' must be a string"),
    (lambda r: r.update(reference_box=[0, 0, 5, 4]), "not the bounding box"),
    (lambda r: r["target_mask"].update(counts=[1, 2]), "'target_mask': mask counts sum to 3"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, mutate, fault: str) -> None:
    record = _records()[0].to_json()
    mutate(record)
    path = _write_line(tmp_path, json.dumps(record))
    with pytest.raises(DataFormatError, match=fault) as info:
        read_edit_regions(path)
    assert str(info.value).startswith(f"{path}:2: ")


def test_invalid_json_and_missing_file(tmp_path: Path) -> None:
    path = _write_line(tmp_path, "{not json")
    with pytest.raises(DataFormatError, match=f"{path}:2: not valid JSON"):
        read_edit_regions(path)
    with pytest.raises(DataFormatError, match="no such edit-region file"):
        read_edit_regions(tmp_path / "absent.jsonl")


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "edit_regions.jsonl"
    write_edit_regions(path, _records())
    before = path.read_bytes()

    def exploding():
        yield _records()[0]
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError):
        write_edit_regions(path, exploding())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["edit_regions.jsonl"]
