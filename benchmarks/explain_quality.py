"""Explanation quality: do MMGrad-trained models look where the text asks for a change?

On the `full` synthetic CSS, each model is trained with the CPU recipe of css_quality.py twice per
seed: plainly, and with the MMGrad attention loss (`train.mmgrad.weight`, AMC margin form, masks from
the generator's edit regions). Reported per run: test R@1 (full test split) and, on a fixed sample
of test queries, the MMGrad map's pointing game, energy in mask and PxAP (macro over edit types),
beside the random and centre-prior maps, which need no model; a second table splits them by edit type.

    python benchmarks/explain_quality.py                                 # tirg, weight 0.01, 3 seeds, 1500 steps
    python benchmarks/explain_quality.py --seeds 0 --iterations 300      # quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from css_quality import config_path, full_css, recipe, summarise  # noqa: E402
from machine import command_line, describe_machine, image_towers, publish  # noqa: E402

from cirlab.checkpoint import load_checkpoint  # noqa: E402
from cirlab.config import Config, load_config  # noqa: E402
from cirlab.data.benchmarks import load_splits  # noqa: E402
from cirlab.data.regions import EDIT_REGIONS_FILE  # noqa: E402
from cirlab.devices import resolve_device  # noqa: E402
from cirlab.evaluate import css_protocol, evaluate_split  # noqa: E402
from cirlab.explain.metrics import METRICS  # noqa: E402
from cirlab.explain.quality import explanation_quality  # noqa: E402
from cirlab.explain.supervision import EditMasks  # noqa: E402
from cirlab.image_batches import CachedMaps, ImageBatches, PixelImages  # noqa: E402
from cirlab.train import BEST, train  # noqa: E402

NAMES = {"pointing_game": "pointing game", "energy_in_mask": "energy in mask", "pxap": "PxAP"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/css-full", help="CSS folder (generated with --preset full if missing)")
    parser.add_argument("--out", default="runs/bench-explain-quality", help="run folders and the result table")
    parser.add_argument("--models", nargs="+", default=["tirg"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=1500, help="training steps (cpu recipe)")
    parser.add_argument("--weight", type=float, default=0.01,
                        help="lambda of the attention loss (0.01 keeps TIRG's R@1 within a point; LBF takes 0.05)")
    parser.add_argument("--queries", type=int, default=1000, help="test queries scored for explanations")
    parser.add_argument("--recipe", choices=["cpu"], default="cpu")  # css_quality's helpers read it
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, after the recipe's (e.g. train.amp=false)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    data = full_css(args.data)
    out = Path(args.out)
    _, test_split = load_splits(load_config(None, [f"data.root={data}"]).data)
    masks = EditMasks(data / EDIT_REGIONS_FILE, "test")
    cache: dict[str, ImageBatches] = {}
    test_images: dict[str, ImageBatches] = {"pixels": PixelImages(test_split.image_paths)}
    variants = {"plain": [], "mmgrad": [f"train.mmgrad.weight={args.weight}"]}
    runs: dict[str, list[dict]] = {}
    baselines: dict[str, list[dict]] = {}
    configs: dict[str, Config] = {}
    for seed in args.seeds:
        for model in args.models:
            for variant, extra in variants.items():
                name = f"{model}-{variant}-seed{seed}"
                config = configs[f"{model} {variant}"] = load_config(config_path(args, model),
                                                                   recipe(args, model, seed) + extra + args.set)
                started = time.perf_counter()
                train(config, out / name, image_cache=cache, overwrite=True)
                seconds = time.perf_counter() - started
                device = resolve_device(config.train.device)
                net = load_checkpoint(out / name / BEST).model.to(device)
                if "maps" not in test_images:
                    test_images["maps"] = CachedMaps(net.image_encoder, test_images["pixels"], device)
                images = test_images["maps"]
                recall = evaluate_split(net, test_split, images, css_protocol(config.protocol), device)
                quality = explanation_quality(net, test_split.queries, images, masks, device, count=args.queries,
                                              seed=seed)
                runs.setdefault(f"{model} {variant}", []).append(
                    {"R@1": recall["R@1"], "seconds": seconds, "per_edit": quality["maps"]["mmgrad"]})
                if (model, variant) == (args.models[0], "plain"):
                    # The baselines need no model and use the seed's query sample: one entry per seed, not per run.
                    for baseline in ("random", "centre_prior"):
                        baselines.setdefault(baseline, []).append(quality["maps"][baseline])
                print(f"{name}: R@1 {recall['R@1']:.1f}, " + ", ".join(
                    f"{NAMES[m]} {100 * quality['maps']['mmgrad']['macro'][m]:.1f}" for m in METRICS), flush=True)
        # The table of the seeds done so far, so that a stopped run keeps them (the title names those seeds).
        publish(out, table(args, data, args.seeds[:args.seeds.index(seed) + 1], runs, baselines, image_towers(configs)),
                {"runs": runs, "baselines": baselines, "args": vars(args)})


def metric_cells(summaries: list[dict], edit: str) -> list[str]:
    """Mean ± std over runs of each metric (in percent) of one edit type of `explain.metrics.summarise`."""
    return [summarise([100 * summary[edit][m] for summary in summaries]) for m in METRICS]


def table(args: argparse.Namespace, data: Path, seeds: list[int], runs: dict[str, list[dict]],
          baselines: dict[str, list[dict]], towers: str) -> str:
    """The result table over `seeds` (the runs done so far), with its protocol, machine and command."""
    header = "| model | R@1 | " + " | ".join(NAMES[m] for m in METRICS) + " | train s/run |"
    overrides = f"; overrides {', '.join(args.set)}" if args.set else ""
    lines = [f"Explanation quality on {data} (cpu recipe, {args.iterations} steps; attention loss weight "
             f"{args.weight}, AMC margin form{overrides}), mean ± std over seeds {seeds}", "", header,
             "|---|" + "---:|" * (len(METRICS) + 2)]
    for name, results in runs.items():
        cells = [summarise([r["R@1"] for r in results])] + metric_cells([r["per_edit"] for r in results], "macro")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(r['seconds'] for r in results):.0f} |")
    for baseline, summaries in baselines.items():
        lines.append(f"| {baseline} map | - | " + " | ".join(metric_cells(summaries, "macro")) + " | - |")
    lines += ["", "Per edit type (same runs and queries):", "",
              "| map | edit | " + " | ".join(NAMES[m] for m in METRICS) + " |", "|---|---|" + "---:|" * len(METRICS)]
    maps = {name: [r["per_edit"] for r in results] for name, results in runs.items()}
    maps |= {f"{baseline} map": summaries for baseline, summaries in baselines.items()}
    for name, summaries in maps.items():
        for edit in (key for key in summaries[0] if key not in ("overall", "macro")):
            lines.append(f"| {name} | {edit} | " + " | ".join(metric_cells(summaries, edit)) + " |")
    lines += ["", f"explanations: MMGrad (diff_thresh scalar) on the reference image, in eval mode; {args.queries} "
              "sampled test queries per run; pointing-game tolerance 2 px at 64 px; metrics in percent, macro mean "
              "over the edit types add, remove, make", css_protocol(load_config(None, []).protocol).describe(), towers,
              f"machine: {describe_machine()}", f"command: {command_line()}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
