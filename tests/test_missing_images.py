"""data.missing_images: "error" stops at load time; "skip" drops what names a missing image and says so."""

import json
import random
import re

import numpy as np
import pytest
import torch
from fixtures.materialise import materialise
from PIL import Image
from test_benchmarks import TINY, _ScoreTable
from test_cirr import VAL_SCORES

from cirlab.cli import main
from cirlab.config import ConfigError, load_config
from cirlab.data.benchmarks import load_benchmark
from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import AvailableDraws, EvalQuery, EvalSet, evalset_without_missing, recall_at_k
from cirlab.data.fashioniq import load_fashioniq
from cirlab.data.records import TargetDraws
from cirlab.evaluate import evaluate_evalset
from cirlab.images import image_tensor
from cirlab.train import train

DRESS = ["data.format=fashioniq", "data.categories=[dress]"]
SKIP = "data.missing_images=skip"


def _delete(root, *relative_paths):
    for path in relative_paths:
        (root / path).unlink()


def _benchmark(root, *overrides):
    return load_benchmark(load_config(None, [f"data.root={root}", *overrides]))


@pytest.fixture
def fashioniq(tmp_path):
    """The FashionIQ fixture without V1 (the reference of val query 0, and the split's first image), V4 (the
    target of val query 1), A3 (the target of training triplet 1) and T3 (a test gallery image only)."""
    root = materialise("fashioniq", tmp_path)
    _delete(root, "images/V1.jpg", "images/V4.jpg", "images/A3.jpg", "images/T3.jpg")
    return root


@pytest.fixture
def cirr(tmp_path):
    """The CIRR fixture without dev-2-1-img0 (the target of val pair 100, in every val img_set) and
    dev-4-0-img0 (a gallery image only)."""
    root = materialise("cirr", tmp_path)
    _delete(root, "dev/dev-2-1-img0.png", "dev/dev-4-0-img0.png")
    return root


def test_error_names_the_first_missing_file_and_the_count_at_load_time(tmp_path):
    root = materialise("fashioniq", tmp_path)
    _delete(root, "images/V4.jpg", "images/V6.jpg")
    # 3 training images and the 6 of the val split; the default policy is "error"
    expected = (f"{root / 'images' / 'V4.jpg'}: missing image (2 of the benchmark's 9 images are missing; "
                f"`cirlab data check {root} --format fashioniq` lists them")
    with pytest.raises(DataFormatError, match=re.escape(expected)):
        _benchmark(root, *DRESS)


def test_error_with_nothing_missing_adds_nothing_to_the_protocol(tmp_path):
    root = materialise("fashioniq", tmp_path)
    benchmark = _benchmark(root, *DRESS)
    assert benchmark.kept == []
    assert benchmark.evalsets[0].protocol == load_fashioniq(root, "dress")[1].protocol
    assert "missing_images" not in benchmark.evalsets[0].describe()


def test_skip_on_fashioniq_drops_the_triplets_queries_and_gallery_images_that_are_missing(fashioniq):
    benchmark = _benchmark(fashioniq, *DRESS, SKIP)
    (evalset,) = benchmark.evalsets
    # val: V1 -> V2 (reference missing) and V3 -> V4 (target missing) go; V5 -> V2 stays
    assert [(q.reference, sorted(q.targets)) for q in evalset.queries] == [("V5", ["V2"])]
    assert evalset.queries[0].text == "Is red and is off-shoulder"
    assert evalset.gallery == ["V2", "V3", "V5", "V6"]
    assert "V1" not in evalset.image_paths and "V4" not in evalset.image_paths
    assert evalset.protocol["image_ext"] == ".jpg"  # detected from V2, the split's first image that exists
    # train: A1 -> A2 stays, A2 -> A3 goes
    assert [(q.reference, q.target) for q in benchmark.train.queries] == [(0, 1)]
    assert [path.name for path in benchmark.train.image_paths] == ["A1.jpg", "A2.jpg"]
    assert [(c.split, c.describe()) for c in benchmark.kept] == [
        ("fashioniq-dress train", "1 of 2 training triplets kept"),
        ("fashioniq-dress val", "1 of 3 queries kept; gallery 4 of 6")]


def test_the_protocol_text_carries_the_counts(fashioniq):
    (evalset,) = _benchmark(fashioniq, *DRESS, SKIP).evalsets
    assert evalset.protocol["missing_images"] == "skipped: 1 of 3 queries kept; gallery 4 of 6"
    assert evalset.describe().startswith("fashioniq-dress val: ")
    assert "; missing_images = skipped: 1 of 3 queries kept; gallery 4 of 6; " in evalset.describe()


def test_counts_use_thousands_separators(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    queries = [EvalQuery("a.png", "t", frozenset(["a.png"]), frozenset())] * 2017
    gallery = [f"g{i}" for i in range(3817)]
    paths = {"a.png": tmp_path / "a.png", **{g: tmp_path / g for g in gallery}}
    _, count = evalset_without_missing(EvalSet("fashioniq-dress", "val", gallery, paths, queries, {}, (10,)))
    assert count.describe() == "2,017 of 2,017 queries kept; gallery 0 of 3,817"


def test_skip_on_an_unlabelled_test_split_keeps_queries_whose_reference_exists(fashioniq):
    (evalset,) = _benchmark(fashioniq, *DRESS, SKIP, "protocol.split=test").evalsets
    assert [q.reference for q in evalset.queries] == ["T1", "T2"]
    assert evalset.gallery == ["T1", "T2"]
    assert evalset.protocol["missing_images"] == "skipped: 2 of 2 queries kept; gallery 2 of 3"


def test_skip_on_cirr_prunes_the_subsets_and_recall_counts_the_kept_queries_only(cirr):
    benchmark = _benchmark(cirr, "data.format=cirr", SKIP)
    (evalset,) = benchmark.evalsets
    assert [q.query_id for q in evalset.queries] == ["101", "102"]
    assert evalset.gallery == ["dev-1-0-img0", "dev-1-0-img1", "dev-2-1-img1", "dev-3-0-img0", "dev-3-1-img1"]
    assert evalset.queries[0].subset == ("dev-1-0-img0", "dev-2-1-img1", "dev-3-0-img0", "dev-3-1-img1")
    assert evalset.protocol["missing_images"] == "skipped: 2 of 3 queries kept; gallery 5 of 7"
    # VAL_SCORES without the row of pair 100 and the columns of the two missing images. Pair 101: its target
    # (0.6) is 2nd once its reference (0.95) is removed (0.7 ahead), also 2nd in its subset; pair 102: 1st.
    scores = VAL_SCORES[1:][:, [0, 1, 3, 4, 5]]
    assert recall_at_k(scores, evalset) == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0})
    # Through the model path: only images that exist are decoded, and the metrics are over the 2 kept queries.
    colours = [image_tensor(Image.open(evalset.image_paths[i])).mean(dim=(1, 2)) for i in evalset.gallery]
    model = _ScoreTable([q.text for q in evalset.queries], colours, scores)
    metrics = evaluate_evalset(model, evalset, torch.device("cpu"), progress=False)
    assert metrics == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0, "Rsubset@1": 50.0,
                                     "Rsubset@2": 100.0, "Rsubset@3": 100.0, "avg": 75.0})


def test_a_query_with_several_targets_stays_while_one_of_them_exists(tmp_path):
    root = materialise("fashion200k", tmp_path)
    _delete(root, "women/dresses/a/2.jpeg")
    (evalset,) = _benchmark(root, "data.format=fashion200k", SKIP).evalsets
    # the target caption "red andmark white dress" has images 2 and 3: the query keeps 3
    assert [sorted(q.targets) for q in evalset.queries] == [["women/dresses/b/3.jpeg"], ["women/tops/c/5.jpeg"]]
    assert evalset.protocol["missing_images"] == "skipped: 2 of 2 queries kept; gallery 5 of 6"


def test_training_redraws_never_name_a_missing_image(tmp_path):
    root = materialise("fashion200k", tmp_path)
    _delete(root, "women/dresses/x/12.jpeg")
    benchmark = _benchmark(root, "data.format=fashion200k", SKIP)
    # the slots of images 10 and 11 stay (their stored targets are 11 and 10); the slot of 12 goes
    assert benchmark.kept[0].describe() == "2 of 3 training triplets kept"
    split = benchmark.train
    assert "12.jpeg" not in [path.name for path in split.image_paths]
    blue = next(i for i, q in enumerate(split.queries) if split.image_paths[q.reference].name == "10.jpeg")
    rng = np.random.default_rng(0)
    # a "red dress" is 11 or 12; with 12 gone every draw from the blue dress names 11
    assert {split.image_paths[split.draw(blue, rng).target].name for _ in range(50)} == {"11.jpeg"}


class _Listed(TargetDraws):
    """Draws one of `targets` uniformly, with the text "t"."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets

    def images(self):
        return ["source", *self.targets]

    def draw(self, source, pick):
        return "t", pick(self.targets)

    def texts(self, source):
        return frozenset(["t"])


def test_available_draws_redraw_missing_targets_and_give_up_when_all_are_missing():
    draws = AvailableDraws(_Listed(["gone", "here"]), {"gone"})
    assert draws.images() == ["source", "here"]
    assert {draws.draw("source", random.Random(0).choice) for _ in range(20)} == {("t", "here")}
    with pytest.raises(DataFormatError, match="image 'source': 10,000 training draws in a row named a missing"):
        AvailableDraws(_Listed(["gone"]), {"gone"}).draw("source", random.Random(0).choice)


def test_an_evaluation_split_with_no_query_left_is_refused(tmp_path):
    root = materialise("cirr", tmp_path)
    _delete(root, "dev/dev-2-1-img0.png", "dev/dev-2-1-img1.png", "dev/dev-3-1-img1.png")
    with pytest.raises(DataFormatError, match="cirr val: 0 of 3 queries kept; gallery 4 of 7: every query names a"):
        _benchmark(root, "data.format=cirr", SKIP)


def test_shoes_finds_images_by_name_and_skips_those_it_cannot_find(tmp_path):
    root = materialise("shoes", tmp_path)
    _delete(root, "womens_pumps/1/img_womens_pumps_4.jpg")
    with pytest.raises(DataFormatError, match=r"image 'img_womens_pumps_4.jpg' not found below the root \(1 missing"):
        _benchmark(root, "data.format=shoes")
    (evalset,) = _benchmark(root, "data.format=shoes", SKIP).evalsets
    assert [q.reference for q in evalset.queries] == ["img_womens_pumps_1.jpg"]
    assert evalset.protocol["missing_images"] == "skipped: 1 of 2 queries kept; gallery 3 of 4"


@pytest.mark.parametrize("overrides, message", [
    (["data.format=css", SKIP], "data.missing_images=skip does not apply to css"),
    (["data.format=cirr", "data.missing_images=ignore"], "unknown data.missing_images 'ignore' "
                                                          r"\(known: error, skip\)"),
])
def test_a_policy_that_does_not_apply_is_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _benchmark(tmp_path, *overrides)


def test_data_check_prints_what_skip_keeps_of_every_split(cirr, capsys):
    assert main(["data", "check", str(cirr), "--format", "cirr"]) == 1  # the missing images are problems
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("with data.missing_images=skip, training and evaluation would keep:")
    assert lines[start + 1:] == ["  cirr train: 1 of 1 training triplets kept",
                                 "  cirr val: 2 of 3 queries kept; gallery 5 of 7",
                                 "  cirr test1: 2 of 2 queries kept; gallery 7 of 7",
                                 f"{cirr}: 2 problem(s) found (cirr format)"]


def test_data_check_counts_every_fashioniq_category_it_can_read(fashioniq, capsys):
    main(["data", "check", str(fashioniq), "--format", "fashioniq"])
    out = capsys.readouterr().out
    assert ("  fashioniq-dress train: 1 of 2 training triplets kept\n"
            "  fashioniq-dress val: 1 of 3 queries kept; gallery 4 of 6\n"
            "  fashioniq-dress test: 2 of 2 queries kept; gallery 2 of 3\n") in out
    # the fixture has no shirt files: that split cannot be counted, and says why
    shirt_captions = fashioniq / "captions" / "cap.shirt.val.json"
    assert f"  fashioniq shirt val: cannot be read ({shirt_captions}: missing file)" in out


def test_a_short_training_run_and_its_evaluation_with_skip(fashioniq, tmp_path):
    # CMAP's join gives the one kept triplet two training queries (a batch of 2); selection on FashionIQ's own
    # val split, which skips its missing images too.
    config = load_config(None, [*DRESS, f"data.root={fashioniq}", SKIP, "protocol.caption_join=cmap", *TINY,
                                "train.selection=val"])
    train(config, tmp_path / "run", progress=False)
    header = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert header["kept"]["fashioniq-dress train"] == "2 of 4 training triplets kept"  # one of two, in both orders
    assert main(["eval", str(tmp_path / "run" / "best")]) == 0
    result = json.loads((tmp_path / "run" / "eval-val.json").read_text())
    assert result["config"]["data"]["missing_images"] == "skip"
    assert result["queries"] == 2 and result["gallery"] == 4  # V5 -> V2 in both caption orders
    assert result["protocol"]["missing_images"] == "skipped: 2 of 6 queries kept; gallery 4 of 6"
    assert "missing_images = skipped: 2 of 6 queries kept; gallery 4 of 6" in result["protocol_text"]
    assert result["metrics"]["R@10"] == 100.0  # 4 gallery images: the target is always in the top 10
