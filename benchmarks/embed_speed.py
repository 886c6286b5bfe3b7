"""Embedding speed: images/s of each image tower (backbone + cirlab's GAP head to 512; CLIP towers with
their own projection head instead) at its input size, on the CPU and on CUDA when present (there in float32
and in the training setting: bfloat16 autocast with channels-last). Random weights and pixels: the speed does
not depend on them (and no CLIP weights are available offline, so the CLIP rows say "random init").

    python benchmarks/embed_speed.py                                   # every backbone, 224 px, batch 64
    python benchmarks/embed_speed.py --batch-size 8 --batches 2        # quick look
    python benchmarks/embed_speed.py --size 64                         # at CSS's 64 px instead (not CLIP)
    python benchmarks/embed_speed.py --towers clip:RN50 clip:ViT-B-32   # the CLIP towers only
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, publish  # noqa: E402

from cirlab.acceleration import to_channels_last  # noqa: E402
from cirlab.encoders.image import BACKBONES, ImageEncoder, create_backbone  # noqa: E402

# open_clip configs (cirlab.encoders.clip); their position embeddings fix the input size, so --size skips them.
CLIP_TOWERS: tuple[str, ...] = ("clip:RN50", "clip:ViT-B-32")
TOWERS: tuple[str, ...] = (*BACKBONES, *CLIP_TOWERS)
INPUT_SIZE = {"resnet18": 224, "resnet50": 224, "efficientnet_lite0": 224,  # the ImageNet resolution of each
              "clip:RN50": 224, "clip:ViT-B-32": 224}


@dataclass
class Row:
    tower: str
    device: str
    precision: str
    size: int
    batch: int
    images_per_s: float
    ms_per_batch: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", nargs="+", choices=TOWERS, default=list(TOWERS))
    parser.add_argument("--size", type=int, help="input side in pixels (default: each tower's own)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=10, help="timed batches, after 2 warm-up batches")
    parser.add_argument("--devices", nargs="+", help="default: cpu, and cuda when present")
    parser.add_argument("--out", default="runs/bench-embed-speed", help="results.md and results.json go here")
    args = parser.parse_args()
    if args.batch_size < 1 or args.batches < 1:
        parser.error("--batch-size and --batches must be positive")
    return args


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_encoder(name: str) -> ImageEncoder:
    """The tower at random init: a backbone with the GAP head to 512, a CLIP tower with its own projection."""
    backbone = create_backbone(name, weights=None)
    if name in CLIP_TOWERS:
        return ImageEncoder(backbone, out_dim=backbone.embed_dim, pooling="tower")
    return ImageEncoder(backbone, out_dim=512)


def images_per_second(encoder: ImageEncoder, pixels: torch.Tensor, dtype: torch.dtype | None,
                      batches: int) -> float:
    device = pixels.device
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(2):  # warm-up: cuDNN algorithm choice, allocator, thread pools
            encoder(pixels)
        _synchronise(device)
        started = time.perf_counter()
        for _ in range(batches):
            encoder(pixels)
        _synchronise(device)
    return batches * len(pixels) / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in args.towers:
        size = INPUT_SIZE[name] if name in CLIP_TOWERS else args.size or INPUT_SIZE[name]
        tower = f"{name} (random init)" if name in CLIP_TOWERS else name
        for device in map(torch.device, devices):
            settings = [("float32", None, False)]
            if device.type == "cuda":
                settings.append(("bfloat16 autocast, channels-last", torch.bfloat16, True))
            for label, dtype, channels_last in settings:
                encoder = make_encoder(name).to(device).eval()
                pixels = torch.randn(args.batch_size, 3, size, size, device=device)
                if channels_last:
                    encoder.to(memory_format=torch.channels_last)
                    pixels = to_channels_last(pixels)
                rate = images_per_second(encoder, pixels, dtype, args.batches)
                rows.append(Row(tower, str(device), label, size, args.batch_size, round(rate, 1),
                                round(1000 * args.batch_size / rate, 2)))
                print(rows[-1], flush=True)
    lines = [f"Embedding speed (image tower = backbone + GAP + Linear to 512, CLIP towers with their own "
             f"projection; {args.batches} timed batches)", "",
             "| tower | device | precision | input | batch | images/s | ms/batch |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.tower} | {r.device} | {r.precision} | {r.size} | {r.batch} | {r.images_per_s:,.1f} "
              f"| {r.ms_per_batch:.2f} |" for r in rows]
    lines += ["", f"machine: {describe_machine()}", f"command: {command_line()}"]
    publish(Path(args.out), "\n".join(lines), {"rows": [asdict(row) for row in rows], "args": vars(args)})


if __name__ == "__main__":
    main()
