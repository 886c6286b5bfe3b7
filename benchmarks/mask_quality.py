"""Mask quality: how well each dominant-portion mask source (OFFSET's segmentation step) finds the garment,
as IoU at 0.5 against the generator's ground-truth masks of every image of a synthetic dataset.

Masks missing from the cache (DATA/dominant_masks/SOURCE/) are computed first, as `cirlab data masks` does;
cached ones are scored as they are. CLIPSeg needs local weights (--clipseg-weights), none install offline.

    python benchmarks/mask_quality.py                                       # data/garments-full: saliency, oracle
    python benchmarks/mask_quality.py --data data/garments-demo --sources saliency
    python benchmarks/mask_quality.py --sources clipseg --clipseg-weights PATH/clipseg-rd64-refined
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, publish  # noqa: E402

from cirlab.masks.build import build_masks  # noqa: E402
from cirlab.masks.sources import MASK_SOURCES, create_mask_source  # noqa: E402

COMPUTED_SOURCES = tuple(name for name in MASK_SOURCES if name != "none")  # "none" stores no masks


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/garments-full", help="a generated dataset with ground-truth masks")
    parser.add_argument("--sources", nargs="+", choices=COMPUTED_SOURCES, default=["saliency", "oracle"])
    parser.add_argument("--clipseg-weights", help="local folder of a CLIPSeg model and its processor")
    parser.add_argument("--out", default="runs/bench-mask-quality", help="results.md and results.json go here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rows, details = [], {}
    for name in args.sources:
        source = create_mask_source(name, weights=args.clipseg_weights if name == "clipseg" else None)
        started = time.perf_counter()
        built = build_masks(Path(args.data), source)
        if built.iou is None:
            raise SystemExit(f"{args.data} has no ground-truth masks (DATA/masks/) to score the masks against")
        seconds = time.perf_counter() - started
        iou = built.iou
        rows.append(f"| {name} | {iou.count:,} | {built.computed:,} | {iou.mean:.3f} | {iou.median:.3f} | "
                    f"{iou.p10:.3f} | {seconds:.0f} |")
        details[name] = {"count": iou.count, "computed": built.computed, "mean": iou.mean, "median": iou.median,
                         "p10": iou.p10, "seconds": seconds}
    lines = [f"Mask quality on {args.data}: IoU at 0.5 against the generator's dominant-portion masks", "",
             "| source | images | computed now | mean IoU | median | 10th percentile | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
             f"machine: {describe_machine()}", f"command: {command_line()}"]
    publish(Path(args.out), "\n".join(lines), {"sources": details, "args": vars(args)})


if __name__ == "__main__":
    main()
