import json

import numpy as np
import pytest
from fixtures.materialise import materialise

from cirlab.data.cirr import check_cirr, cirr_average, load_cirr, write_cirr_submissions
from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import EvalQuery, EvalSet, ranked_ids, recall_at_k, recall_subset_at_k

# Columns: dev-1-0-img0, dev-1-0-img1, dev-2-1-img0, dev-2-1-img1, dev-3-0-img0, dev-3-1-img1, dev-4-0-img0.
VAL_SCORES = np.array([
    [0.99, 0.5, 0.7, 0.1, 0.2, 0.3, 0.9],   # reference first; target 2nd after removal, 1st in the subset
    [0.1, 0.95, 0.8, 0.6, 0.7, 0.2, 0.85],  # target 4th after removal, 3rd in the subset
    [0.1, 0.1, 0.1, 0.1, 0.9, 0.8, 0.1],    # reference first; target 1st once it is removed
])
TEST = ["test1-0-0-img0", "test1-0-0-img1", "test1-1-0-img0", "test1-1-0-img1", "test1-2-0-img0",
        "test1-2-0-img1", "test1-3-0-img0"]
TEST_SCORES = np.array([[0.9, 0.1, 0.5, 0.5, 0.3, 0.2, 0.8], [0.2, 0.6, 0.1, 0.99, 0.4, 0.7, 0.3]])


@pytest.fixture
def root(tmp_path):
    return materialise("cirr", tmp_path)


def test_val_metrics_remove_the_reference_and_rank_within_the_subset(root):
    train, evalset = load_cirr(root)
    assert evalset.gallery[0] == "dev-1-0-img0" and len(evalset.gallery) == 7
    assert evalset.image_paths["dev-2-1-img0"] == root / "dev" / "dev-2-1-img0.png"
    first = evalset.queries[0]
    assert first.excluded == frozenset({"dev-1-0-img0"}) and first.query_id == "100"
    assert first.subset == ("dev-1-0-img1", "dev-2-1-img0", "dev-2-1-img1", "dev-3-0-img0", "dev-3-1-img1")
    # target_soft of pair 101 omits its target: the hit is still target_hard.
    assert evalset.queries[1].targets == frozenset({"dev-2-1-img1"})
    metrics = recall_at_k(VAL_SCORES, evalset)
    assert metrics == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "R@50": 100.0})
    subset = recall_subset_at_k(VAL_SCORES, evalset)
    assert subset == pytest.approx({"Rsubset@1": 200 / 3, "Rsubset@2": 200 / 3, "Rsubset@3": 100.0})
    assert cirr_average({**metrics, **subset}) == pytest.approx(250 / 3)
    assert train.triplets[0].text == "add a red ball" and train.triplets[0].target == "train-11-1-img0"
    assert "reference = removed" in evalset.describe()


def test_test_split_refuses_evaluation_but_writes_submissions(root, tmp_path):
    _, evalset = load_cirr(root, "test1")
    assert all(not q.targets for q in evalset.queries)
    with pytest.raises(ValueError, match="no targets"):
        recall_at_k(TEST_SCORES, evalset)
    recall_path, subset_path = write_cirr_submissions(TEST_SCORES, evalset, tmp_path / "out", name="demo")
    assert recall_path.name == "recall_submission_demo.json"
    assert subset_path.name == "recall_subset_submission_demo.json"
    recall = json.loads(recall_path.read_text())
    subset = json.loads(subset_path.read_text())
    a, b, c, d, e, f, g = TEST
    assert recall == {"version": "rc2", "metric": "recall", "12063": [g, c, d, e, f, b], "12064": [f, b, e, g, a, c]}
    assert subset == {"version": "rc2", "metric": "recall_subset", "12063": [c, d, e], "12064": [f, b, e]}


def test_submission_truncates_to_fifty():
    gallery = [f"img{i}" for i in range(60)]
    query = EvalQuery("img0", "x", frozenset(), frozenset({"img0"}), tuple(gallery[1:6]), "7")
    evalset = EvalSet("cirr", "test1", gallery, {}, [query], {}, (1,))
    scores = np.arange(60, dtype=float)[None, ::-1].copy()  # img0 best, then img1, ...
    assert ranked_ids(scores, evalset, 50) == [gallery[1:51]]
    assert ranked_ids(scores, evalset, 3, within_subset=True) == [gallery[1:4]]


def test_check_reports_every_planted_problem(root):
    assert check_cirr(root) == []
    (root / "dev" / "dev-3-1-img1.png").unlink()
    path = root / "cirr" / "captions" / "cap.rc2.val.json"
    entries = json.loads(path.read_text())
    del entries[0]["target_hard"]
    entries[2]["img_set"]["members"][0] = "dev-9-9-img9"
    path.write_text(json.dumps(entries))
    problems = check_cirr(root, ("val",))
    assert f"{path}: entry 0: missing or non-string 'target_hard'" in problems
    assert f"{path}: entry 2: image 'dev-9-9-img9' is not in the split file" in problems
    assert f"image 'dev-3-1-img1': missing file {root / 'dev' / 'dev-3-1-img1.png'}" in problems
    assert len(problems) == 3
    with pytest.raises(DataFormatError, match=r"cap\.rc2\.val\.json: entry 0: missing or non-string 'target_hard'"):
        load_cirr(root)


def test_split_file_must_be_a_mapping(root):
    (root / "cirr" / "image_splits" / "split.rc2.val.json").write_text('["dev-1-0-img0"]')
    with pytest.raises(DataFormatError, match="split.rc2.val.json: expected a JSON object"):
        load_cirr(root)
