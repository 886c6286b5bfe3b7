"""`cirlab demo`: the whole pipeline on generated data in a few minutes on a CPU.

Generates the demo CSS (unless given), trains image-only, concat and TIRG with the demo recipe,
evaluates each selected checkpoint on the test split, prints the table and writes an HTML report
with training curves and example queries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cirlab.checkpoint import load_checkpoint
from cirlab.config import load_config
from cirlab.data.benchmarks import load_splits
from cirlab.data.css import generate_css
from cirlab.devices import resolve_device
from cirlab.evaluate import css_protocol, embed_split, markdown_table, recall_from_embeddings
from cirlab.files import atomic_write_text
from cirlab.image_batches import ImageBatches, PixelImages
from cirlab.report import plot_training_curves, rank_examples, write_report
from cirlab.train import BEST, METRICS, train

DEMO_MODELS = ("image_only", "concat", "tirg")
EXAMPLE_QUERIES = 6


def run_demo(out: Path, config_path: Path, data_root: Path | None = None) -> dict[str, dict[str, float]]:
    started = time.perf_counter()
    if data_root is None:
        data_root = out / "data"
        if not (data_root / "generation.json").is_file():
            print(f"[1/4] generating the demo CSS dataset in {data_root}")
            generate_css(data_root, preset="demo", seed=0)
    print("[2/4] training " + ", ".join(DEMO_MODELS) + f" with {config_path}")
    image_cache: dict[str, ImageBatches] = {}
    for name in DEMO_MODELS:
        config = load_config(config_path, [f"model.name={name}", f"data.root={data_root}"])
        train(config, out / name, image_cache=image_cache, overwrite=True)  # the demo owns its folder

    print("[3/4] evaluating the selected checkpoints on the test split")
    _, test_split = load_splits(load_config(config_path, [f"data.root={data_root}"]).data)
    test_images = PixelImages(test_split.image_paths)
    generator = torch.Generator().manual_seed(0)
    example_ids = torch.randperm(len(test_split.queries), generator=generator)[:EXAMPLE_QUERIES].tolist()
    results, examples = {}, {}
    for name in DEMO_MODELS:
        checkpoint = load_checkpoint(out / name / BEST)
        device = resolve_device(checkpoint.config.train.device)
        model = checkpoint.model.to(device)
        protocol = css_protocol(checkpoint.config.protocol)
        queries, gallery = embed_split(model, test_split, test_images, device)
        results[name] = recall_from_embeddings(model, queries, gallery, test_split, protocol)
        examples[name] = rank_examples(model.score(queries[example_ids], gallery).cpu(), test_split, example_ids)
    table = markdown_table(results, protocol.describe())
    print(table)

    print("[4/4] writing the report")
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps({"protocol": protocol.describe(), "metrics": results}, indent=2))
    curves = out / "training_curves.png"
    plot_training_curves({name: out / name / METRICS for name in DEMO_MODELS}, curves)
    write_report(out / "report.html", "cirlab demo: composed image retrieval on synthetic CSS", table, curves,
                 test_split, {"tirg": examples["tirg"], "image_only": examples["image_only"]})
    minutes = (time.perf_counter() - started) / 60
    print(f"\nDone in {minutes:.1f} min. Open {out / 'report.html'} for examples and training curves.")
    print("Next steps:\n"
          f"  cirlab eval {out / 'tirg' / BEST}                  # re-evaluate a checkpoint\n"
          "  cirlab data make-css data/css-full --preset full     # TIRG-scale synthetic CSS\n"
          "  cirlab train --config configs/css/tirg.yaml --out runs/tirg  # the paper recipe: a GPU job that\n"
          "      needs torchvision's ImageNet ResNet-18 at weights/resnet18-f37072fd.pth\n"
          "  python benchmarks/css_quality.py --help              # the quality table of docs/results.md")
    return results
