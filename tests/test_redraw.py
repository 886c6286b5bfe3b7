"""Training draws as the loop makes them: `split.draw_batch(sampler.next_batch(), sampler.rng)`."""

from collections import Counter

import numpy as np
from fixtures.materialise import materialise
from PIL import Image

from cirlab.data.benchmarks import training_split
from cirlab.data.mitstates import load_mitstates
from cirlab.data.records import Query, RetrievalSplit, carve_validation
from cirlab.train import make_sampler


def test_a_split_without_redraw_gives_its_stored_queries_and_leaves_the_rng_alone():
    queries = [Query(0, "make it red", 1), Query(0, "make it blue", 2), Query(3, "add a cube", 4)]
    split = RetrievalSplit("train", [None] * 5, np.arange(5), queries)
    rng = np.random.default_rng(8)
    before = rng.bit_generator.state
    assert [split.draw(i, rng) for i in (2, 0, 1)] == [queries[2], queries[0], queries[1]]
    assert split.draw_batch([0, 1, 2, 2], rng) == [queries[0], queries[1], queries[2], queries[2]]
    assert rng.bit_generator.state == before
    assert split.text_groups == [[0], [1], [2]]


def _steps(split, sampler, count):
    return [split.draw_batch(sampler.next_batch(), sampler.rng) for _ in range(count)]


def test_the_loop_draws_tirg_pairs_uniformly_over_images_and_resumes_exactly(tmp_path):
    root = materialise("mitstates", tmp_path)
    (root / "images" / "rusty car").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / "rusty car" / "r1.jpg")
    train_part, val_part = carve_validation(training_split(load_mitstates(root, seed=0)[0]), 0.25, seed=0)
    assert len(train_part.queries) == 6 and len(val_part.queries) == 2   # 3 + 1 of the 4 car images
    sampler = make_sampler("pairs", train_part, 4, seed=1)
    batches = _steps(train_part, sampler, 100)
    pairs = [pair for batch in batches for pair in zip(batch[::2], batch[1::2])]
    assert all(first.reference == second.reference and first.text != second.text for first, second in pairs)
    sources = Counter(first.reference for first, _ in pairs)
    assert len(sources) == 3 and all(abs(n - 200 / 3) < 4 * (200 * 2 / 9) ** 0.5 for n in sources.values())
    assert len({(q.reference, q.target) for batch in batches for q in batch}) > 6   # more than the stored ones

    saved = sampler.state()
    expected = _steps(train_part, sampler, 20)
    resumed = make_sampler("pairs", train_part, 4, seed=1)
    resumed.restore(saved)
    assert _steps(train_part, resumed, 20) == expected
