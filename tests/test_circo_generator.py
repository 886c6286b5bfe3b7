"""Synthetic CIRCO: the released layout, ground truths that are complete (re-checked here from the written scenes
with a matcher of this file's own), distractors, semantic aspects, edit regions, determinism and the CLI."""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cirlab.cli import main
from cirlab.data.circo import load_circo
from cirlab.data.circo_scenes import (
    CHANGES,
    SEMANTIC_ASPECTS,
    Clause,
    describe,
    generate_circo,
    ground_truths,
    satisfies,
)
from cirlab.data.css import SceneObject
from cirlab.data.css_vocabulary import COLOURS
from cirlab.data.evalsets import map_at_k, recall_at_k
from cirlab.data.regions import read_edit_regions
from cirlab.dataset_check import check_dataset

INFO = Path("COCO2017_unlabeled") / "annotations" / "image_info_unlabeled2017.json"
IMAGES = Path("COCO2017_unlabeled") / "unlabeled2017"
VAL_KEYS = ["reference_img_id", "target_img_id", "relative_caption", "shared_concept", "gt_img_ids", "id",
            "semantic_aspects"]                                       # CIRCO's val.json, in its order
TEST_KEYS = ["reference_img_id", "relative_caption", "shared_concept", "id"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_circo(tmp_path_factory.mktemp("circo") / "demo", preset="demo", seed=0, progress=False)


@pytest.fixture(scope="module", params=[1, 2, 3])
def crafted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("circo") / f"seed{request.param}"
    return generate_circo(out, seed=request.param, queries=12, progress=False)


def _annotations(root: Path, split: str) -> list[dict[str, Any]]:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


@cache
def _scenes(root: Path) -> dict[int, list[dict[str, Any]]]:
    return {r["id"]: r["objects"] for r in map(json.loads, (root / "scenes.jsonl").read_text().splitlines())}


def _records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "queries.jsonl").read_text().splitlines()]


def _holds(objects: list[dict[str, Any]], clause: dict[str, Any]) -> bool:
    """This file's own reading of a rule clause: between min and max objects match every attribute."""
    count = sum(all(obj[key] == value for key, value in clause["match"].items()) for obj in objects)
    return count >= clause["min"] and (clause["max"] is None or count <= clause["max"])


def _matching(root: Path, clauses: list[dict[str, Any]]) -> set[int]:
    return {i for i, objects in _scenes(root).items() if all(_holds(objects, c) for c in clauses)}


def _pixels(root: Path, image_id: int) -> np.ndarray:
    return np.asarray(Image.open(root / IMAGES / f"{image_id:012d}.png").convert("RGB"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Rules on crafted scenes
# ---------------------------------------------------------------------------------------------

def _obj(cell: int, color: str, shape: str, size: str = "small") -> SceneObject:
    return SceneObject(cell, shape, color, size, 0, 0)


def test_clauses_count_matching_objects_between_their_bounds() -> None:
    two_red = (_obj(0, "red", "circle"), _obj(4, "red", "circle", "large"), _obj(8, "blue", "triangle"))
    one_red = (_obj(0, "red", "circle"), _obj(8, "blue", "triangle"))
    no_red = (_obj(8, "blue", "triangle"),)
    exactly_two = Clause(describe(color="red", shape="circle"), 2, 2)
    no_triangle = Clause(describe(shape="triangle"), 0, 0)
    large_red_in_center = Clause(describe(color="red", size="large", cell=4), 1, None)
    assert [exactly_two.holds(s) for s in (two_red, one_red, no_red)] == [True, False, False]
    assert [no_triangle.holds(s) for s in (two_red, one_red, no_red, ())] == [False, False, False, True]
    assert [large_red_in_center.holds(s) for s in (two_red, one_red)] == [True, False]
    assert satisfies(two_red, [exactly_two, large_red_in_center]) and not satisfies(two_red, [exactly_two, no_triangle])
    assert describe(shape="circle", color="red") == (("color", "red"), ("shape", "circle"))
    with pytest.raises(ValueError, match="unknown object attribute"):
        describe(colour="red")


def test_ground_truths_test_every_scene_that_holds_the_concept() -> None:
    scenes = [(_obj(0, "red", "circle"), _obj(1, "blue", "triangle")),                # concept, no green
              (_obj(0, "red", "circle"), _obj(1, "blue", "triangle"), _obj(2, "green", "rectangle")),
              (_obj(0, "red", "circle"),),                                            # half the concept
              (_obj(5, "blue", "triangle"), _obj(6, "red", "circle", "large"))]       # concept elsewhere, no green
    rule = [Clause(describe(color="red", shape="circle"), 1, None),
            Clause(describe(color="blue", shape="triangle"), 1, None),
            Clause(describe(color="green", shape="rectangle"), 0, 0)]
    by_combo: dict[tuple[str, str], set[int]] = {}
    for position, scene in enumerate(scenes):
        for obj in scene:
            by_combo.setdefault((obj.color, obj.shape), set()).add(position)
    assert ground_truths(scenes, rule, by_combo) == [0, 3]


def test_changes_refuse_what_the_scene_does_not_allow() -> None:
    concept = [("red", "circle"), ("blue", "triangle")]
    twins = (_obj(0, "red", "circle"), _obj(1, "red", "circle"), _obj(2, "blue", "triangle", "large"))
    rng = random.Random(0)
    # "the red circle" is not definite with two of them; only the blue triangle can be resized
    for _ in range(10):
        change = CHANGES["size"](rng, twins, concept)
        assert change is None or change.phrase.endswith("blue triangle smaller")
    # nothing but the concept: no other object to remove or recolour
    assert CHANGES["remove"](rng, twins, concept) is None and CHANGES["color"](rng, twins, concept) is None
    change = CHANGES["count"](random.Random(3), (_obj(4, "red", "circle"), _obj(2, "blue", "triangle")), concept)
    number = {"two": 2, "three": 3}[change.phrase.split()[1]]
    assert sum(o.color == "red" and o.shape == "circle" for o in change.after) == number
    assert change.clauses == (Clause(describe(color="red", shape="circle"), number, number),)
    assert len(change.edits) == number - 1


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------

def test_the_layout_is_circos(demo: Path) -> None:
    info = json.loads((demo / INFO).read_text())
    ids = [image["id"] for image in info["images"]]
    assert len(ids) == len(set(ids)) == json.loads((demo / "generation.json").read_text())["counts"]["images"]
    assert all(image == {"id": i, "file_name": f"{i:012d}.png", "width": 64, "height": 64}
               for i, image in zip(ids, info["images"]))
    assert sorted(p.name for p in (demo / IMAGES).iterdir()) == sorted(f"{i:012d}.png" for i in ids)
    assert ids != sorted(ids)  # ids are not positions: a reader must map them through the info file
    for split, keys in (("val", VAL_KEYS), ("test", TEST_KEYS)):
        entries = _annotations(demo, split)
        assert [e["id"] for e in entries] == list(range(30))
        assert all(list(e) == keys for e in entries)
        assert all(e["reference_img_id"] in set(ids) for e in entries)
    for entry in _annotations(demo, "val"):
        assert entry["gt_img_ids"][0] == entry["target_img_id"] != entry["reference_img_id"]
        assert len(set(entry["gt_img_ids"])) == len(entry["gt_img_ids"])
        assert entry["semantic_aspects"] and set(entry["semantic_aspects"]) <= set(SEMANTIC_ASPECTS)


def test_every_image_shows_its_scene(demo: Path) -> None:
    """Objects sit in distinct cells and never overlap, so each image shows exactly its objects' colours."""
    palette = {rgb: name for name, rgb in COLOURS.items()}
    for image_id, objects in list(_scenes(demo).items())[:60]:
        pixels = _pixels(demo, image_id).reshape(-1, 3)
        colours = {palette[tuple(int(v) for v in rgb)] for rgb in np.unique(pixels, axis=0) if tuple(rgb) != (255,) * 3}
        assert colours == {obj["color"] for obj in objects}


def test_the_circo_reader_and_checker_accept_it(demo: Path) -> None:
    assert check_dataset(demo, "circo") == []
    assert main(["data", "check", str(demo), "--format", "circo"]) == 0
    val, test = load_circo(demo, "val"), load_circo(demo, "test")
    ids = [str(image["id"]) for image in json.loads((demo / INFO).read_text())["images"]]
    assert val.gallery == test.gallery == ids  # one gallery, in image-info order, as the edit regions index it
    entries = _annotations(demo, "val")
    assert [q.query_id for q in val.queries] == [str(e["id"]) for e in entries]
    assert all(q.ground_truths == {str(i) for i in e["gt_img_ids"]} and q.targets == {str(e["target_img_id"])}
               and q.aspects == tuple(e["semantic_aspects"]) for q, e in zip(val.queries, entries))
    assert not any(q.targets or q.ground_truths for q in test.queries)


def test_map_on_crafted_scores_counts_every_ground_truth(demo: Path) -> None:
    """Target first, the other ground truths last: AP@K = 1 / min(K, |gt|), which only a complete list gives."""
    val = load_circo(demo, "val")
    column = {image: c for c, image in enumerate(val.gallery)}
    scores = np.ones((len(val.queries), len(val.gallery)))
    for row, query in enumerate(val.queries):
        scores[row, [column[g] for g in query.ground_truths]] = 0.0
        scores[row, column[next(iter(query.targets))]] = 2.0
    sizes = np.array([len(q.ground_truths) for q in val.queries])
    metrics = map_at_k(scores, val)
    for k in (5, 10, 25, 50):
        assert metrics[f"mAP@{k}"] == pytest.approx(100.0 * np.mean(1.0 / np.minimum(k, sizes)))
    assert recall_at_k(scores, val)["R@5"] == 100.0
    oracle = np.zeros_like(scores)
    for row, query in enumerate(val.queries):
        oracle[row, [column[g] for g in query.ground_truths]] = 1.0
    assert map_at_k(oracle, val)["mAP@50"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------
# Ground truths, distractors, aspects
# ---------------------------------------------------------------------------------------------

def test_ground_truths_are_exactly_the_images_that_satisfy_the_rule(crafted: Path) -> None:
    val = {e["id"]: e for e in _annotations(crafted, "val")}
    for record in _records(crafted):
        truths = _matching(crafted, record["rule"])
        assert set(record["gt_img_ids"]) == truths and record["target_img_id"] in truths
        assert record["reference_img_id"] not in truths  # the reference shares the concept, not the change
        if record["split"] == "val":
            assert val[record["id"]]["gt_img_ids"] == record["gt_img_ids"]
            assert val[record["id"]]["target_img_id"] == record["target_img_id"]


def test_rules_say_what_the_words_say(crafted: Path) -> None:
    """The first two clauses are the shared concept and the others the caption: their values are its words."""
    entries = {(s, e["id"]): e for s in ("val", "test") for e in _annotations(crafted, s)}
    for record in _records(crafted):
        entry = entries[(record["split"], record["id"])]
        concept, change = record["rule"][:2], record["rule"][2:]
        assert all(c["min"] == 1 and c["max"] is None for c in concept)
        assert entry["shared_concept"] == "a {} with a {}".format(
            *(" ".join(c["match"][k] for k in ("size", "color", "shape") if k in c["match"]) for c in concept))
        for clause in change:
            assert clause["match"]["color"] in entry["relative_caption"]
            assert clause["match"]["shape"] in entry["relative_caption"]
        if len(record["kinds"]) > 1:
            assert " and " in entry["relative_caption"] and "statement_with_conjunction" in record["semantic_aspects"]


def test_every_query_has_distractors_that_share_the_concept(crafted: Path) -> None:
    for record in _records(crafted):
        sharing = _matching(crafted, record["rule"][:2])
        distractors = sharing - set(record["gt_img_ids"]) - {record["reference_img_id"]}
        assert len(distractors) >= 1, record


def test_some_queries_have_one_ground_truth_and_some_several(demo: Path) -> None:
    sizes = [len(e["gt_img_ids"]) for e in _annotations(demo, "val")]
    assert 1 in sizes and max(sizes) >= 3
    counts = json.loads((demo / "generation.json").read_text())["counts"]["val"]
    assert counts["ground_truths"] == sum(sizes) and counts["single_ground_truth"] == sizes.count(1)
    # other families and the background supply ground truths no query was built with: only the check finds them
    assert counts["unplanned_ground_truths"] == 5


def test_the_documented_demo_counts_are_the_generated_ones(demo: Path) -> None:
    """docs/formats.md section 8.4 lists the demo preset's counts; they must be what seed 0 writes."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    row = text[text.index("## 8. Synthetic CIRCO"):].split("| `demo` |")[1].split("\n")[0]
    counts = json.loads((demo / "generation.json").read_text())["counts"]
    val = counts["val"]
    assert [cell.strip() for cell in row.strip(" |").split("|")] == [
        f"{val['queries']} / {counts['test']['queries']}", f"{counts['images']:,}",
        f"{val['ground_truths']:,} ({val['max_ground_truths']})", f"{val['unplanned_ground_truths']:,}"]


def test_semantic_aspects_follow_the_edit_kinds(demo: Path) -> None:
    expected = {"count": {"cardinality"}, "add": {"addition"}, "remove": {"negation"}, "color": {"compare_change"},
                "shape": {"compare_change"}, "size": {"comparative_statement", "direct_addressing"},
                "move": {"spatial_relations_background", "direct_addressing"}}
    records = [r for r in _records(demo) if r["split"] == "val"]
    for record, entry in zip(records, _annotations(demo, "val")):
        wanted = set().union(*(expected[kind] for kind in record["kinds"]))
        wanted |= {"statement_with_conjunction"} if len(record["kinds"]) > 1 else set()
        assert set(entry["semantic_aspects"]) == wanted
        assert entry["semantic_aspects"] == [a for a in SEMANTIC_ASPECTS if a in wanted]  # CIRCO's order
        # negation and comparisons alone would match most scenes with the concept: only in conjunctions
        assert record["kinds"] not in (["remove"], ["size"], ["remove", "size"], ["size", "remove"])
    assert {kind for r in records for kind in r["kinds"]} == set(expected)


def test_the_test_split_has_no_targets(demo: Path) -> None:
    for entry in _annotations(demo, "test"):
        assert not {"target_img_id", "gt_img_ids", "semantic_aspects"} & set(entry)
    test_records = [r for r in _records(demo) if r["split"] == "test"]
    assert len(test_records) == 30 and all(r["target_img_id"] in r["gt_img_ids"] for r in test_records)


# ---------------------------------------------------------------------------------------------
# Edit regions
# ---------------------------------------------------------------------------------------------

def test_edit_regions_cover_every_changed_pixel(demo: Path) -> None:
    ids = [image["id"] for image in json.loads((demo / INFO).read_text())["images"]]
    regions = read_edit_regions(demo / "edit_regions.jsonl")
    records = _records(demo)
    assert len(regions) == len(records) == 60
    for region, record in zip(regions, records):
        assert (region.split, ids[region.reference], ids[region.target]) == (
            record["split"], record["reference_img_id"], record["target_img_id"])
        assert region.edit == "+".join(record["kinds"])
        changed = (_pixels(demo, ids[region.reference]) != _pixels(demo, ids[region.target])).any(axis=2)
        assert changed.any() and region.reference_mask.any()
        assert not (changed & ~region.reference_mask).any()
        assert (region.reference_mask == region.target_mask).all()
    val = _annotations(demo, "val")
    assert [r.text for r in regions[:30]] == [e["relative_caption"] for e in val]


# ---------------------------------------------------------------------------------------------
# Determinism, arguments, CLI
# ---------------------------------------------------------------------------------------------

def test_the_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    first = generate_circo(tmp_path / "a", seed=5, queries=5, progress=False)
    second = generate_circo(tmp_path / "b", seed=5, queries=5, progress=False)
    other = generate_circo(tmp_path / "c", seed=6, queries=5, progress=False)
    assert _files(first) == _files(second)
    assert _files(first)["annotations/val.json"] != _files(other)["annotations/val.json"]
    generate_circo(first, seed=5, queries=5, progress=False)  # a rerun into its own folder is allowed
    assert _files(first) == _files(second)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown CIRCO preset"):
        generate_circo(tmp_path / "a", preset="huge", progress=False)
    with pytest.raises(ValueError, match="queries must be at least 1"):
        generate_circo(tmp_path / "a", queries=0, progress=False)
    with pytest.raises(ValueError, match="image_size must be at least"):
        generate_circo(tmp_path / "a", image_size=16, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a generated CIRCO dataset"):
        generate_circo(tmp_path / "foreign", queries=1, progress=False)


def test_the_cli_writes_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "circo"
    assert main(["data", "make-circo", str(out), "--seed", "2", "--image-size", "48"]) == 0
    assert "wrote synthetic CIRCO (demo, seed 2)" in capsys.readouterr().out
    generation = json.loads((out / "generation.json").read_text())
    assert (generation["format"], generation["preset"], generation["seed"], generation["image_size"]) == (
        "circo", "demo", 2, 48)
    assert len(_annotations(out, "val")) == len(_annotations(out, "test")) == 30
    first = json.loads((out / INFO).read_text())["images"][0]
    assert Image.open(out / IMAGES / first["file_name"]).size == (48, 48)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["data", "make-circo", str(tmp_path / "notes")]) == 2
    assert "not a generated CIRCO dataset" in capsys.readouterr().err
