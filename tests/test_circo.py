"""CIRCO: the released layout, mAP@K over every ground truth, Recall@K on target_img_id, mAP@10 per semantic aspect,
the test-server file and cross-benchmark evaluation of a checkpoint trained elsewhere."""

import json

import numpy as np
import pytest
import torch
from fixtures.materialise import materialise
from PIL import Image
from test_benchmarks import TINY, _ScoreTable

from cirlab.cli import main
from cirlab.config import ConfigError, load_config
from cirlab.data.benchmarks import load_benchmark
from cirlab.data.circo import check_circo, load_circo, write_circo_submission
from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import EvalQuery, EvalSet, map_at_k, recall_at_k
from cirlab.evaluate import evaluate_evalset
from cirlab.images import image_tensor
from cirlab.train import train

GALLERY = ["11", "22", "33", "44", "55", "66", "77", "88"]
# Columns in GALLERY order. Ground truths: query 0 {22} (one), query 1 {44, 55, 66, 77, 88, 22} (six, more than
# K = 5; target 44), query 2 {33, 44} (target 33) whose reference 11 scores highest.
VAL_SCORES = np.array([
    [0.9, 0.7, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5],     # 11 33 22 88 ...: the one ground truth 3rd
    [0.9, 0.6, 0.75, 0.65, 0.95, 0.85, 0.8, 0.7],  # 55 11 66 77 33 88 44 22: hits at 1 3 4 6 7 8, target 7th
    [0.99, 0.5, 0.9, 0.7, 0.4, 0.3, 0.2, 0.8],     # 11 33 88 44 ...: hits at 2 and 4
])
Q1_AP10 = (1 + 2 / 3 + 3 / 4 + 4 / 6 + 5 / 7 + 6 / 8) / 6   # six ground truths, all within the 8 images
KEPT = {"mAP@5": 100 * (1 / 3 + (1 + 2 / 3 + 3 / 4) / 5 + 1 / 2) / 3,   # q1: min(5, 6) = 5 divides
        **{f"mAP@{k}": 100 * (1 / 3 + Q1_AP10 + 1 / 2) / 3 for k in (10, 25, 50)},
        "mAP@10/addition": 100 * (1 / 3 + Q1_AP10) / 2, "mAP@10/cardinality": 100 * (1 / 3 + 1 / 2) / 2,
        "mAP@10/negation": 100 * 1 / 2}
RECALL = {"R@5": 200 / 3, "R@10": 100.0, "R@25": 100.0, "R@50": 100.0}  # q1's target 44 is 7th


@pytest.fixture
def root(tmp_path):
    return materialise("circo", tmp_path)


def test_val_reads_the_release_layout(root):
    evalset = load_circo(root)
    assert evalset.gallery == GALLERY  # the order of image_info_unlabeled2017.json, ids as strings
    assert evalset.image_paths["44"] == root / "COCO2017_unlabeled" / "unlabeled2017" / "000000000044.jpg"
    first, second = evalset.queries[:2]
    assert first == EvalQuery("11", "has two dogs instead of one", frozenset({"22"}), frozenset(), query_id="0",
                              ground_truths=frozenset({"22"}), aspects=("cardinality", "addition"))
    assert second.targets == frozenset({"44"}) and second.ground_truths == frozenset(GALLERY[1:2] + GALLERY[3:])
    assert evalset.ks == evalset.map_ks == (5, 10, 25, 50) and evalset.aspect_k == 10
    text = evalset.describe()
    assert "reference = kept" in text and "hit = Recall@K on target_img_id alone" in text
    assert "mAP@K for K in [5, 10, 25, 50], mAP@10 per semantic aspect" in text


def test_map_recall_and_aspects_by_hand(root):
    evalset = load_circo(root)
    assert map_at_k(VAL_SCORES, evalset) == pytest.approx(KEPT)
    # Recall counts target_img_id alone: q1 has five ground truths in its top 5 but not its target
    assert recall_at_k(VAL_SCORES, evalset) == pytest.approx(RECALL)


def test_removed_reference_leaves_the_ranking(root):
    evalset = load_circo(root, reference="removed")
    assert evalset.queries[2].excluded == frozenset({"11"}) and evalset.protocol["reference"] == "removed"
    metrics = map_at_k(VAL_SCORES, evalset, ks=(5,))
    # q0: 33 22 ... -> 1/2; q1 without 33: hits at 1 3 4 5 6 7; q2 without 11: 33 88 44 -> (1 + 2/3) / 2
    assert metrics["mAP@5"] == pytest.approx(100 * (1 / 2 + (1 + 2 / 3 + 3 / 4 + 4 / 5) / 5 + (1 + 2 / 3) / 2) / 3)
    assert metrics["mAP@10/negation"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_ties_at_the_cut_rank_by_gallery_order():
    """Top 3 of 0.5 0.9 0.5 0.5 0.1: g1, then g0 and g2 of the three tied; g3 is 4th, just outside."""
    gallery = [f"g{i}" for i in range(5)]
    queries = [EvalQuery("r", "a", frozenset({"g3"}), frozenset()), EvalQuery("r", "b", frozenset({"g2"}), frozenset())]
    evalset = EvalSet("toy", "test", gallery, {}, queries, {}, ks=(1,), map_ks=(3,))
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]] * 2)
    assert map_at_k(scores, evalset) == pytest.approx({"mAP@3": 100 * (0 + 1 / 3) / 2})
    assert map_at_k(scores, evalset, ks=(4,)) == pytest.approx({"mAP@4": 100 * (1 / 4 + 1 / 3) / 2})


def test_caption_join_concept_prepends_the_shared_concept(root):
    evalset = load_circo(root, caption_join="concept")
    assert evalset.queries[0].text == "a dog on a sofa but has two dogs instead of one"
    assert evalset.protocol["text"] == "'<shared_concept> but <relative_caption>'"
    assert load_circo(root).protocol["text"].startswith("relative_caption alone")
    with pytest.raises(ValueError, match=r"unknown CIRCO caption join 'cmap' \(known: caption, concept\)"):
        load_circo(root, caption_join="cmap")


@pytest.mark.parametrize("chunk", [1024, 2])
def test_evaluate_evalset_reports_map_per_aspect_over_chunks(root, chunk):
    """With chunks of 2, the cardinality queries (0 and 2) fall in different chunks: a mean of chunk means
    would weigh them wrongly."""
    evalset = load_benchmark(load_config(None, ["data.format=circo", f"data.root={root}"])).evalsets[0]
    colours = [image_tensor(Image.open(evalset.image_paths[i])).mean(dim=(1, 2)) for i in evalset.gallery]
    model = _ScoreTable([q.text for q in evalset.queries], colours, VAL_SCORES)
    metrics = evaluate_evalset(model, evalset, torch.device("cpu"), progress=False, query_chunk=chunk)
    assert metrics == pytest.approx({**RECALL, **KEPT})


def test_test_split_refuses_scores_and_writes_the_server_file(root, tmp_path):
    evalset = load_circo(root, "test")
    assert [(q.reference, q.query_id, q.targets, q.aspects) for q in evalset.queries] == [
        ("11", "0", frozenset(), ()), ("22", "1", frozenset(), ())]
    scores = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                       [0.5, 0.9, 0.5, 0.1, 0.5, 0.2, 0.3, 0.4]])  # ties at 0.5: 11, 33, 55 in gallery order
    with pytest.raises(ValueError, match="no targets"):
        map_at_k(scores, evalset)
    (path,) = write_circo_submission(scores, evalset, tmp_path / "server", name="demo")
    assert path == tmp_path / "server" / "circo_submission_demo.json"
    assert path.read_text() == ('{"0": [88, 77, 66, 55, 44, 33, 22, 11], '
                                '"1": [22, 11, 33, 55, 88, 77, 66, 44]}')  # all 8: fewer than 50 images
    (path,) = write_circo_submission(scores, load_circo(root, "test", reference="removed"), tmp_path, "removed")
    assert json.loads(path.read_text())["1"] == [11, 33, 55, 88, 77, 66, 44]


def test_submission_keeps_the_top_50_and_needs_ids_from_zero(tmp_path):
    gallery = [str(i) for i in range(60)]
    scores = np.arange(60, dtype=float)[None, ::-1].copy()  # image 0 best, then 1, ...

    def submitted(query_id):
        queries = [EvalQuery("0", "x", frozenset(), frozenset(), query_id=query_id)]
        (path,) = write_circo_submission(scores, EvalSet("circo", "test", gallery, {}, queries, {}, (5,)), tmp_path)
        return json.loads(path.read_text())

    assert submitted("0") == {"0": list(range(50))}
    with pytest.raises(ValueError, match="needs query ids 0 to 0, each once"):
        submitted("1")


def _edit(path, change):
    records = json.loads(path.read_text())
    change(records)
    path.write_text(json.dumps(records))


def test_check_reports_every_planted_problem(root):
    assert check_circo(root) == []
    val, test = root / "annotations" / "val.json", root / "annotations" / "test.json"
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"

    def break_val(records):
        del records[0]["relative_caption"]
        records[1]["gt_img_ids"] += [99, 44]
        records[2].update(id=1, target_img_id=55)

    _edit(val, break_val)
    _edit(test, lambda records: records[1].pop("reference_img_id"))
    _edit(info, lambda data: data["images"].append({"id": "x", "file_name": "x.jpg"}))
    (root / "COCO2017_unlabeled" / "unlabeled2017" / "000000000088.jpg").unlink()
    assert check_circo(root) == [
        f"{info}: image 8: expected an integer 'id' and a 'file_name' string",
        f"{val}: entry 0: missing or empty 'relative_caption'",
        f"{val}: entry 1: 'gt_img_ids' lists an image twice",
        f"{val}: entry 2: target_img_id 55 is not among gt_img_ids",
        f"{val}: entry 2: query id 1 is used twice",
        f"{val}: entry 1: image 99 is not in image_info_unlabeled2017.json",
        f"{test}: entry 1: missing or non-integer 'reference_img_id'",
        f"image '88': missing file {root / 'COCO2017_unlabeled' / 'unlabeled2017' / '000000000088.jpg'}",
    ]
    with pytest.raises(DataFormatError, match=r"val\.json: entry 0: missing or empty 'relative_caption' \(and 4 more"):
        load_circo(root)


def test_missing_or_malformed_files_are_named(root):
    (root / "annotations" / "test.json").unlink()
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.write_text('[{"id": 11}]')
    assert check_circo(root, ("test",)) == [
        f"{info}: expected a COCO image-info object with an 'images' list",
        f"{root / 'annotations' / 'test.json'}: missing file"]
    with pytest.raises(DataFormatError, match="image_info_unlabeled2017.json: expected a COCO image-info object"):
        load_circo(root)


def test_the_registry_takes_circo_choices_and_refuses_others(root):
    base = ["data.format=circo", f"data.root={root}"]
    benchmark = load_benchmark(load_config(None, [*base, "protocol.split=test", "protocol.reference=removed"]))
    assert benchmark.train.queries == [] and benchmark.evalsets[0].split == "test"
    assert benchmark.evalsets[0].queries[0].excluded == frozenset({"11"})
    with pytest.raises(ConfigError, match="protocol.gallery does not apply to circo"):
        load_benchmark(load_config(None, [*base, "protocol.gallery=queries"]))
    (root / "COCO2017_unlabeled" / "unlabeled2017" / "000000000088.jpg").unlink()
    with pytest.raises(DataFormatError, match="000000000088.jpg: missing image"):
        load_benchmark(load_config(None, base))
    skipped = load_benchmark(load_config(None, [*base, "data.missing_images=skip"])).evalsets[0]
    # 88 is a ground truth of query 1 only, never a target or reference: every query stays, scored without it
    assert len(skipped.queries) == 3 and "88" not in skipped.gallery and "88" not in skipped.queries[1].ground_truths


def test_a_checkpoint_trained_on_fashioniq_is_evaluated_and_submitted_on_circo(root, tmp_path, capsys):
    fashioniq = materialise("fashioniq", tmp_path)
    config = load_config(None, ["data.format=fashioniq", f"data.root={fashioniq}", "data.categories=[dress]",
                                *TINY, "train.selection=last"])
    train(config, tmp_path / "run", progress=False)
    circo = ["--set", "data.format=circo", "--set", f"data.root={root}"]
    assert main(["eval", str(tmp_path / "run" / "best"), *circo]) == 0
    # named after the other benchmark, so it does not overwrite the run's own eval-val
    result = json.loads((tmp_path / "run" / "eval-circo-val.json").read_text())
    assert result["benchmark"] == "circo" and result["queries"] == 3 and result["gallery"] == 8
    assert set(result["metrics"]) == {*RECALL, *KEPT}
    assert all(0.0 <= value <= 100.0 for value in result["metrics"].values())
    assert "mAP@10 per semantic aspect" in result["protocol_text"]
    assert main(["eval", str(tmp_path / "run" / "best"), *circo, "--submission", str(tmp_path / "server")]) == 0
    assert "circo_submission_run.json" in capsys.readouterr().out
    submission = json.loads((tmp_path / "server" / "circo_submission_run.json").read_text())
    assert list(submission) == ["0", "1"] and all(sorted(ids) == [int(i) for i in GALLERY]
                                                  for ids in submission.values())
    assert main(["data", "check", str(root), "--format", "circo"]) == 0
    assert "circo val: 3 of 3 queries kept; gallery 8 of 8" in capsys.readouterr().out


def test_training_on_circo_is_refused_with_what_to_do(root, tmp_path):
    config = load_config(None, ["data.format=circo", f"data.root={root}", *TINY])
    with pytest.raises(ConfigError, match="circo has no training split: train on another benchmark"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
