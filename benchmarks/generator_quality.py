"""Generator quality: does each offline generator's data train real models, under its benchmark's own protocol?

For every dataset below the benchmark generates the data when it is missing (seed 0, --preset), trains
each model over several seeds and evaluates its best checkpoint exactly as `cirlab eval` does (the
benchmark's default protocol, stated under the table). A model NAME trains configs/<dataset>/NAME.yaml when
that file exists, else configs/<dataset>/tirg.yaml with model.name=NAME, so baselines share TIRG's recipe.
CIRCO has no training split: its models train on the cirr dataset (its recipes, the same scene drawing) and are
evaluated with --set data.format=circo, as a user evaluates a CIRR checkpoint on the real CIRCO.

    dataset         generator                                   protocol
    garments        cirlab data make-garments (128 px)          FashionIQ val: R@10/R@50 per category, mean
    garments_f200k  the same folder, Fashion200k layout         Fashion200k: R@1/10/50, caption-equality hits
    cirr            cirlab data make-cirr                       CIRR val: R@K, Rsubset@K
    circo           cirlab data make-circo; trained on cirr     CIRCO val: mAP@K over every ground truth, R@K
    css3d           cirlab data make-css --with-3d              CSS 3D-to-3D
    css2d3d         the same folder                             CSS 2D-to-3D (2D references, 3D gallery)

    python benchmarks/generator_quality.py                                  # every dataset, tirg and image_only
    python benchmarks/generator_quality.py --datasets garments --models tirg cmap cmap_no_scl
    python benchmarks/generator_quality.py --datasets garments --models combiner --set train.lr=5e-4
    python benchmarks/generator_quality.py --datasets cirr --preset demo --seeds 0 --iterations 50   # quick look
    python benchmarks/generator_quality.py --datasets circo --iterations 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from css_quality import summarise  # noqa: E402
from machine import command_line, describe_machine, publish  # noqa: E402

from cirlab.config import load_config  # noqa: E402
from cirlab.data.circo_scenes import generate_circo  # noqa: E402
from cirlab.data.cirr_scenes import generate_cirr  # noqa: E402
from cirlab.data.css import generate_css  # noqa: E402
from cirlab.data.garments import generate_garments  # noqa: E402
from cirlab.data.generation import GENERATION_FILE  # noqa: E402
from cirlab.evaluate import evaluate_checkpoint  # noqa: E402
from cirlab.image_batches import ImageBatches  # noqa: E402
from cirlab.train import BEST, train  # noqa: E402


@dataclass(frozen=True)
class Dataset:
    folder: str  # under data/, with the preset appended
    generate: Callable[[Path, str], Path]  # (folder, preset) -> folder
    trained_on: str | None = None  # an evaluation-only benchmark: the dataset whose data and recipes train
    format: str | None = None      # its data.format, given to the evaluation


GARMENTS = Dataset("garments", lambda out, preset: generate_garments(out, preset, seed=0, image_size=128))
CSS_3D = Dataset("css3d", lambda out, preset: generate_css(out, preset, seed=0, with_3d=True))
DATASETS: dict[str, Dataset] = {
    "garments": GARMENTS,
    "garments_f200k": GARMENTS,
    "cirr": Dataset("cirr", lambda out, preset: generate_cirr(out, preset, seed=0)),
    "circo": Dataset("circo", lambda out, preset: generate_circo(out, preset, seed=0), trained_on="cirr",
                     format="circo"),
    "css3d": CSS_3D,
    "css2d3d": CSS_3D,
}
BASE_MODEL = "tirg"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--models", nargs="+", default=["image_only", "tirg"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--preset", choices=["demo", "full"], default="full")
    parser.add_argument("--iterations", type=int, help="training steps (default: each config's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, after the benchmark's own (e.g. train.lr=5e-4)")
    parser.add_argument("--data", default="data", help="where generated datasets are kept")
    parser.add_argument("--out", default="runs/bench-generators", help="run folders and the result table")
    return parser.parse_args()


def dataset_folder(args: argparse.Namespace, name: str) -> Path:
    """The dataset's folder, generated (seed 0, --preset) when it holds no complete generation."""
    dataset = DATASETS[name]
    folder = Path(args.data) / f"{dataset.folder}-{args.preset}"
    if not (folder / GENERATION_FILE).is_file():
        dataset.generate(folder, args.preset)
    return folder


def config_for(args: argparse.Namespace, dataset: str, model: str, root: Path, seed: int):
    own = Path(f"configs/{dataset}/{model}.yaml")
    overrides = [f"data.root={root}", f"train.seed={seed}"]
    if not own.is_file():
        own = Path(f"configs/{dataset}/{BASE_MODEL}.yaml")
        overrides.insert(0, f"model.name={model}")
    if args.iterations:
        overrides += [f"train.iterations={args.iterations}", f"train.eval_every={max(args.iterations // 3, 1)}",
                      f"train.log_every={max(args.iterations // 50, 1)}"]
    return load_config(own, overrides + args.set)


def run_dataset(args: argparse.Namespace, dataset: str) -> tuple[str, dict[str, list[dict[str, float]]]]:
    """Train and evaluate every model on one dataset; returns its table and every run's metrics."""
    root = dataset_folder(args, dataset)
    trained_on = DATASETS[dataset].trained_on
    train_root = dataset_folder(args, trained_on) if trained_on else root
    evaluated_on = [f"data.format={DATASETS[dataset].format}", f"data.root={root}"] if trained_on else None
    # Decoded images and a frozen backbone's maps, computed once and shared by the dataset's runs (training
    # and evaluation; a frozen backbone's test maps are stored in float16 as in training).
    cache: dict[str, ImageBatches] = {}
    results: dict[str, list[dict[str, float]]] = {model: [] for model in args.models}
    seconds: dict[str, list[float]] = {model: [] for model in args.models}
    protocol = ""
    for seed in args.seeds:
        for model in args.models:
            config = config_for(args, trained_on or dataset, model, train_root, seed)
            run = Path(args.out) / dataset / f"{model}-seed{seed}"
            started = time.perf_counter()
            train(config, run, image_cache=cache, overwrite=True)
            seconds[model].append(time.perf_counter() - started)
            result = evaluate_checkpoint(run / BEST, evaluated_on, image_cache=cache)
            results[model].append(result["metrics"])
            protocol = result["protocol_text"]
            print(f"{dataset} seed {seed} {model}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in result["metrics"].items()), flush=True)
    metrics = list(results[args.models[0]][0])
    source = f", trained on {train_root}" if trained_on else ""
    lines = [f"#### {dataset} ({root}{source}), mean ± std over seeds {args.seeds}", "",
             "| model | " + " | ".join(metrics) + " | train s/run |", "|---|" + "---:|" * (len(metrics) + 1)]
    for model in args.models:
        cells = [summarise([run[k] for run in results[model]]) for k in metrics]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {statistics.mean(seconds[model]):.0f} |")
    return "\n".join([*lines, "", protocol]), results


def main() -> None:
    args = parse_args()
    tables, runs = [], {}
    for dataset in args.datasets:
        table, runs[dataset] = run_dataset(args, dataset)
        tables.append(table)
    steps = f"{args.iterations} steps" if args.iterations else "each config's steps"
    overrides = f"; overrides {', '.join(args.set)}" if args.set else ""
    text = "\n\n".join([f"Generator quality ({args.preset} presets, {steps}{overrides})", *tables,
                        f"machine: {describe_machine()}", f"command: {command_line()}"])
    publish(Path(args.out), text, {"runs": runs, "args": vars(args)})


if __name__ == "__main__":
    main()
