"""Synthetic garments: both real layouts, the readers on generated data, captions, edit regions, masks."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.cli import main
from cirlab.data.fashion200k import load_fashion200k, parent_captions
from cirlab.data.fashioniq import CATEGORIES, join_captions, load_fashioniq
from cirlab.data.garment_captions import NOUNS, PRODUCT_WORDS, product_caption, relative_captions
from cirlab.data.garment_render import (
    ATTRIBUTES,
    COLORS,
    STUDIO,
    Garment,
    Parts,
    attribute_values,
    edit_region,
    render,
)
from cirlab.data.garments import generate_garments
from cirlab.data.regions import read_edit_regions
from cirlab.dataset_check import check_dataset

SIZE = 48
FAMILIES = 2  # per category and split: 10 images and 6 triplets each
# Words a caption must contain to name an attribute (written independently of the generator's tables).
KEYWORDS = {
    "color": ("black", "white", "grey", "gray", "red", "pink", "orange", "yellow", "green", "blue", "navy", "purple",
              "violet", "brown", "beige", "tan", "cream", "teal", "turquoise", "maroon", "burgundy", "olive", "dark",
              "light", "bright"),
    "pattern": ("solid", "plain", "stripe", "dot", "spot", "check", "plaid", "floral", "flower"),
    "sleeves": ("sleeve",),
    "hem": ("long", "short", "length", "hem", "mini", "maxi", "midi", "crop", "knee"),
    "neckline": ("neck", "collar"),
    "print": ("graphic", "logo", "star", "heart", "moon", "writing", "text", "letter", "print", "front"),
}


def _normalised(caption: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", caption.lower()))


def _names(caption: str, attribute: str) -> bool:
    return any(word in caption.lower() for word in KEYWORDS[attribute])


def _random_garment(rng: random.Random, category: str) -> Garment:
    return Garment(category, **{name: rng.choice(values) for name, values in attribute_values(category).items()})


def _changed(rng: random.Random, garment: Garment, attributes: list[str]) -> Garment:
    values = attribute_values(garment.category)
    return replace(garment, **{a: rng.choice([v for v in values[a] if v != getattr(garment, a)]) for a in attributes})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def garments(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_garments(tmp_path_factory.mktemp("garments") / "both", seed=0, image_size=SIZE,
                             families=FAMILIES, progress=False)


# ---------------------------------------------------------------------------------------------
# The generated dataset, read by the real readers
# ---------------------------------------------------------------------------------------------

def test_generated_data_passes_both_checkers(garments: Path) -> None:
    assert check_dataset(garments, "fashioniq") == []
    assert check_dataset(garments, "fashion200k") == []
    counts = json.loads((garments / "generation.json").read_text())["counts"]
    assert counts == {c: {s: {"families": 2, "images": 10, "triplets": 6} for s in ("train", "val", "test")}
                      for c in CATEGORIES}


def test_fashioniq_reader_finds_every_target_in_the_gallery(garments: Path) -> None:
    triplets = _jsonl(garments / "triplets.jsonl")
    for category in CATEGORIES:
        train, val = load_fashioniq(garments, category, "val")
        assert len(train.triplets) == 6 and len(val.queries) == 6 and len(val.gallery) == 10
        assert all(path.is_file() for path in train.image_paths.values())
        assert val.protocol["image_ext"] == ".jpg"
        expected = [t for t in triplets if (t["category"], t["split"]) == (category, "val")]
        for query, record in zip(val.queries, expected):
            assert query.targets == {record["target"]} and query.targets <= set(val.gallery)
            assert query.reference == record["candidate"]
            assert query.text == join_captions(record["captions"])[0]
            assert Image.open(val.image_paths[query.reference]).size == (SIZE, SIZE)
        _, test = load_fashioniq(garments, category, "test")  # targets withheld, as in the real kit
        assert len(test.queries) == 6 and all(not q.targets for q in test.queries)
        assert {t["target"] for t in triplets if (t["category"], t["split"]) == (category, "test")} <= set(test.gallery)


def test_validation_and_test_garments_are_unseen_in_training(garments: Path) -> None:
    records = _jsonl(garments / "garments.jsonl")
    assert len(records) == 3 * 3 * 10
    for category in CATEGORIES:
        seen = {split: {json.dumps(r["attributes"], sort_keys=True) for r in records
                        if (r["category"], r["split"]) == (category, split)} for split in ("train", "val", "test")}
        assert [len(s) for s in seen.values()] == [10, 10, 10]  # every garment is unique ...
        assert not seen["train"] & (seen["val"] | seen["test"]) and not seen["val"] & seen["test"]  # ... across splits
    assert len({r["id"] for r in records}) == len(records)


def test_fashion200k_reader_builds_one_word_queries(garments: Path) -> None:
    train, evalset = load_fashion200k(garments)
    labels = {line.split("\t")[0]: line.split("\t")[2] for path in (garments / "labels").glob("*_test_*")
              for line in path.read_text().splitlines()}
    assert len(evalset.gallery) == 30 and set(evalset.gallery) == set(labels)
    listed = (garments / "test_queries.txt").read_text().splitlines()
    assert len(evalset.queries) == len(listed) == json.loads((garments / "generation.json").read_text())[
        "fashion200k_test_queries"] > 0
    for query, line in zip(evalset.queries, listed):
        source, target = line.split()
        old, new = labels[source].split(), labels[target].split()
        (position,) = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        assert query.text == f"replace {old[position]} with {new[position]}"
        assert query.targets == {target}  # product captions are unique, so one image has the target caption
    assert train.triplets and all(re.fullmatch(r"replace \S+ with \S+", t.text) for t in train.triplets)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def test_recorded_captions_differ_and_name_changed_attributes(garments: Path) -> None:
    attributes = {r["id"]: r["attributes"] for r in _jsonl(garments / "garments.jsonl")}
    triplets = _jsonl(garments / "triplets.jsonl")
    assert len(triplets) == 3 * 3 * 6
    for record in triplets:
        before, after = attributes[record["candidate"]], attributes[record["target"]]
        assert record["changes"] == {a: [before[a], after[a]] for a in ATTRIBUTES if before[a] != after[a]}
        assert 1 <= len(record["changes"]) <= 3
        first, second = record["captions"]
        assert _normalised(first) != _normalised(second)
        for caption, named in zip(record["captions"], record["mentioned"]):
            assert named and set(named) <= set(record["changes"])
            assert all(_names(caption, attribute) for attribute in named), (caption, named)
    written = json.loads((garments / "captions" / "cap.shirt.train.json").read_text())
    expected = [t for t in triplets if (t["category"], t["split"]) == ("shirt", "train")]
    assert written == [{"target": t["target"], "candidate": t["candidate"], "captions": t["captions"]}
                       for t in expected]


def test_relative_captions_vary_like_real_annotations() -> None:
    rng = random.Random(7)
    partial = comparative = replacing = 0
    texts = set()
    for index in range(600):
        reference = _random_garment(rng, CATEGORIES[index % 3])
        target = _changed(rng, reference, rng.sample(ATTRIBUTES, 1 + index % 3))
        captions, mentioned = relative_captions(rng, reference, target)
        changed = reference.changed(target)
        assert _normalised(captions[0]) != _normalised(captions[1])
        for caption, named in zip(captions, mentioned):
            assert named and set(named) <= set(changed) and all(_names(caption, a) for a in named)
            partial += len(named) < len(changed)
            comparative += bool(re.search(r"\b(darker|lighter|brighter|longer|shorter)\b", caption))
            replacing += "instead of" in caption
            texts.add(_normalised(caption))
    assert 0.1 < partial / 1200 < 0.4  # some annotators name only part of the change
    assert comparative > 100 and replacing > 100
    assert len(texts) > 700  # templates and synonyms rarely repeat a caption word for word
    with pytest.raises(ValueError, match="identical"):
        relative_captions(rng, reference, reference)


def test_product_words_survive_tirgs_substring_removal() -> None:
    words = list(COLORS) + list(NOUNS.values()) + [w for table in PRODUCT_WORDS.values() for w in table.values() if w]
    assert len(words) == len(set(words))
    assert not [(a, b) for a in words for b in words if a != b and a in b]
    garment = Garment("dress", "navy", "stripes", "long", "midi", "v-neck", "star")
    caption = product_caption(garment)
    assert caption == "navy striped star-print v-neck long-sleeve midi dress"
    assert product_caption(replace(garment, print="none")) == "navy striped v-neck long-sleeve midi dress"
    assert parent_captions(caption)[1] == "navy star-print v-neck long-sleeve midi dress"


# ---------------------------------------------------------------------------------------------
# Edit regions and garment masks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_edit_regions_cover_the_changed_pixels_of_a_clutter_free_photo(attribute: str) -> None:
    rng = random.Random(ATTRIBUTES.index(attribute))
    changed_total = region_total = 0
    for index in range(12):
        reference = _random_garment(rng, CATEGORIES[index % 3])
        target = _changed(rng, reference, [attribute])
        before, after = (np.asarray(render(g, STUDIO, 64).image, dtype=np.int16) for g in (reference, target))
        changed = np.any(before != after, axis=2)
        region = edit_region(reference, target, STUDIO, 64)
        assert changed.any() and region.any()
        assert (changed & region).sum() >= 0.9 * changed.sum(), (reference, target)
        changed_total, region_total = changed_total + changed.sum(), region_total + region.sum()
        if attribute in ("sleeves", "neckline", "print"):  # a part, not the whole garment
            garment = (Parts(reference, STUDIO, 64).garment > 0) | (Parts(target, STUDIO, 64).garment > 0)
            assert region.sum() < 0.5 * garment.sum()
    assert changed_total >= 0.5 * region_total  # the region is mostly pixels that do change


def test_sidecar_regions_match_the_triplets(garments: Path) -> None:
    regions = read_edit_regions(garments / "edit_regions.jsonl")
    triplets = _jsonl(garments / "triplets.jsonl")
    assert len(regions) == len(triplets)
    for region, record in zip(regions, triplets):
        names = json.loads((garments / "image_splits" / f"split.{region.split}.json").read_text())
        assert region.split == f"{record['category']}.{record['split']}"
        assert (names[region.reference], names[region.target]) == (record["candidate"], record["target"])
        assert region.text == join_captions(record["captions"])[0]
        assert (region.edit, region.attribute) == ("change", "+".join(record["changes"]))
        assert region.reference_mask.shape == (SIZE, SIZE) and region.reference_mask.any()
        assert region.target_mask.any()
        if "color" in record["changes"]:  # a colour change is the whole visible garment
            visible = np.asarray(Image.open(garments / "masks" / f"{record['candidate']}.png")) > 0
            assert (visible & ~region.reference_mask).sum() == 0


def test_garment_masks_are_soft_and_cover_the_garment(garments: Path) -> None:
    shares = []
    for record in _jsonl(garments / "garments.jsonl"):
        with Image.open(garments / "masks" / f"{record['id']}.png") as image:
            assert (image.mode, image.size) == ("L", (SIZE, SIZE))
            mask = np.asarray(image)
        shares.append((mask > 0).mean())
        assert ((mask > 0) & (mask < 255)).any()  # anti-aliased edges
        assert mask[0, 0] == mask[0, -1] == 0
        if record["occluders"] == 0:
            assert record["visible"] == 1.0
    assert min(shares) > 0.05 and max(shares) < 0.8 and np.mean(shares) > 0.2  # the garment dominates the photo


# ---------------------------------------------------------------------------------------------
# Determinism, layouts, refusals, CLI
# ---------------------------------------------------------------------------------------------

def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = _files(generate_garments(tmp_path / "a", seed=3, image_size=32, families=1, progress=False))
    second = _files(generate_garments(tmp_path / "b", seed=3, image_size=32, families=1, progress=False))
    other = _files(generate_garments(tmp_path / "c", seed=4, image_size=32, families=1, progress=False))
    assert first == second
    assert first.keys() == other.keys() and first["captions/cap.dress.train.json"] != other[
        "captions/cap.dress.train.json"]
    generate_garments(tmp_path / "c", seed=3, image_size=32, families=1, progress=False)  # in place: replaces all
    assert _files(tmp_path / "c") == first


def test_each_layout_writes_only_its_files(tmp_path: Path) -> None:
    out = generate_garments(tmp_path / "out", image_size=32, families=1, layout="fashion200k", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "edit_regions.jsonl", "garments.jsonl", "generation.json", "labels", "masks", "test_queries.txt",
        "triplets.jsonl", "women"]
    assert check_dataset(out, "fashion200k") == []
    assert {r["split"] for r in _jsonl(out / "garments.jsonl")} == {"train", "test"}  # Fashion200k has no val
    generate_garments(out, image_size=32, families=1, layout="fashioniq", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "captions", "edit_regions.jsonl", "garments.jsonl", "generation.json", "image_splits", "images", "masks",
        "triplets.jsonl"]
    assert check_dataset(out, "fashioniq") == [] and check_dataset(out, "fashion200k") != []


def test_generator_refuses_a_foreign_folder_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        generate_garments(tmp_path, image_size=32, families=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    for arguments, fault in (({"preset": "huge"}, "preset"), ({"layout": "cirr"}, "layout"),
                             ({"image_size": 16}, "image_size"), ({"families": 0}, "families")):
        with pytest.raises(ValueError, match=fault):
            generate_garments(tmp_path / "x", progress=False, **arguments)


def test_cli_make_garments_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["data", "make-garments", str(out), "--seed", "1", "--image-size", "32", "--families", "1"]) == 0
    assert "wrote synthetic garments (demo, seed 1, fashioniq + fashion200k layouts)" in capsys.readouterr().out
    assert main(["data", "check", str(out), "--format", "fashioniq"]) == 0
    assert main(["data", "check", str(out), "--format", "fashion200k"]) == 0
    assert capsys.readouterr().out.count(": 0 problem(s) found") == 2
    counts = json.loads((out / "generation.json").read_text())["counts"]
    assert counts["dress"]["train"] == {"families": 1, "images": 5, "triplets": 3}
    assert main(["data", "make-garments", str(tmp_path / "x"), "--image-size", "8"]) == 2
    assert "image_size must be at least 32" in capsys.readouterr().err
