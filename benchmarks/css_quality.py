"""CSS quality: Recall@K of TIRG and its baselines on the `full` synthetic CSS, over several seeds.

CPU recipe (the default, stated in every output): the demo recipe of configs/css/demo.yaml, i.e. a
frozen EfficientNet-Lite0 (bundled ImageNet weights) cut after stage 3 with cached maps, flatten
pooling, TIRG's SGD recipe and soft triplet loss, for --iterations steps. `--recipe paper` trains
configs/css/<model>.yaml instead (ResNet-18 end to end, 160k steps: a GPU job).

    python benchmarks/css_quality.py                       # generates data/css-full if missing
    python benchmarks/css_quality.py --seeds 0 --iterations 500 --models tirg concat   # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine  # noqa: E402

from cirlab.checkpoint import load_checkpoint  # noqa: E402
from cirlab.config import load_config  # noqa: E402
from cirlab.data.benchmarks import load_splits  # noqa: E402
from cirlab.data.css import generate_css  # noqa: E402
from cirlab.data.tensors import CachedMaps, ImageBatches, PixelImages  # noqa: E402
from cirlab.devices import resolve_device  # noqa: E402
from cirlab.evaluate import css_protocol, evaluate_split  # noqa: E402
from cirlab.files import atomic_write_text  # noqa: E402
from cirlab.train import BEST, train  # noqa: E402

MODELS = ("image_only", "text_only", "concat", "tirg")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/css-full", help="CSS folder (generated with --preset full if missing)")
    parser.add_argument("--out", default="runs/bench-css-quality", help="run folders and the result table")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipe", choices=["cpu", "paper"], default="cpu")
    parser.add_argument("--iterations", type=int, default=3000, help="training steps (cpu recipe)")
    return parser.parse_args()


def recipe(args: argparse.Namespace, model: str, seed: int) -> list[str]:
    common = [f"model.name={model}", f"data.root={args.data}", f"train.seed={seed}"]
    if args.recipe == "paper":
        return common
    return common + [f"train.iterations={args.iterations}", f"train.eval_every={max(args.iterations // 3, 1)}",
                     f"train.log_every={max(args.iterations // 100, 1)}"]


def config_path(args: argparse.Namespace, model: str) -> str:
    return "configs/css/demo.yaml" if args.recipe == "cpu" else f"configs/css/{model}.yaml"


def summarise(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main() -> None:
    args = parse_args()
    data = Path(args.data)
    if not (data / "generation.json").is_file():
        generate_css(data, preset="full", seed=0)
    out = Path(args.out)
    cache: dict[str, ImageBatches] = {}
    test_images: dict[str, ImageBatches] = {}
    results: dict[str, list[dict[str, float]]] = {model: [] for model in args.models}
    seconds: dict[str, list[float]] = {model: [] for model in args.models}
    _, test_split = load_splits(load_config(None, [f"data.root={data}"]).data)
    for seed in args.seeds:
        for model in args.models:
            config = load_config(config_path(args, model), recipe(args, model, seed))
            started = time.perf_counter()
            train(config, out / f"{model}-seed{seed}", image_cache=cache, overwrite=True)
            seconds[model].append(time.perf_counter() - started)
            checkpoint = load_checkpoint(out / f"{model}-seed{seed}" / BEST)
            device = resolve_device(config.train.device)
            net = checkpoint.model.to(device)
            if "pixels" not in test_images:
                test_images["pixels"] = PixelImages(test_split.image_paths)
            images = test_images["pixels"]
            if config.model.freeze_backbone and config.train.cache_features:
                if "maps" not in test_images:
                    test_images["maps"] = CachedMaps(net.image_encoder, test_images["pixels"], device)
                images = test_images["maps"]
            metrics = evaluate_split(net, test_split, images, css_protocol(config.protocol), device)
            results[model].append(metrics)
            print(f"seed {seed} {model}: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()), flush=True)

    ks = [key for key in results[args.models[0]][0]]
    lines = [f"CSS quality ({args.recipe} recipe" + (f", {args.iterations} steps" if args.recipe == "cpu" else "")
             + f"), mean ± std over seeds {args.seeds}, test split of {data}",
             "", "| model | " + " | ".join(ks) + " | train s/run |", "|---|" + "---:|" * (len(ks) + 1)]
    for model in args.models:
        cells = [summarise([run[k] for run in results[model]]) for k in ks]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {statistics.mean(seconds[model]):.0f} |")
    lines += ["", css_protocol(load_config(None, []).protocol).describe(),
              f"machine: {describe_machine()}", f"command: {command_line()}"]
    table = "\n".join(lines)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps({"runs": results, "seconds": seconds, "args": vars(args),
                                                       "machine": describe_machine()}, indent=2))


if __name__ == "__main__":
    main()
