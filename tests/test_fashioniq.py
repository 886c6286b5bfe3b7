import json
from collections import Counter

import numpy as np
import pytest
import torch
from fixtures.materialise import materialise

from cirlab.config import ConfigError, load_config
from cirlab.data.benchmarks import load_benchmark
from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import average_variant_scores, recall_at_k
from cirlab.data.fashioniq import (
    check_fashioniq,
    clip4cir_training_texts,
    combine_categories,
    join_captions,
    load_fashioniq,
)
from cirlab.data.records import carve_validation

# Rows: the 3 val triplets (V1->V2, V3->V4, V5->V2); columns: V1..V6.
SCORES = np.array([
    [0.9, 0.8, 0.1, 0.1, 0.1, 0.1],    # reference first, target second
    [0.5, 0.6, 0.95, 0.7, 0.2, 0.1],   # reference first, target second
    [0.3, 0.2, 0.9, 0.8, 0.99, 0.1],   # reference first, target fifth
])


@pytest.fixture
def root(tmp_path):
    return materialise("fashioniq", tmp_path)


CAPTIONS = [[" is solid black with no sleeves", "is black with straps."],
            ["yello and more Flowing", " Has a longer hem? "],
            ["is red, ", "is off-shoulder"]]


@pytest.mark.parametrize("strategy, expected", [
    ("clip4cir", [("Is solid black with no sleeves and is black with straps",),
                  ("Yello and more flowing and Has a longer hem",),
                  ("Is red and is off-shoulder",)]),
    ("starter_kit", [("is solid black with no sleeves <and> is black with straps .",),
                     ("yello and more flowing <and> has a longer hem ?",),
                     ("is red , <and> is off-shoulder",)]),
    ("offset", [("is solid black with no sleeves and is black with straps",),
                ("yello and more flowing and has a longer hem",),
                ("is red and is off shoulder",)]),
    ("cmap", [("is solid black with no sleeves <and> is black with straps .",
               "is black with straps . <and> is solid black with no sleeves"),
              ("yello and more flowing <and> has a longer hem ?", "has a longer hem ? <and> yello and more flowing"),
              ("is red , <and> is off-shoulder", "is off-shoulder <and> is red ,")]),
    ("symmetric", [("is solid black with no sleeves and is black with straps",
                    "is black with straps and is solid black with no sleeves"),
                   ("yello and more Flowing and Has a longer hem", "Has a longer hem and yello and more Flowing"),
                   ("is red and is off-shoulder", "is off-shoulder and is red")]),
])
def test_caption_joins(strategy, expected):
    assert [join_captions(c, strategy) for c in CAPTIONS] == expected


def test_offset_join_applies_corrections():
    assert join_captions(CAPTIONS[1], "offset", {"yello": "yellow"}) == (
        "yellow and more flowing and has a longer hem",)


def test_default_protocol_keeps_the_reference(root):
    train, evalset = load_fashioniq(root, "dress")
    assert evalset.gallery == ["V1", "V2", "V3", "V4", "V5", "V6"]
    assert [q.text for q in evalset.queries][0] == "Is solid black with no sleeves and is black with straps"
    assert all(not q.excluded for q in evalset.queries)
    assert evalset.ks == (10, 50)
    assert evalset.image_paths["V3"] == root / "images" / "V3.jpg"
    assert "reference = kept" in evalset.describe()
    assert recall_at_k(torch.tensor(SCORES), evalset, ks=(1, 2, 5)) == pytest.approx(
        {"R@1": 0.0, "R@2": 200 / 3, "R@5": 100.0})
    second = train.triplets[1]
    assert second.text == "Is shorter and is red" and (second.reference, second.target) == ("A2", "A3")


def test_reference_removed_as_artemis(root):
    _, evalset = load_fashioniq(root, "dress", reference="removed")
    assert evalset.queries[2].excluded == frozenset({"V5"})
    assert recall_at_k(SCORES, evalset, ks=(1, 3, 4)) == pytest.approx({"R@1": 200 / 3, "R@3": 200 / 3, "R@4": 100.0})


def test_query_image_gallery(root):
    _, evalset = load_fashioniq(root, "dress", gallery="queries")
    assert evalset.gallery == ["V1", "V2", "V3", "V4", "V5"]
    assert recall_at_k(SCORES[:, :5], evalset, ks=(2,)) == pytest.approx({"R@2": 200 / 3})


def test_cmap_doubles_queries_and_symmetric_has_two_variants(root):
    train, cmap = load_fashioniq(root, "dress", caption_join="cmap")
    assert len(cmap.queries) == 6 and len(train.triplets) == 4
    assert cmap.queries[1].text == "is black with straps . <and> is solid black with no sleeves"
    assert "two per triplet" in cmap.describe()
    _, symmetric = load_fashioniq(root, "dress", caption_join="symmetric")
    assert len(symmetric.queries) == 3 and symmetric.text_variants == 2
    assert symmetric.texts(1)[2] == "is off-shoulder and is red"
    # The second order moves the third query's target to the top: averaged scores rank it first.
    flipped = SCORES.copy()
    flipped[2] = [0.3, 2.0, 0.9, 0.8, 0.99, 0.1]
    assert recall_at_k(average_variant_scores([SCORES, flipped]), symmetric, ks=(1,)) == pytest.approx({"R@1": 100 / 3})


def test_png_images_are_detected(tmp_path):
    root = materialise("fashioniq", tmp_path, suffix=".png")
    _, evalset = load_fashioniq(root, "dress")
    assert evalset.image_paths["V1"].suffix == ".png"
    assert check_fashioniq(root, ["dress"]) == []


def test_test_split_has_no_targets_and_refuses_evaluation(root):
    _, evalset = load_fashioniq(root, "dress", split="test")
    assert [q.targets for q in evalset.queries] == [frozenset(), frozenset()]
    with pytest.raises(ValueError, match="no targets"):
        recall_at_k(np.zeros((2, 3)), evalset)


def test_combine_categories():
    combined = combine_categories({"dress": {"R@10": 10.0, "R@50": 30.0}, "shirt": {"R@10": 20.0, "R@50": 40.0},
                                   "toptee": {"R@10": 30.0, "R@50": 50.0}})
    assert combined["shirt/R@50"] == 40.0
    assert combined["R@10"] == pytest.approx(20.0) and combined["R@50"] == pytest.approx(40.0)
    assert combined["avg"] == pytest.approx(30.0)


def test_check_reports_every_planted_problem(root):
    assert check_fashioniq(root, ["dress"]) == []
    (root / "images" / "V3.jpg").unlink()
    path = root / "captions" / "cap.dress.val.json"
    entries = json.loads(path.read_text())
    entries[1]["captions"] = ["only one"]
    entries[2]["target"] = "V9"
    path.write_text(json.dumps(entries))
    problems = check_fashioniq(root, ["dress"])
    assert len(problems) == 3
    assert f"{path}: entry 1: 'captions' must be a list of exactly 2 strings" in problems
    assert f"{path}: entry 2: target 'V9' is not in split.dress.val.json" in problems
    assert any(p.startswith("image 'V3': missing file") for p in problems)
    with pytest.raises(DataFormatError, match=r"cap\.dress\.val\.json: entry 1: 'captions'"):
        load_fashioniq(root, "dress")


def test_malformed_json_names_the_file(root):
    path = root / "image_splits" / "split.dress.val.json"
    path.write_text("[\"V1\",")
    with pytest.raises(DataFormatError, match="split.dress.val.json: not valid JSON"):
        load_fashioniq(root, "dress")


def test_clip4cir_random_caption_order_draws_each_of_four_texts(tmp_path):
    assert clip4cir_training_texts(["is shorter.", " is red"]) == (
        "Is shorter and is red", "Is red and is shorter", "Is shorter", "Is red")
    root = materialise("fashioniq", tmp_path)
    config = load_config(None, ["data.format=fashioniq", f"data.root={root}", "data.categories=[dress]",
                                "data.train_captions=clip4cir_random"])
    split = load_benchmark(config).train
    assert len(split.queries) == 2  # one slot per triplet, whatever the caption order
    train_part, val_part = carve_validation(split, 0.5, seed=0)
    (slot,) = range(len(train_part.queries))
    rng = np.random.default_rng(0)
    drawn = Counter(train_part.draw(slot, rng).text for _ in range(400))
    assert set(drawn) == set(train_part.text_variants[slot]) and min(drawn.values()) > 70  # ~100 each
    assert val_part.draw(0, rng) == val_part.queries[0]  # validation scores its stored (first) text
    assert {"Is shorter", "Is red and is shorter", "Has long sleeves"} <= split.all_texts()
    # evaluation texts keep the protocol's join
    assert load_benchmark(config).evalsets[0].queries[0].text == \
        load_benchmark(load_config(None, ["data.format=fashioniq", f"data.root={root}",
                                          "data.categories=[dress]"])).evalsets[0].queries[0].text


def test_train_captions_is_refused_outside_fashioniq(tiny_css):
    config = load_config(None, [f"data.root={tiny_css}", "data.train_captions=clip4cir_random"])
    with pytest.raises(ConfigError, match="data.train_captions=clip4cir_random is for FashionIQ"):
        load_benchmark(config)
    with pytest.raises(ValueError, match="unknown train_captions 'shuffle'"):
        load_fashioniq(tiny_css, "dress", train_captions="shuffle")


def test_caption_corrections_file_per_category_reaches_the_offset_join(tmp_path):
    root = materialise("fashioniq", tmp_path)
    (root / "correction_dict_dress.json").write_text(json.dumps({"yello": "yellow"}))
    settings = ["data.format=fashioniq", f"data.root={root}", "data.categories=[dress]", "protocol.caption_join=offset"]
    corrected = load_config(None, [*settings, f"data.caption_corrections={root}/correction_dict_{{category}}.json"])
    (evalset,) = load_benchmark(corrected).evalsets
    assert evalset.queries[1].text == "yellow and more flowing and has a longer hem"
    assert evalset.protocol["corrections"] == f"{root}/correction_dict_dress.json"
    (plain,) = load_benchmark(load_config(None, settings)).evalsets
    assert plain.queries[1].text == "yello and more flowing and has a longer hem"
    with pytest.raises(ConfigError, match="caption_corrections applies to FashionIQ with protocol.caption_join=off"):
        load_benchmark(load_config(None, [*settings[:3], f"data.caption_corrections={root}/c_{{category}}.json"]))
