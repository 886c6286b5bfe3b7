"""Synthetic CIRR: the rc2 layout the reader and checker accept, sets of six one-edit neighbours, soft
targets, the official metrics on crafted scores, edit regions, determinism and the CLI."""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.cli import build_parser, main
from cirlab.data import cirr
from cirlab.data.cirr_scenes import SPLITS, SetQuery, caption, generate_cirr, soft_label
from cirlab.data.css import SceneObject, add_edit, make_edit, remove_edit
from cirlab.data.evalsets import recall_at_k, recall_subset_at_k
from cirlab.data.regions import read_edit_regions
from cirlab.dataset_check import check_dataset

FOLDERS = {"train": "train", "val": "dev", "test1": "test1"}  # the files say val, the images folder dev


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cirr(tmp_path_factory.mktemp("cirr") / "demo", preset="demo", seed=0, progress=False)


def _entries(root: Path, split: str) -> list[dict]:
    return json.loads((root / "cirr" / "captions" / f"cap.rc2.{split}.json").read_text())


@cache
def _split_file(root: Path, split: str) -> dict[str, str]:
    return json.loads((root / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())


def _pixels(root: Path, split: str, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / _split_file(root, split)[name]))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Layout, reader, checker
# ---------------------------------------------------------------------------------------------

def test_the_checker_and_the_reader_accept_the_layout(demo: Path) -> None:
    assert SPLITS == cirr.SPLITS
    assert check_dataset(demo, "cirr") == []
    train, val = cirr.load_cirr(demo, "val")
    _, test1 = cirr.load_cirr(demo, "test1")
    counts = json.loads((demo / "generation.json").read_text())["counts"]
    assert (len(train.triplets), len(val.queries), len(test1.queries)) == (320, 200, 200)  # 8 queries per set
    assert all(path.is_file() for path in train.image_paths.values())
    assert (len(val.gallery), len(test1.gallery)) == (150, 150)                   # 6 images per set
    assert [counts[s]["queries"] for s in SPLITS] == [320, 200, 200]
    assert all(q.targets for q in val.queries) and not any(q.targets for q in test1.queries)
    assert all(len(q.subset) == 5 for q in val.queries + test1.queries)
    # pair ids run on across the splits: train 0..319, val 320..519, test1 520..719
    assert [q.query_id for q in val.queries] == [str(i) for i in range(320, 520)]
    paths = {split: _split_file(demo, split) for split in SPLITS}
    assert all(p == f"./dev/{n}.png" for n, p in paths["val"].items())
    assert all(p == f"./test1/{n}.png" for n, p in paths["test1"].items())
    assert all(p.startswith("./train/") and p.endswith(f"/{n}.png") and 0 <= int(p.split("/")[2]) < 100
               for n, p in paths["train"].items())
    assert val.image_paths[val.gallery[0]] == demo / "dev" / f"{val.gallery[0]}.png"


def test_every_query_stays_in_its_set_of_six(demo: Path) -> None:
    for split in SPLITS:
        by_set: dict[int, list[dict]] = {}
        for entry in _entries(demo, split):
            by_set.setdefault(entry["img_set"]["id"], []).append(entry)
        assert len(by_set) == {"train": 40, "val": 25, "test1": 25}[split]
        for set_id, entries in by_set.items():
            members = entries[0]["img_set"]["members"]
            assert len(entries) == 8 and len(set(members)) == 6
            assert all(m.startswith(f"{FOLDERS[split]}-{set_id}-") for m in members)
            for entry in entries:
                assert entry["img_set"]["members"] == members
                assert entry["img_set"]["reference_rank"] == members.index(entry["reference"])
                if split == "test1":  # labels withheld, as in the real kit
                    assert set(entry) == {"pairid", "reference", "caption", "img_set"}
                    assert set(entry["img_set"]) == {"id", "members", "reference_rank"}
                else:
                    assert entry["target_hard"] in members and entry["target_hard"] != entry["reference"]
                    assert entry["img_set"]["target_rank"] == members.index(entry["target_hard"])
            # five queries leave the base scene: it is the one reference used five times
            references = [e["reference"] for e in entries]
            assert max(references.count(r) for r in references) == 5


# ---------------------------------------------------------------------------------------------
# Metrics on crafted scores
# ---------------------------------------------------------------------------------------------

def test_recall_subset_on_crafted_scores(demo: Path) -> None:
    _, val = cirr.load_cirr(demo, "val")
    column = {name: c for c, name in enumerate(val.gallery)}
    oracle = np.zeros((len(val.queries), len(val.gallery)))
    decoyed = oracle.copy()
    for row, query in enumerate(val.queries):
        (target,) = query.targets
        oracle[row, column[target]] = decoyed[row, column[target]] = 1.0
        if int(query.query_id) % 2 == 0:  # even pair ids: another member of the set scores higher
            decoy = next(m for m in query.subset if m != target)
            decoyed[row, column[decoy]] = 2.0
    assert recall_subset_at_k(oracle, val) == {"Rsubset@1": 100.0, "Rsubset@2": 100.0, "Rsubset@3": 100.0}
    assert recall_at_k(oracle, val) == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0}
    # pair ids 320..519: half are even, and each of those ranks its target second
    assert recall_subset_at_k(decoyed, val) == {"Rsubset@1": 50.0, "Rsubset@2": 100.0, "Rsubset@3": 100.0}
    assert recall_at_k(decoyed, val)["R@1"] == 50.0


def test_image_only_cannot_tell_the_set_apart(demo: Path) -> None:
    """Pixel cosine to the reference: within a set every member is one or two edits away, so looks alone
    find the target far less often than the oracle (measured 38% at Rsubset@1 on demo; chance is 20%)."""
    _, val = cirr.load_cirr(demo, "val")
    feats = np.stack([np.asarray(Image.open(val.image_paths[g]), dtype=np.float64).ravel() for g in val.gallery])
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    column = {name: c for c, name in enumerate(val.gallery)}
    scores = feats[[column[q.reference] for q in val.queries]] @ feats.T
    assert 20.0 < recall_subset_at_k(scores, val)["Rsubset@1"] < 50.0


# ---------------------------------------------------------------------------------------------
# Soft targets
# ---------------------------------------------------------------------------------------------

RED_CIRCLE = SceneObject(0, "circle", "red", "small", 0, 0)
BLUE_SQUARE = SceneObject(4, "rectangle", "blue", "large", 1, -1)


def test_soft_label_by_hand() -> None:
    base = (RED_CIRCLE, BLUE_SQUARE)
    recolour = make_edit(base, RED_CIRCLE, ("color",), "color", "green")
    assert recolour.target == (RED_CIRCLE._replace(color="green"), BLUE_SQUARE)
    members = {
        "the target": recolour.target,
        "the circle yellow": (RED_CIRCLE._replace(color="yellow"), BLUE_SQUARE),
        "the circle removed": (BLUE_SQUARE,),
        "the circle large": (RED_CIRCLE._replace(size="large"), BLUE_SQUARE),
        "the square red": (RED_CIRCLE, BLUE_SQUARE._replace(color="red")),
        "something added at cell 8": (RED_CIRCLE, BLUE_SQUARE, SceneObject(8, "triangle", "gray", "small", 0, 0)),
    }
    exact, vague = SetQuery(0, 1, recolour, False), SetQuery(0, 1, recolour, True)
    assert {k: soft_label(base, exact, m) for k, m in members.items()} == {
        "the target": 1.0, "the circle yellow": 0.5, "the circle removed": -1.0, "the circle large": -1.0,
        "the square red": None, "something added at cell 8": None}
    assert soft_label(base, vague, members["the circle yellow"]) == 1.0  # "change the colour of the circle"
    add = SetQuery(0, 1, add_edit(base, SceneObject(8, "triangle", "gray", "small", 0, 0)), False)
    assert soft_label(base, add, members["something added at cell 8"]) == 1.0
    assert soft_label(base, add, (*base, SceneObject(8, "triangle", "gray", "large", 0, 0))) == 0.5
    assert soft_label(base, add, (*base, SceneObject(7, "triangle", "gray", "small", 0, 0))) is None


def test_soft_targets_in_the_files(demo: Path) -> None:
    counts = json.loads((demo / "generation.json").read_text())["counts"]
    omissions = 0
    for split in ("train", "val"):
        entries = _entries(demo, split)
        omitted = [e for e in entries if e["target_hard"] not in e["target_soft"]]
        assert len(omitted) == counts[split]["target_missing_from_soft"]
        omissions += len(omitted)
        assert all(e["target_soft"] for e in omitted)  # only entries with other labels lose the target
        values = [v for e in entries for v in e["target_soft"].values()]
        assert {v: values.count(v) for v in (1.0, 0.5, -1.0)} == {
            v: counts[split][f"soft_{v}"] for v in (1.0, 0.5, -1.0)}
        assert set(values) == {1.0, 0.5, -1.0} and all(values.count(v) > 0 for v in (1.0, 0.5, -1.0))
        for entry in entries:
            assert set(entry["target_soft"]) <= set(entry["img_set"]["members"]) - {entry["reference"]}
    assert omissions > 0  # about 1%, as on CIRR
    # the reader keeps target_hard as the one hit, also where target_soft leaves it out
    _, val = cirr.load_cirr(demo, "val")
    for entry, query in zip(_entries(demo, "val"), val.queries):
        assert query.targets == frozenset({entry["target_hard"]})


def test_soft_labelled_members_change_the_edited_cell_only(demo: Path) -> None:
    """Every labelled member differs from the reference inside the grid cell the caption is about."""
    regions = iter(read_edit_regions(demo / "edit_regions.jsonl")[320:])  # val follows train's 320
    cell = 64 / 3
    for entry in _entries(demo, "val"):
        x0, y0, x1, y1 = next(regions).reference_box
        row, col = int((y0 + y1) / 2 / cell), int((x0 + x1) / 2 / cell)
        reference = _pixels(demo, "val", entry["reference"])
        for member in entry["target_soft"]:
            changed = np.argwhere((_pixels(demo, "val", member) != reference).any(axis=2))
            assert changed.size and {(int(r // cell), int(c // cell)) for r, c in changed} == {(row, col)}


# ---------------------------------------------------------------------------------------------
# Captions and edit regions
# ---------------------------------------------------------------------------------------------

def test_captions_say_the_edit_in_several_ways() -> None:
    base = (RED_CIRCLE, SceneObject(4, "triangle", "red", "small", 0, 0))
    recolour = make_edit(base, RED_CIRCLE, ("shape",), "color", "blue")
    texts = {caption(random.Random(i), recolour) for i in range(200)}
    assert len({t.lower().rstrip(".") for t in texts}) >= 5
    assert all("circle" in t and "blue" in t for t in texts)
    vague = {caption(random.Random(i), recolour, vague=True) for i in range(50)}
    assert all("blue" not in t and "colo" in t for t in vague)
    added = {caption(random.Random(i), add_edit(base, SceneObject(8, "rectangle", "gray", "large", 0, 0)))
             for i in range(100)}
    assert all("large gray rectangle" in t and ("bottom right" in t or "bottom-right" in t) for t in added)
    removed = {caption(random.Random(i), remove_edit(base, RED_CIRCLE, ("cell",))) for i in range(100)}
    assert all("top left" in t or "top-left" in t for t in removed)
    assert "Remove the object in the top left corner." in removed


def test_edit_regions_cover_exactly_what_changes(demo: Path) -> None:
    regions = read_edit_regions(demo / "edit_regions.jsonl")
    entries = {split: _entries(demo, split) for split in ("train", "val")}
    assert len(regions) == 320 + 200  # test1 targets are withheld, and so are its regions
    names = {split: list(_split_file(demo, split)) for split in ("train", "val")}
    kinds = set()
    for region, (split, entry) in zip(regions, [(s, e) for s in ("train", "val") for e in entries[s]]):
        assert region.split == split and region.text == entry["caption"]
        assert names[split][region.reference] == entry["reference"]
        assert names[split][region.target] == entry["target_hard"]
        changed = (_pixels(demo, split, entry["reference"]) != _pixels(demo, split, entry["target_hard"])).any(axis=2)
        assert changed.any() and region.reference_mask.any()
        assert not (changed & ~region.reference_mask).any()  # nothing changes outside the region
        if region.edit != "make" or region.attribute == "color":  # the whole region repaints
            assert np.array_equal(changed, region.reference_mask)
        kinds.add((region.edit, region.attribute))
    assert kinds == {("add", None), ("remove", None), ("make", "color"), ("make", "size"), ("make", "shape")}


# ---------------------------------------------------------------------------------------------
# Determinism, bad arguments, CLI
# ---------------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = _files(generate_cirr(tmp_path / "a", seed=3, progress=False, sets=2))
    second = _files(generate_cirr(tmp_path / "b", seed=3, progress=False, sets=2))
    other = _files(generate_cirr(tmp_path / "c", seed=4, progress=False, sets=2))
    assert len(first) == 3 * 2 * 6 + 6 + 2  # images, captions + split files, regions + generation.json
    assert first == second
    assert first["cirr/captions/cap.rc2.val.json"] != other["cirr/captions/cap.rc2.val.json"]


def test_refuses_a_non_empty_folder_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        generate_cirr(tmp_path, progress=False, sets=1)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="preset"):
        generate_cirr(tmp_path / "x", preset="huge")
    with pytest.raises(ValueError, match="image_size"):
        generate_cirr(tmp_path / "x", image_size=16)
    with pytest.raises(ValueError, match="sets"):
        generate_cirr(tmp_path / "x", sets=0)
    assert not (tmp_path / "x").exists()


def test_cli_make_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["data", "make-cirr", "--help"])
    assert exit_info.value.code == 0 and "usage: cirlab data make-cirr" in capsys.readouterr().out
    out = tmp_path / "cirr-demo"
    assert main(["data", "make-cirr", str(out), "--seed", "1", "--image-size", "48"]) == 0
    assert f"wrote synthetic CIRR (demo, seed 1) to {out}" in capsys.readouterr().out
    assert Image.open(out / "dev" / f"{next(iter(_split_file(out, 'val')))}.png").size == (48, 48)
    assert main(["data", "check", str(out), "--format", "cirr"]) == 0
    assert f"{out}: 0 problem(s) found (cirr format)" in capsys.readouterr().out
    assert main(["data", "make-cirr", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_cli_writes_the_test_server_files_of_a_trained_checkpoint(demo: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`cirlab eval --submission` ranks test1 by the checkpoint's own scores: its top 3 within each set equal a
    brute-force ranking of the model's scores, the reference left out."""
    import torch

    from cirlab.checkpoint import load_checkpoint
    from cirlab.image_batches import PixelImages

    run = tmp_path / "run"
    assert main(["train", "--set", "data.format=cirr", "--set", f"data.root={demo}", "--set", "train.sampler=shuffled",
                 "--set", "model.image_backbone=resnet18", "--set", "model.image_weights=null",
                 "--set", "model.backbone_upto=layer1", "--set", "train.iterations=1", "--set", "train.batch_size=4",
                 "--out", str(run)]) == 0
    assert main(["eval", str(run / "best"), "--submission", str(tmp_path / "server")]) == 0
    assert "recall_subset_submission_run.json" in capsys.readouterr().out
    subset = json.loads((tmp_path / "server" / "recall_subset_submission_run.json").read_text())
    recall = json.loads((tmp_path / "server" / "recall_submission_run.json").read_text())
    assert (subset["version"], subset["metric"], recall["metric"]) == ("rc2", "recall_subset", "recall")

    _, test1 = cirr.load_cirr(demo, "test1")
    model = load_checkpoint(run / "best").model.eval()
    query = test1.queries[7]
    names = [query.reference, *query.subset]
    with torch.no_grad():
        pixels = PixelImages([test1.image_paths[n] for n in names], progress=False)
        state = model.encode_queries(pixels.batch([0]), [query.text])
        scores = model.score(state, model.encode_targets(pixels.batch(range(1, len(names)))))[0]
    expected = [query.subset[i] for i in torch.argsort(scores, descending=True, stable=True)[:3].tolist()]
    assert subset[query.query_id] == expected
    assert len(recall[query.query_id]) == 50 and query.reference not in recall[query.query_id]
    assert set(subset) - {"version", "metric"} == {q.query_id for q in test1.queries}
