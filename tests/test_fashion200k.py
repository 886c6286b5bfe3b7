from collections import Counter

import numpy as np
import pytest
from fixtures.materialise import materialise

from cirlab.data.benchmarks import training_split
from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import recall_at_k
from cirlab.data.fashion200k import (
    check_fashion200k,
    clean_caption,
    load_fashion200k,
    modification_text,
    parent_captions,
)
from cirlab.data.records import carve_validation

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
    again = load_fashion200k(root, seed=3)[0]
    assert (again.triplets, again.image_paths) == (train.triplets, train.image_paths)


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


# "red dress" has parents "dress" (children red/blue/green dress) and "red" (children red dress, red
# skirt). TIRG's draw for R1: parent 1/2 each; under "dress" blue or green 1/2 each; then an image of the
# caption: B1 1/8, B2 1/8, G1 1/4, S1 1/2. R2 shares the source's caption: never a target.
R1, R2, B1, B2, G1, S1 = (D + f"s/{n}.jpeg" for n in ("r1", "r2", "b1", "b2", "g1", "s1"))
CAPTION = {R1: "red dress", R2: "red dress", B1: "blue dress", B2: "blue dress", G1: "green dress", S1: "red skirt"}
TIRG_ODDS = {B1: 1 / 8, B2: 1 / 8, G1: 1 / 4, S1: 1 / 2}


@pytest.fixture
def sibling_split(root):
    (root / "labels" / "dress_train_detect_all.txt").write_text(
        "".join(f"{path}\t0.9\t{caption}\n" for path, caption in CAPTION.items()))
    return training_split(load_fashion200k(root, seed=1)[0])


def test_draws_are_fresh_tirg_targets_of_the_source(sibling_split):
    split, slot = sibling_split, 0
    assert split.redraw.image_ids[split.queries[slot].reference] == R1   # one slot per image, file order
    assert len(split.queries) == 6
    rng = np.random.default_rng(11)
    draws = [split.draw(slot, rng) for _ in range(200)]
    targets = [split.redraw.image_ids[q.target] for q in draws]
    counts = Counter(targets)
    assert set(counts) == set(TIRG_ODDS)   # R2 (same caption) and R1 itself never drawn
    for target, odds in TIRG_ODDS.items():  # within 4 standard deviations of TIRG's odds
        assert abs(counts[target] - 200 * odds) < 4 * (200 * odds * (1 - odds)) ** 0.5
    for query, target in zip(draws, targets):
        assert query.reference == slot
        assert query.text == modification_text("red dress", CAPTION[target])
        assert len(set(CAPTION[target].split()) ^ {"red", "dress"}) == 2   # one word swapped
    assert len({q.text for q in draws}) == 3


def test_same_rng_state_gives_the_same_draws(sibling_split):
    rng = np.random.default_rng(5)
    [sibling_split.draw(i % 6, rng) for i in range(30)]
    saved = rng.bit_generator.state
    first = [sibling_split.draw(i % 6, rng) for i in range(40)]
    resumed = np.random.default_rng(99)
    resumed.bit_generator.state = saved
    assert [sibling_split.draw(i % 6, resumed) for i in range(40)] == first


def test_every_text_a_draw_can_give_is_listed(sibling_split):
    assert sibling_split.all_texts() == {
        "replace red with blue", "replace red with green", "replace dress with skirt",   # R1, R2
        "replace blue with red", "replace blue with green", "replace green with red", "replace green with blue",
        "replace skirt with dress"}


def test_validation_keeps_its_stored_queries_and_training_redraws(sibling_split):
    train, val = carve_validation(sibling_split, 0.5, seed=0)
    assert train.redraw is sibling_split.redraw and val.redraw is None
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    assert [val.draw(i, rng) for i in range(len(val.queries))] == val.queries
    assert rng.bit_generator.state == before
    slot = 0
    assert len({train.draw(slot, rng).target for _ in range(50)}) > 1
    assert rng.bit_generator.state != before
