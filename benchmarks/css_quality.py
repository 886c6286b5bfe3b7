"""CSS quality: Recall@K of TIRG and its baselines on the `full` synthetic CSS, over several seeds.

CPU recipe (the default, stated in every output): the demo recipe of configs/css/demo.yaml, i.e. a
frozen EfficientNet-Lite0 (bundled ImageNet weights) cut after stage 3 with cached maps, flatten
pooling, TIRG's SGD recipe and soft triplet loss, for --iterations steps. `--recipe paper` trains
configs/css/<model>.yaml instead (ResNet-18 end to end, 160k steps: a GPU job). A model with its own
CPU recipe, configs/css/<model>_cpu.yaml (lbf_big, lbf_small), trains that instead of the demo recipe.
A model named <model>_oracle (e.g. lbf_big_oracle) is <model> fed the generator's own object boxes
(plus the whole image) instead of computed proposals: an upper bound on region quality, labelled so.

    python benchmarks/css_quality.py                       # generates data/css-full if missing
    python benchmarks/css_quality.py --seeds 0 --iterations 500 --models tirg concat   # quick look
    python benchmarks/css_quality.py --models tirg lbf_big lbf_small lbf_big_oracle     # LBF beside TIRG
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, image_towers, publish  # noqa: E402

from cirlab.checkpoint import load_checkpoint  # noqa: E402
from cirlab.config import Config, load_config  # noqa: E402
from cirlab.data.benchmarks import load_splits  # noqa: E402
from cirlab.data.css import generate_css, load_css, object_mask  # noqa: E402
from cirlab.data.regions import mask_box  # noqa: E402
from cirlab.devices import resolve_device  # noqa: E402
from cirlab.encoders.regions import REGION_CACHE, attach_regions, write_region_file  # noqa: E402
from cirlab.evaluate import css_protocol, evaluate_split  # noqa: E402
from cirlab.image_batches import CachedMaps, ImageBatches, PixelImages  # noqa: E402
from cirlab.images import load_image  # noqa: E402
from cirlab.train import BEST, train  # noqa: E402

MODELS = ("image_only", "text_only", "concat", "tirg")
DEMO = "configs/css/demo.yaml"
ORACLE = "_oracle"
ORACLE_NOTE = ("*_oracle rows: the generator's own object boxes (and the whole image) as regions instead of "
               "computed proposals; an upper bound on region quality, not a comparable method")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/css-full", help="CSS folder (generated with --preset full if missing)")
    parser.add_argument("--out", default="runs/bench-css-quality", help="run folders and the result table")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipe", choices=["cpu", "paper"], default="cpu")
    parser.add_argument("--iterations", type=int,
                        help="training steps (default: 3000 with the cpu recipe, the recipe's own with paper)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. model.image_weights=random, train.cpu_amp=false)")
    args = parser.parse_args()
    if args.recipe == "cpu" and args.iterations is None:
        args.iterations = 3000
    return args


def recipe(args: argparse.Namespace, model: str, seed: int) -> list[str]:
    common = [f"data.root={args.data}", f"train.seed={seed}"]
    if config_path(args, model) == DEMO:  # the shared recipe: say which model
        common.insert(0, f"model.name={model}")
    if model.endswith(ORACLE):
        common += ["model.options.regions=boxes", f"model.options.region_dir={oracle_folder(args)}"]
    if args.recipe == "paper" and args.iterations is None:
        return common + args.set
    schedule = [f"train.iterations={args.iterations}", f"train.log_every={max(args.iterations // 100, 1)}"]
    if args.recipe == "cpu":  # the paper recipes keep their own checkpoint selection
        schedule.append(f"train.eval_every={max(args.iterations // 3, 1)}")
    return common + schedule + args.set



def config_path(args: argparse.Namespace, model: str) -> str:
    model = model.removesuffix(ORACLE)
    if args.recipe == "paper":
        return f"configs/css/{model}.yaml"
    own = Path(f"configs/css/{model}_cpu.yaml")
    return str(own) if own.is_file() else DEMO


def oracle_folder(args: argparse.Namespace) -> Path:
    return Path(args.out) / "oracle-boxes"


def write_oracle_boxes(data: Path, folder: Path) -> None:
    """Every image's ground-truth object boxes (after the whole image) as region files for `regions=boxes`."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = load_css(data)
    size = load_image(dataset.test.image_paths[0]).width  # one square size per generated dataset
    for split in (dataset.train, dataset.test):
        for scene, path in zip(split.scenes, split.image_paths, strict=True):
            if not (folder / f"{path.stem}.npz").is_file():
                boxes = [[0, 0, size, size]] + [mask_box(object_mask(obj, size)) for obj in scene]
                write_region_file(folder / f"{path.stem}.npz", np.array(boxes), image_w=size, image_h=size)


def summarise(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def full_css(folder: str) -> Path:
    """The benchmark's CSS folder, generated with the `full` preset (seed 0) when missing."""
    data = Path(folder)
    if not (data / "generation.json").is_file():
        generate_css(data, preset="full", seed=0)
    return data


def main() -> None:
    args = parse_args()
    data = full_css(args.data)
    out = Path(args.out)
    cache: dict[str, ImageBatches] = {}
    test_images: dict[str, ImageBatches] = {}
    results: dict[str, list[dict[str, float]]] = {model: [] for model in args.models}
    seconds: dict[str, list[float]] = {model: [] for model in args.models}
    configs: dict[str, Config] = {}
    _, test_split = load_splits(load_config(None, [f"data.root={data}"]).data)
    if any(model.endswith(ORACLE) for model in args.models):
        write_oracle_boxes(data, oracle_folder(args))
    for seed in args.seeds:
        for model in args.models:
            config = configs[model] = load_config(config_path(args, model), recipe(args, model, seed))
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
                # Keyed by the maps' channels: a multi-level backbone's maps (CMAP) are not another model's.
                key = f"maps:{net.image_encoder.backbone.out_channels}"
                if key not in test_images:
                    test_images[key] = CachedMaps(net.image_encoder, test_images["pixels"], device)
                images = test_images[key]
            images = attach_regions(net, images, test_images["pixels"], test_split.image_paths, data / REGION_CACHE)
            metrics = evaluate_split(net, test_split, images, css_protocol(config.protocol), device)
            results[model].append(metrics)
            print(f"seed {seed} {model}: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()), flush=True)

    ks = [key for key in results[args.models[0]][0]]
    lines = [f"CSS quality ({args.recipe} recipe" + (f", {args.iterations} steps" if args.iterations else "")
             + "".join(f", {setting}" for setting in args.set)
             + f"), mean ± std over seeds {args.seeds}, test split of {data}",
             "", "| model | " + " | ".join(ks) + " | train s/run |", "|---|" + "---:|" * (len(ks) + 1)]
    for model in args.models:
        cells = [summarise([run[k] for run in results[model]]) for k in ks]
        label = f"{model} (oracle boxes)" if model.endswith(ORACLE) else model
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.mean(seconds[model]):.0f} |")
    if any(model.endswith(ORACLE) for model in args.models):
        lines += ["", ORACLE_NOTE]
    lines += ["", css_protocol(load_config(None, []).protocol).describe(), image_towers(configs),
              f"machine: {describe_machine()}", f"command: {command_line()}"]
    publish(out, "\n".join(lines), {"runs": results, "seconds": seconds, "args": vars(args)})


if __name__ == "__main__":
    main()
