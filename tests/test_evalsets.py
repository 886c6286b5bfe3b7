import numpy as np
import pytest
import torch

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import (
    EvalQuery,
    EvalSet,
    average_variant_scores,
    map_at_k,
    ranked_ids,
    read_json,
    recall_at_k,
    recall_subset_at_k,
)

GALLERY = ["r", "a", "b", "c", "d", "e", "f"]


def _evalset(queries, ks=(1, 2, 3)):
    return EvalSet("toy", "val", GALLERY, {}, queries, {"gallery": "toy", "reference": "removed"}, ks)


def _query(targets, excluded=("r",), subset=None, variants=()):
    return EvalQuery("r", "t", frozenset(targets), frozenset(excluded), subset, None, variants)


def test_recall_removes_excluded_ids_and_counts_any_target():
    evalset = _evalset([_query({"b"}), _query({"c", "e"}), _query({"r"}, excluded=())])
    scores = np.array([
        [9.0, 1.0, 8.0, 0.0, 0.0, 0.0, 0.0],   # b 1st once r is removed
        [9.0, 8.0, 7.0, 1.0, 6.0, 5.0, 0.0],   # a, b, d ahead of e (best target): 4th
        [0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5],   # the reference is the target and is kept: 7th
    ])
    assert recall_at_k(scores, evalset, ks=(1, 3, 4, 6, 7)) == pytest.approx(
        {"R@1": 100 / 3, "R@3": 100 / 3, "R@4": 200 / 3, "R@6": 200 / 3, "R@7": 100.0})
    assert recall_at_k(torch.tensor(scores, dtype=torch.float16), evalset, ks=(1,)) == pytest.approx({"R@1": 100 / 3})
    assert scores[0, 0] == 9.0  # the caller's matrix is not modified


def test_ties_rank_by_gallery_order_and_excluded_targets_never_hit():
    evalset = _evalset([_query({"c"}), _query({"a"}), _query({"r"})])
    scores = np.ones((3, len(GALLERY)))
    # Row 0: a and b tie with c and come first; row 1: a is first among equals; row 2: target excluded.
    assert recall_at_k(scores, evalset, ks=(1, 2, 3, 7)) == pytest.approx(
        {"R@1": 100 / 3, "R@2": 100 / 3, "R@3": 200 / 3, "R@7": 200 / 3})


def test_subset_recall_ranks_only_within_the_subset():
    members = ("a", "b", "c", "d", "e")
    evalset = _evalset([_query({"c"}, subset=members), _query({"e"}, subset=members)])
    scores = np.array([
        [9.0, 1.0, 2.0, 3.0, 0.0, 0.0, 8.5],   # f (outside the subset) and r ignored: c 1st
        [9.0, 5.0, 4.0, 3.0, 2.0, 4.0, 9.9],   # e ties b (earlier): a, b ahead -> rank 3
    ])
    assert recall_subset_at_k(scores, evalset) == pytest.approx(
        {"Rsubset@1": 50.0, "Rsubset@2": 50.0, "Rsubset@3": 100.0})
    assert recall_at_k(scores, evalset, ks=(1,)) == pytest.approx({"R@1": 0.0})
    assert ranked_ids(scores, evalset, 3, within_subset=True) == [["c", "b", "a"], ["a", "b", "e"]]
    assert ranked_ids(scores, evalset, 2) == [["f", "c"], ["f", "a"]]


def test_bad_inputs_are_refused():
    evalset = _evalset([_query({"b"})])
    with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
        recall_at_k(np.zeros((1, 3)), evalset)
    with pytest.raises(ValueError, match="query 0: target id 'zz' is not in the gallery"):
        recall_at_k(np.zeros((1, 7)), _evalset([_query({"zz"})]))
    with pytest.raises(ValueError, match="1 of 1 queries have no targets"):
        recall_at_k(np.zeros((1, 7)), _evalset([_query(set())]))
    with pytest.raises(ValueError, match="no subset"):
        recall_subset_at_k(np.zeros((1, 7)), evalset)


def test_text_variants_and_describe():
    evalset = _evalset([_query({"b"}, variants=("x and y", "y and x")), _query({"c"}, variants=("p", "q"))])
    assert evalset.text_variants == 2
    assert evalset.texts(1) == ["y and x", "q"]
    with pytest.raises(IndexError):
        evalset.texts(2)
    assert _evalset([_query({"b"})]).texts() == ["t"]
    averaged = average_variant_scores([np.zeros((2, 7)), torch.full((2, 7), 2.0)])
    assert averaged.shape == (2, 7) and np.all(averaged == 1.0)
    assert evalset.describe() == ("toy val: gallery = toy; reference = removed; Recall@K for K in [1, 2, 3] "
                                  "(2 queries, gallery of 7)")


def test_read_json_names_the_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"nothing\.json: missing file"):
        read_json(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataFormatError, match=r"bad\.json: not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_map_at_k_by_hand():
    """Gallery g0..g5. Query 0: one target (g2), ranked third -> AP@K = (1/3) / 1 for K >= 3, 0 for K < 3.
    Query 1: targets g0, g1, g3, g4 (more than K = 2), reference g5 excluded although it scores highest:
    ranking g0, g3, g1, g2, g4 -> hits at 1, 2, 3, 5. AP@2 = (1 + 1) / 2; AP@5 = (1 + 1 + 1 + 4/5) / 4."""
    evalset = EvalSet("toy", "test", [f"g{i}" for i in range(6)], {}, [
        EvalQuery("r", "t", frozenset({"g2"}), frozenset()),
        EvalQuery("g5", "t", frozenset({"g0", "g1", "g3", "g4"}), frozenset({"g5"})),
    ], {}, ks=(1,), map_ks=(2, 5))
    scores = np.array([[0.9, 0.1, 0.5, 0.8, 0.0, 0.2],
                       [0.9, 0.6, 0.5, 0.8, 0.4, 1.0]])
    metrics = map_at_k(scores, evalset)
    assert metrics["mAP@2"] == pytest.approx(100 * (0 + 1.0) / 2)
    assert metrics["mAP@5"] == pytest.approx(100 * (1 / 3 + 3.8 / 4) / 2)
    assert "mAP@K for K in [2, 5]" in evalset.describe()
