"""Every script in benchmarks/ runs at a tiny size, so a broken benchmark fails `make test` the day it breaks.

Each runs in this process (as `python benchmarks/NAME.py ARGS` would, with sys.argv set), writes its
results.json, and the test checks the record's provenance and a value the tiny run can be held to."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from cirlab.data.garments import generate_garments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from render_results import parse_tables  # noqa: E402


def run_benchmark(monkeypatch: pytest.MonkeyPatch, name: str, *args: str) -> dict:
    """Run benchmarks/NAME.py with `args` (which must include --out or --work DIR) and return its results.json."""
    monkeypatch.chdir(ROOT)  # recipes are read from configs/ relative to the checkout, as the scripts document
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *args])
    runpy.run_path(f"benchmarks/{name}.py", run_name="__main__")
    out = Path(args[args.index("--out") + 1] if "--out" in args else args[args.index("--work") + 1])
    record = json.loads((out / "results.json").read_text())
    assert record["benchmark"] == name
    assert record["command"] == f"python benchmarks/{name}.py " + " ".join(args)
    assert record["date"][:2] == "20" and record["machine"] and record["commit"]
    assert (out / "results.md").read_text().strip() == record["markdown"].strip()
    return record


def rows(record: dict) -> dict[str, dict[str, str]]:
    """The text cells of each row, joined -> the row's cells, over every table of the record."""
    return {" ".join(row.cells[c] for c in row.text_columns): row.cells for row in parse_tables(record["markdown"])}


def test_css_quality(monkeypatch, tiny_css, tmp_path, one_torch_thread):
    record = run_benchmark(monkeypatch, "css_quality", "--data", str(tiny_css), "--models", "image_only", "tirg",
                           "--seeds", "0", "--iterations", "2", "--out", str(tmp_path / "out"))
    table = rows(record)
    assert set(table) == {"image_only", "tirg"}
    assert all(0 <= float(table[m]["R@1"].split()[0]) <= float(table[m]["R@50"].split()[0]) <= 100 for m in table)
    assert len(record["details"]["runs"]["tirg"]) == 1
    assert "image towers: bundled EfficientNet-Lite0 ImageNet weights (image_only, tirg)" in record["markdown"]


def test_explain_quality_counts_each_seeds_baselines_once(monkeypatch, tiny_css, tmp_path, one_torch_thread):
    record = run_benchmark(monkeypatch, "explain_quality", "--data", str(tiny_css), "--seeds", "0", "1",
                           "--iterations", "2", "--queries", "6", "--out", str(tmp_path / "out"))
    details = record["details"]
    assert {name: len(runs) for name, runs in details["runs"].items()} == {"tirg plain": 2, "tirg mmgrad": 2}
    # One entry per seed: the maps need no model, so plain and MMGrad runs of a seed share them.
    assert {name: len(runs) for name, runs in details["baselines"].items()} == {"random": 2, "centre_prior": 2}
    assert {"tirg plain", "tirg mmgrad", "random map", "centre_prior map"} <= set(rows(record))
    assert "image towers: bundled EfficientNet-Lite0 ImageNet weights (tirg plain, tirg mmgrad)" in record["markdown"]


def test_generator_quality(monkeypatch, tmp_path, one_torch_thread):
    record = run_benchmark(monkeypatch, "generator_quality", "--datasets", "cirr", "--models", "tirg", "--seeds",
                           "0", "--preset", "demo", "--iterations", "2", "--data", str(tmp_path / "data"),
                           "--out", str(tmp_path / "out"))
    assert "cirr val:" in record["markdown"] and set(rows(record)) == {"tirg"}
    assert "image tower: bundled EfficientNet-Lite0 ImageNet weights" in record["markdown"]
    assert (tmp_path / "data" / "cirr-demo" / "generation.json").is_file()


def test_mask_quality_oracle_masks_match_themselves(monkeypatch, tmp_path, one_torch_thread):
    data = generate_garments(tmp_path / "garments", image_size=64, progress=False, families=1)
    record = run_benchmark(monkeypatch, "mask_quality", "--data", str(data), "--sources", "oracle", "saliency",
                           "--out", str(tmp_path / "out"))
    table = rows(record)
    assert table["oracle"]["mean IoU"] == "1.000"
    assert 0 < float(table["saliency"]["mean IoU"]) <= 1


def test_search_speed_exact_rows_have_full_recall(monkeypatch, tmp_path):
    record = run_benchmark(monkeypatch, "search_speed", "--sizes", "1500", "--dim", "16", "--centres", "20",
                           "--topics", "4", "--queries", "40", "--latency-queries", "5", "--gemm-size", "128",
                           "--methods", "numpy", "flat", "ivf", "--out", str(tmp_path / "out"))
    table = [row.cells for row in parse_tables(record["markdown"])]
    exact = [cells for cells in table if cells["setting"] in ("float32 matmul", "exact")]
    assert len(exact) == 2 and all(cells["recall@10"] == "1.000" for cells in exact)
    assert any(cells["method"] == "faiss IVF,Flat" for cells in table)


def test_train_speed(monkeypatch, tiny_css, tmp_path, one_torch_thread):
    record = run_benchmark(monkeypatch, "train_speed", "--data", str(tiny_css), "--models", "tirg", "--devices", "cpu",
                           "--steps", "2", "--warmup", "1", "--profile-steps", "1", "--out", str(tmp_path / "out"))
    table = [row.cells for row in parse_tables(record["markdown"])]
    assert {(cells["model"], cells["images"]) for cells in table} == {("tirg", "cached maps"), ("tirg", "pixels")}
    assert all(float(cells["samples/s"]) > 0 and not cells["error"] for cells in table)


def test_train_speed_paper_rows_count_less_work_with_distinct_images(monkeypatch, tiny_css, tmp_path,
                                                                     one_torch_thread):
    out = tmp_path / "out"
    record = run_benchmark(monkeypatch, "train_speed", "--paper", "--paper-data", str(tiny_css), "--steps", "2",
                           "--warmup", "1", "--without-compile", "--out", str(out))
    table = rows(record)
    two_passes = table["two passes, no switches (the TIRG code's work) float32"]
    distinct = table["distinct images float32"]
    assert float(distinct["GFLOP/step"]) < float(two_passes["GFLOP/step"])  # the pair sampler repeats sources
    assert all(float(cells["samples/s"]) > 0 for cells in table.values() if "samples/s" in cells)
    reused, encoded = (json.loads((out / f"eval-{reuse}.json").read_text())["metrics"] for reuse in (True, False))
    assert reused == pytest.approx(encoded, abs=1e-6)
    assert {"queries from the gallery's features", "every reference encoded"} <= set(table)


def test_embed_speed(monkeypatch, tmp_path, one_torch_thread):
    record = run_benchmark(monkeypatch, "embed_speed", "--towers", "resnet18", "--size", "32", "--batch-size", "2",
                           "--batches", "1", "--devices", "cpu", "--out", str(tmp_path / "out"))
    (cells,) = [row.cells for row in parse_tables(record["markdown"])]
    assert (cells["tower"], cells["input"], cells["batch"]) == ("resnet18", "32", "2")
    assert float(cells["images/s"].replace(",", "")) > 0


def test_serve_load(monkeypatch, tiny_index, tmp_path):
    record = run_benchmark(monkeypatch, "serve_load", "--checkpoint", str(tiny_index.checkpoint), "--images", "30",
                           "--clients", "1", "2", "--requests", "6", "--indexes", "faiss", "milvus-bounded",
                           "--batch-wait-ms", "0", "5", "--work", str(tmp_path / "work"))
    table = [row.cells for row in parse_tables(record["markdown"])]
    assert [(cells["index"], cells["batching"], cells["query"], cells["clients"]) for cells in table] == [
        (index, batching, query, clients) for index in ("FAISS Flat", "Milvus FLAT, Bounded")
        for batching in ("off", "wait 5 ms") for query in ("gallery id", "uploaded image") for clients in ("1", "2")]
    assert all(cells["errors"] == "0" for cells in table)


def test_two_stage_exact_rows_have_full_recall(monkeypatch, tmp_path, one_torch_thread):
    from cirlab.checkpoint import save_checkpoint
    from cirlab.config import load_config
    from cirlab.encoders.text import Vocabulary
    from cirlab.models.registry import create_model

    data = generate_garments(tmp_path / "garments", image_size=64, progress=False, families=1)
    config = load_config(ROOT / "configs/garments/cmap.yaml", [f"data.root={data}", "data.image_size=64",
                                                               "model.image_weights=null", "model.embed_dim=8"])
    save_checkpoint(tmp_path / "cmap", create_model(config.model, Vocabulary.build(["a longer dress"])), config,
                    Vocabulary.build(["a longer dress"]))
    record = run_benchmark(monkeypatch, "two_stage", "--checkpoints", str(tmp_path / "cmap"), "--factories", "Flat",
                           "HNSW8", "--shortlists", "3", "--scale-checkpoint", str(tmp_path / "cmap"), "--sizes",
                           "1000", "--scale-factories", "auto", "--scale-shortlists", "5", "--scale-queries", "3",
                           "--recall-queries", "2",
                           "--work", str(tmp_path / "out"))
    quality = [row.cells for row in parse_tables(record["markdown"]) if "evaluation set" in row.cells]
    exhaustive = [cells for cells in quality if cells["shortlist"].startswith("all")]
    assert {cells["evaluation set"] for cells in exhaustive} == {f"fashioniq-{c} val" for c in ("dress", "shirt",
                                                                                                "toptee")}
    assert len(exhaustive) == 6 and all(cells["recall@10"] == "1.000" for cells in exhaustive)
    assert all(0 <= float(cells["recall@10"]) <= 1 for cells in quality)
    (scale,) = [row.cells for row in parse_tables(record["markdown"]) if "images" in row.cells]
    assert scale["images"] == "1,000" and scale["first stage"] == "IVF32,Flat, nprobe 16"
    assert scale["rows read per query MiB"] == f"{5 * 3 * 8 * 4 / 2**20:.2f}"
