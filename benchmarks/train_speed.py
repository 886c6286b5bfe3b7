"""Training speed: samples/s of every registered model on the CPU (and on CUDA when present), with and
without cached backbone features, and a short torch.profiler profile naming the slowest part of a step.

Each row trains `--warmup + --steps` steps of a recipe (configs/css/demo.yaml by default: a frozen
EfficientNet-Lite0 cut after stage 3, flatten pooling, batch 32, the TIRG loss) through cirlab's own
`train`, and reads the steady-state speed from its metrics log (one timestamp per step, warm-up steps
left out). "cached" trains from backbone maps computed once, "pixels" runs the frozen backbone every
step (train.cache_features=false). The profile then replays `--profile-steps` steps of the trained
checkpoint on the same images and data path, timed phase by phase (data, forward, loss, backward,
optimizer; on CUDA each phase ends in a synchronise), and names the op with the most self time.

    python benchmarks/train_speed.py                                   # every model, data/css-demo
    python benchmarks/train_speed.py --models tirg --steps 4 --warmup 1 --profile-steps 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, publish  # noqa: E402

from cirlab.acceleration import autocast_dtype, prepare_model, uses_channels_last  # noqa: E402
from cirlab.checkpoint import load_checkpoint  # noqa: E402
from cirlab.config import Config, load_config  # noqa: E402
from cirlab.data.benchmarks import load_benchmark  # noqa: E402
from cirlab.data.css import generate_css  # noqa: E402
from cirlab.encoders.regions import REGION_CACHE, attach_regions  # noqa: E402
from cirlab.image_batches import CachedMaps, ImageBatches, PixelImages  # noqa: E402
from cirlab.masks.batches import attach_masks  # noqa: E402
from cirlab.models.registry import available_models  # noqa: E402
from cirlab.train import LAST, METRICS, TrainingForward, build_optimizer, compute_loss, make_sampler, train  # noqa: E402

PHASES = ("data", "forward", "loss", "backward", "optimizer")


@dataclass
class Row:
    model: str
    device: str
    images: str
    samples_per_s: float | None
    slowest_phase: str = ""
    top_op: str = ""
    error: str = ""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/css/demo.yaml",
                        help="the recipe every model trains with, unless configs/css/<model>_cpu.yaml exists")
    parser.add_argument("--data", default="data/css-demo", help="CSS folder (generated with --preset demo if missing)")
    parser.add_argument("--models", nargs="+", help="default: every registered model")
    parser.add_argument("--devices", nargs="+", help="default: cpu, and cuda when present")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--out", default="runs/bench-train-speed", help="run folders and the result table")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 1:
        parser.error("--steps and --profile-steps must be positive, --warmup not negative")
    return args


def samples_per_second(run: Path, batch_size: int, warmup: int) -> float:
    """From the per-step timestamps (seconds since the loop started) that `train` logs with log_every=1."""
    seconds = [record["seconds"] for record in map(json.loads, (run / METRICS).read_text().splitlines())
               if "loss" in record]
    start = seconds[warmup - 1] if warmup else 0.0
    return batch_size * (len(seconds) - warmup) / (seconds[-1] - start)


@contextmanager
def phase(name: str, device: torch.device):
    with record_function(name):
        yield
        if device.type == "cuda":  # the phase's kernels finish inside its range
            torch.cuda.synchronize(device)


def training_images(config: Config, model: torch.nn.Module, paths: list[Path], device: torch.device,
                    cache: dict[str, ImageBatches]) -> ImageBatches:
    """What `train` feeds the model: pixels or cached maps, with regions attached for region models (LBF) and
    masks for mask models (OFFSET)."""
    key = f"pixels:{config.data.root}:{config.data.image_size}"
    if key not in cache:
        cache[key] = PixelImages(paths, progress=False, size=config.data.image_size)
    images = pixels = cache[key]
    if config.model.freeze_backbone and config.train.cache_features:
        # Output channels tell one map from a multi-level backbone's several (CMAP), which models cannot share.
        key = f"maps:{device}:{config.model.image_backbone}:{model.image_encoder.backbone.out_channels}"
        if key not in cache:  # every model shares the frozen backbone's bundled weights
            cache[key] = CachedMaps(model.image_encoder, pixels, device, progress=False)
        images = cache[key]
    images = attach_regions(model, images, pixels, paths, Path(config.data.root) / REGION_CACHE, progress=False)
    return attach_masks(model, images, pixels, paths, Path(config.data.root), device, progress=False)


def profile_steps(run: Path, device: torch.device, steps: int, cache: dict[str, ImageBatches]) -> tuple[str, str]:
    """(slowest phase and its share of the step, the op with the most self time and its share)."""
    checkpoint = load_checkpoint(run / LAST)
    config, model = checkpoint.config, checkpoint.model.to(device)
    prepare_model(model, config.train, device)
    split = load_benchmark(config).train
    images = training_images(config, model, split.image_paths, device, cache)
    forward = TrainingForward(model, autocast_dtype(config.train, device), uses_channels_last(config.train, device))
    optimizer = build_optimizer(model, config)
    sampler = make_sampler(config.train.sampler, split, config.train.batch_size, config.train.seed)
    # The model's own objective (CMAP's), as `train` computes it; the configured loss by default.
    loss_fn = partial(model.training_loss, retrieval_loss=partial(compute_loss, config.train.loss,
                                                                  generator=torch.Generator().manual_seed(0)))
    model.train()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            with phase("data", device):
                batch = [split.queries[i] for i in sampler.next_batch()]
                references = images.batch([q.reference for q in batch], device)
                targets = images.batch([q.target for q in batch], device)
            with phase("forward", device):
                queries, candidates = forward(references, [q.text for q in batch], targets)
            with phase("loss", device):
                loss = loss_fn(queries, candidates)
            with phase("backward", device):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with phase("optimizer", device):
                optimizer.step()
    events = profiler.key_averages()
    # On CUDA each phase is recorded twice, on the CPU and as a device annotation with no CPU time: add them.
    phases = {key: sum(event.cpu_time_total for event in events if event.key == key) for key in PHASES}
    slowest = max(phases, key=phases.get)
    ops = [event for event in events if event.key not in PHASES and event.key.startswith("aten::")]
    self_time = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    top = max(ops, key=self_time)
    total = sum(self_time(event) for event in ops)
    return (f"{slowest} ({phases[slowest] / sum(phases.values()):.0%})",
            f"{top.key} ({self_time(top) / total:.0%} of op time)")


def recipe_of(model: str, args: argparse.Namespace) -> str:
    """The model's own CPU recipe (configs/css/<model>_cpu.yaml, e.g. CMAP's three-level backbone) where it has
    one, else --config."""
    own = Path(f"configs/css/{model}_cpu.yaml")
    return str(own) if own.is_file() else args.config


def bench(model: str, device: str, cached: bool, args: argparse.Namespace, train_cache: dict[str, ImageBatches],
          profile_cache: dict[str, ImageBatches]) -> Row:
    images = "cached maps" if cached else "pixels"
    steps = args.warmup + args.steps
    config = load_config(recipe_of(model, args), [
        f"model.name={model}", f"data.root={args.data}", f"train.device={device}",
        f"train.cache_features={str(cached).lower()}", f"train.iterations={steps}", f"train.eval_every={steps}",
        "train.log_every=1", *args.set])
    run = Path(args.out) / f"{model}-{device}-{'cached' if cached else 'pixels'}"
    try:
        train(config, run, progress=False, image_cache=train_cache, overwrite=True)
        rate = samples_per_second(run, config.train.batch_size, args.warmup)
    except Exception as error:  # one model failing must not hide the others' numbers
        traceback.print_exc()
        return Row(model, device, images, None, error=f"{type(error).__name__}: {error}")
    try:
        slowest, top = profile_steps(run, torch.device(device), args.profile_steps, profile_cache)
    except Exception as error:
        traceback.print_exc()
        return Row(model, device, images, round(rate, 1), error=f"profile: {type(error).__name__}: {error}")
    return Row(model, device, images, round(rate, 1), slowest, top)


def main() -> None:
    args = parse_args()
    data = Path(args.data)
    if not (data / "generation.json").is_file():
        generate_css(data, preset="demo", seed=0)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    train_cache: dict[str, ImageBatches] = {}  # decoded images and cached maps, shared by the runs
    profile_cache: dict[str, ImageBatches] = {}
    for device in devices:
        for model in args.models or available_models():
            for cached in (True, False):
                started = time.perf_counter()
                rows.append(bench(model, device, cached, args, train_cache, profile_cache))
                print(f"{rows[-1]} [{time.perf_counter() - started:.0f} s]", flush=True)
    batch = load_config(args.config, args.set).train.batch_size
    lines = [f"Training speed ({args.config} or configs/css/<model>_cpu.yaml, batch {batch}, {args.steps} steps "
             f"after {args.warmup} warm-up steps; "
             f"profile of {args.profile_steps} steps)", "",
             "| model | device | images | samples/s | slowest phase (share of step) | top op | error |",
             "|---|---|---|---:|---|---|---|"]
    for row in rows:
        rate = "" if row.samples_per_s is None else f"{row.samples_per_s:.1f}"
        lines.append(f"| {row.model} | {row.device} | {row.images} | {rate} | {row.slowest_phase} | {row.top_op} "
                     f"| {row.error} |")
    lines += ["", f"machine: {describe_machine()}", f"command: {command_line()}"]
    publish(Path(args.out), "\n".join(lines), {"rows": [asdict(row) for row in rows], "args": vars(args)})


if __name__ == "__main__":
    main()
