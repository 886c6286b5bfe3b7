import numpy as np
import pytest
import torch

from cirlab.config import ProtocolConfig
from cirlab.data.records import Query, RetrievalSplit, carve_validation
from cirlab.evaluate import css_protocol, markdown_table, recall_at_k, recall_from_embeddings


def test_recall_removes_only_the_reference_and_hits_by_label():
    gallery_labels = torch.tensor([0, 1, 2, 1, 3])
    scores = torch.tensor([
        [0.9, 0.1, 0.5, 0.8, 0.0],   # ref 0 (best) removed; image 3 has the target's label 1 -> hit @1
        [0.0, 0.2, 0.9, 0.1, 0.8],   # ref 4 removed; 2 (label 2), 1 (label 1, target 1) -> hit @2
        [0.3, 0.2, 0.1, 0.0, 0.9],   # ref 1, target label 2: ranks 4, 0, 1(removed) 2 -> hit @3
    ])
    references = torch.tensor([0, 4, 1])
    target_labels = torch.tensor([1, 1, 2])
    recalls = recall_at_k(scores, references, target_labels, gallery_labels, (1, 2, 3), remove_reference=True)
    assert recalls == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})
    kept = recall_at_k(scores, references, target_labels, gallery_labels, (1,), remove_reference=False)
    assert kept == pytest.approx({"R@1": 0.0})


class _Cosine(torch.nn.Module):
    def score(self, queries, gallery):
        return torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(gallery, dim=-1).T


def test_recall_from_embeddings_in_chunks_equals_whole():
    generator = torch.Generator().manual_seed(0)
    gallery = torch.randn(50, 8, generator=generator)
    labels = np.arange(50) % 20
    queries = [Query(reference=i, text="t", target=(i + 7) % 50) for i in range(30)]
    split = RetrievalSplit("test", [None] * 50, labels, queries)
    states = gallery[[(i + 7) % 50 for i in range(30)]] + 0.3 * torch.randn(30, 8, generator=generator)
    protocol = css_protocol(ProtocolConfig(ks=[1, 5]))
    whole = recall_from_embeddings(_Cosine(), states, gallery, split, protocol, query_chunk=1000)
    chunked = recall_from_embeddings(_Cosine(), states, gallery, split, protocol, query_chunk=7)
    assert whole == pytest.approx(chunked)
    assert whole["R@5"] >= whole["R@1"] > 50.0


def test_markdown_table_states_the_protocol():
    protocol = css_protocol(ProtocolConfig(ks=[1, 10]))
    table = markdown_table({"tirg": {"R@1": 73.66, "R@10": 90.0}}, protocol.describe())
    assert "| tirg | 73.7 | 90.0 |" in table
    assert "own reference image removed" in table and "label" in table


def test_validation_is_carved_by_source_image():
    queries = [Query(source, f"edit {k}", 100 + source * 5 + k) for source in range(20) for k in range(5)]
    split = RetrievalSplit("train", [None] * 200, np.arange(200), queries)
    train, val = carve_validation(split, 0.1, seed=3)
    assert len(val.queries) == 2 * 5 and len(train.queries) == 18 * 5
    assert not {q.reference for q in train.queries} & {q.reference for q in val.queries}


def test_css_reports_map_when_asked(tiny_index):
    from cirlab.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(tiny_index.checkpoint, ["protocol.map_ks=[5, 10]"], progress=False)
    assert {"mAP@5", "mAP@10"} <= set(result["metrics"])
    assert all(0.0 <= result["metrics"][key] <= 100.0 for key in ("mAP@5", "mAP@10"))
    assert "mAP@K for K in [5, 10]" in result["protocol_text"]
    assert "mAP@5" not in evaluate_checkpoint(tiny_index.checkpoint, progress=False)["metrics"]


def test_map_ks_is_refused_outside_css(tmp_path):
    from cirlab.config import ConfigError, load_config
    from cirlab.data.benchmarks import load_benchmark

    with pytest.raises(ConfigError, match="protocol.map_ks is offered on CSS"):
        load_benchmark(load_config(None, ["data.format=cirr", f"data.root={tmp_path}", "protocol.map_ks=[5]"]))
