import json

import numpy as np
import torch
from PIL import Image

from cirlab.config import ProtocolConfig
from cirlab.data.records import Query, RetrievalSplit
from cirlab.evaluate import css_protocol, markdown_table
from cirlab.report import plot_training_curves, rank_examples, write_report


def _split(tmp_path):
    paths = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(path)
        paths.append(path)
    queries = [Query(0, "make it red", 2), Query(1, "remove <b>", 3)]
    return RetrievalSplit("test", paths, np.array([0, 1, 2, 2]), queries)


def test_rank_examples_drop_the_reference_and_mark_label_hits(tmp_path):
    split = _split(tmp_path)
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0], [0.0, 9.0, 5.0, 1.0]])
    first, second = rank_examples(scores, split, [0, 1], k=2)
    assert first.ranked == [3, 2] and first.hits == [True, True]   # image 3 shares the target's label
    assert second.ranked == [2, 3] and second.hits == [True, True]
    assert rank_examples(torch.tensor([[0.0, 5.0, 1.0, 0.5]]), split, [0], k=1)[0].hits == [False]


def test_report_embeds_table_curves_and_examples(tmp_path):
    split = _split(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [{"config": {}}, {"step": 1, "loss": 0.5},
                                                          {"step": 2, "loss": 0.4}, {"step": 2, "val": {"R@1": 10.0}}]))
    curves = tmp_path / "curves.png"
    plot_training_curves({"tirg": metrics}, curves)
    assert Image.open(curves).size == (1000, 360)
    table = markdown_table({"tirg": {"R@1": 50.0, "R@5": 75.0, "R@10": 100.0, "R@50": 100.0}},
                           css_protocol(ProtocolConfig()).describe())
    examples = rank_examples(torch.tensor([[9.0, 1.0, 2.0, 3.0], [0.0, 9.0, 5.0, 1.0]]), split, [0, 1], k=2)
    out = tmp_path / "report.html"
    write_report(out, "demo", table, curves, split, {"tirg": examples})
    page = out.read_text()
    assert page.count("<img ") == 1 + 2 * (1 + 2)          # curves + per query: reference and 2 results
    assert page.count('class="hit"') == 4
    assert "remove &lt;b&gt;" in page and "<td>50.0</td>" in page and "own reference image removed" in page
