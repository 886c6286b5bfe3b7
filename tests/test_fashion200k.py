import numpy as np
import pytest
from fixtures.materialise import materialise

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import recall_at_k
from cirlab.data.fashion200k import (
    check_fashion200k,
    clean_caption,
    load_fashion200k,
    modification_text,
    parent_captions,
)

D = "women/dresses/"
T = "women/tops/"
GALLERY = [D + "a/1.jpeg", D + "a/2.jpeg", D + "b/3.jpeg", T + "c/4.jpeg", T + "c/5.jpeg", T + "d/6.jpeg"]
# Rows: 1 -> "red andmark white dress" (images 2 and 3), 4 -> "green top" (image 5).
SCORES = np.array([[0.9, 0.1, 0.5, 0.6, 0.2, 0.3],     # reference first; second target 2nd after removal
                   [0.1, 0.2, 0.3, 0.95, 0.9, 0.4]])   # reference first; target 1st after removal


@pytest.fixture
def root(tmp_path):
    return materialise("fashion200k", tmp_path)


def test_caption_rules():
    assert clean_caption("  black & white dress. ") == "black andmark white dressdotmark"
    assert clean_caption("what? *new*") == "whatquestionmark starmarknewstarmark"
    # Substring removal: dropping "a" also mangles "black" (TIRG quirk, kept).
    assert parent_captions("a black top") == ["blck top", "a top", "a black"]
    assert modification_text("black andmark white dress", "red andmark white dress") == "replace black with red"
    # No source word is missing from the target: TIRG's loop falls through to the last word.
    assert modification_text("white dress", "white long dress") == "replace dress with long"


def test_listed_queries_and_caption_hits(root):
    train, evalset = load_fashion200k(root)
    assert evalset.gallery == GALLERY
    assert [q.text for q in evalset.queries] == ["replace black with red", "replace blue with green"]
    assert evalset.queries[0].targets == frozenset({D + "a/2.jpeg", D + "b/3.jpeg"})
    assert evalset.queries[0].excluded == frozenset({D + "a/1.jpeg"})
    assert evalset.protocol["queries"] == "test_queries.txt"
    assert evalset.image_paths[T + "d/6.jpeg"] == root / T / "d" / "6.jpeg"
    assert recall_at_k(SCORES, evalset) == pytest.approx({"R@1": 50.0, "R@10": 100.0, "R@50": 100.0})
    assert recall_at_k(SCORES, evalset, ks=(2,)) == pytest.approx({"R@2": 100.0})


def test_train_triplets_are_seeded_tirg_samples(root):
    train, _ = load_fashion200k(root, seed=3)
    assert [(t.reference, t.text) for t in train.triplets] == [
        (D + "x/10.jpeg", "replace blue with red"), (D + "x/11.jpeg", "replace red with blue"),
        (D + "x/12.jpeg", "replace red with blue")]
    assert train.triplets[0].target in {D + "x/11.jpeg", D + "x/12.jpeg"}
    assert train.triplets[1].target == train.triplets[2].target == D + "x/10.jpeg"
    assert load_fashion200k(root, seed=3)[0] == train


def test_queries_built_as_tirg_without_the_file(root):
    (root / "test_queries.txt").unlink()
    _, evalset = load_fashion200k(root)
    assert [(q.reference, q.text, q.targets) for q in evalset.queries] == [
        (D + "a/1.jpeg", "replace black with red", frozenset({D + "a/2.jpeg", D + "b/3.jpeg"})),
        (D + "a/2.jpeg", "replace red with black", frozenset({D + "a/1.jpeg"})),
        (D + "b/3.jpeg", "replace red with black", frozenset({D + "a/1.jpeg"})),
        (T + "c/4.jpeg", "replace blue with green", frozenset({T + "c/5.jpeg"})),
        (T + "c/5.jpeg", "replace green with blue", frozenset({T + "c/4.jpeg"})),
    ]
    assert evalset.protocol["queries"].startswith("built")


def test_check_reports_every_planted_problem(root):
    assert check_fashion200k(root) == []
    (root / T / "c" / "5.jpeg").unlink()
    labels = root / "labels" / "dress_train_detect_all.txt"
    labels.write_text(labels.read_text() + "women/dresses/z/14.jpeg\thigh\tpink dress\nno tabs here\n")
    queries = root / "test_queries.txt"
    queries.write_text(queries.read_text() + "women/tops/c/4.jpeg women/tops/z/9.jpeg\n")
    assert check_fashion200k(root) == [
        f"{labels}: line 5: detection score 'high' is not a number",
        f"{labels}: line 6: expected 3 TAB-separated fields, got 1",
        f"image '{T}c/5.jpeg': missing file {root / T / 'c' / '5.jpeg'}",
        f"{queries}: line 3: '{T}z/9.jpeg' is not a test image",
    ]
    with pytest.raises(DataFormatError, match=r"dress_train_detect_all\.txt: line 5: detection score"):
        load_fashion200k(root)
