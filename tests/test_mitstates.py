from collections import Counter

import numpy as np
import pytest
from fixtures.materialise import materialise
from PIL import Image

from cirlab.data.benchmarks import training_split
from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import recall_at_k
from cirlab.data.mitstates import TEST_NOUNS, check_mitstates, load_mitstates

C1, C2, C3 = "ancient castle/c1.jpg", "ancient castle/c2.jpg", "ruined castle/c3.jpg"
T1, T2 = "ripe tomato/t1.jpg", "unripe tomato/t2.jpg"
# Columns: C1, C2, T1, C3, T2; rows: the five queries in order.
SCORES = np.array([
    [0.9, 0.8, 0.1, 0.7, 0.1],   # reference first; target 2nd after removal
    [0.5, 0.99, 0.1, 0.6, 0.1],  # target 1st after removal
    [0.1, 0.1, 0.9, 0.2, 0.3],   # target 1st after removal
    [0.2, 0.3, 0.9, 0.8, 0.5],   # best target (C2) 3rd after removal
    [0.4, 0.4, 0.4, 0.4, 0.4],   # all tied: gallery order puts C1 and C2 ahead of the target T1
])


@pytest.fixture
def root(tmp_path):
    return materialise("mitstates", tmp_path)


def test_split_and_queries_as_tirg(root):
    train, evalset = load_mitstates(root)
    assert len(TEST_NOUNS) == 49
    assert evalset.gallery == [C1, C2, T1, C3, T2]   # "adj castle" and "misc" skipped
    assert [(q.reference, q.text, q.targets) for q in evalset.queries] == [
        (C1, "ruined", frozenset({C3})), (C2, "ruined", frozenset({C3})), (T1, "unripe", frozenset({T2})),
        (C3, "ancient", frozenset({C1, C2})), (T2, "ripe", frozenset({T1}))]
    assert all(q.excluded == frozenset({q.reference}) for q in evalset.queries)
    assert evalset.image_paths[C3] == root / "images" / "ruined castle" / "c3.jpg"
    assert recall_at_k(SCORES, evalset) == pytest.approx({"R@1": 40.0, "R@5": 100.0, "R@10": 100.0})
    assert recall_at_k(SCORES, evalset, ks=(2, 3)) == pytest.approx({"R@2": 60.0, "R@3": 100.0})


def test_train_triplets_pair_two_different_adjectives(root):
    train, _ = load_mitstates(root, seed=5)
    references = [t.reference for t in train.triplets]
    assert references == ["new car/n1.jpg"] * 2 + ["new car/n2.jpg"] * 2 + ["old car/o1.jpg"] * 2
    for first, second in zip(train.triplets[::2], train.triplets[1::2]):
        assert {first.text, second.text} == {"new", "old"}
        for triplet in (first, second):
            assert triplet.target.startswith(f"{triplet.text} car/")
    again = load_mitstates(root, seed=5)[0]
    assert (again.triplets, again.image_paths) == (train.triplets, train.image_paths)


@pytest.fixture
def cars(root):
    """Train noun "car" with three adjectives: new (N1, N2), old (O1), rusty (R1)."""
    (root / "images" / "rusty car").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "rusty car" / "r1.jpg")
    return training_split(load_mitstates(root, seed=5)[0])


N1, N2, O1, R1 = "new car/n1.jpg", "new car/n2.jpg", "old car/o1.jpg", "rusty car/r1.jpg"


def test_two_adjacent_slots_per_train_image(cars):
    references = [cars.redraw.image_ids[q.reference] for q in cars.queries]
    assert references == [N1, N1, N2, N2, O1, O1, R1, R1]
    assert cars.text_groups == [list(range(8))]   # a text-then-pair draw is a uniform draw of slots


def test_draws_are_fresh_tirg_targets_of_the_noun(cars):
    rng = np.random.default_rng(2)
    draws = [cars.draw(0, rng) for _ in range(200)]   # slot of N1
    targets = Counter(cars.redraw.image_ids[q.target] for q in draws)
    # TIRG: adjective uniform over the noun's three (its own included), image uniform within it.
    odds = {N1: 1 / 6, N2: 1 / 6, O1: 1 / 3, R1: 1 / 3}
    assert set(targets) == set(odds)
    for target, p in odds.items():
        assert abs(targets[target] - 200 * p) < 4 * (200 * p * (1 - p)) ** 0.5
    assert all(cars.redraw.image_ids[q.target].startswith(f"{q.text} car/") for q in draws)
    resumed = np.random.default_rng(0)
    resumed.bit_generator.state = np.random.default_rng(2).bit_generator.state
    assert [cars.draw(0, resumed) for _ in range(200)] == draws


def test_a_pair_of_slots_of_one_image_gets_two_adjectives(cars):
    rng = np.random.default_rng(4)
    batch = cars.draw_batch([0, 1] * 300, rng)
    pairs = Counter((first.text, second.text) for first, second in zip(batch[::2], batch[1::2]))
    # TIRG redraws both until they differ: the six ordered pairs of distinct adjectives, alike.
    assert set(pairs) == {(a, b) for a in ("new", "old", "rusty") for b in ("new", "old", "rusty") if a != b}
    assert all(abs(n - 50) < 4 * (300 * 5 / 36) ** 0.5 for n in pairs.values())
    assert all(cars.redraw.image_ids[q.target].startswith(f"{q.text} car/") for q in batch)


def test_check_reports_every_planted_problem(root):
    assert check_mitstates(root) == []
    (root / "images" / "ripe tomato" / "notes.txt").write_text("x")
    (root / "images" / "shiny fan").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "shiny fan" / "f1.jpg")
    (root / "images" / "big red car").mkdir()
    assert check_mitstates(root) == [
        f"{root / 'images' / 'big red car'}: folder name has more than one space (expected '<adj> <noun>')",
        f"{root / 'images' / 'ripe tomato' / 'notes.txt'}: not a .jpg image",
        "test noun 'fan': only one adjective ('shiny'); TIRG needs at least two",
    ]
    with pytest.raises(DataFormatError, match="big red car: folder name has more than one space"):
        load_mitstates(root)


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataFormatError, match="missing image folder"):
        load_mitstates(tmp_path)
