"""Training speed: samples/s of every registered model on the CPU (and on CUDA when present), with and
without cached backbone features, and a short torch.profiler profile naming the slowest part of a step.

Each row trains `--warmup + --steps` steps of a recipe (configs/css/demo.yaml by default: a frozen
EfficientNet-Lite0 cut after stage 3, flatten pooling, batch 32, the TIRG loss) through cirlab's own
`train`, and reads the steady-state speed from its metrics log (one timestamp per step, warm-up steps
left out). "cached" trains from backbone maps computed once, "pixels" runs the frozen backbone every
step (train.cache_features=false). The profile then replays `--profile-steps` steps of the trained
checkpoint on the same images and data path, timed phase by phase (data, forward, loss, backward,
optimizer; on CUDA each phase ends in a synchronise), and names the op with the most self time.

`--paper` measures the TIRG paper recipe instead (configs/css/tirg.yaml: ResNet-18 trained from pixels, batch
32, on the full synthetic CSS; random init, since no ImageNet weights are bundled), one row per speed switch:
float32 with two passes per step (the TIRG code's work), distinct images, bfloat16 autocast, torch.compile.
Each row states its FLOPs per step (torch's FlopCounterMode over forward and backward of real batches) and
their rate as a share of the machine's matrix rate in the row's arithmetic (a 4096^3 GEMM in float32 or
bfloat16): the limit a compute-bound step could reach. It then times `cirlab eval` of the recipe's checkpoint
on the full CSS test split, split into decoding, embedding, scoring and ranking, once as cirlab evaluates
(queries composed from the gallery's features) and once encoding every query's reference image.

    python benchmarks/train_speed.py                                   # every model, data/css-demo
    python benchmarks/train_speed.py --models tirg --steps 4 --warmup 1 --profile-steps 2   # quick look
    python benchmarks/train_speed.py --paper --steps 100 --warmup 10 --out runs/bench-train-speed-paper
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, gemm_gflops, publish  # noqa: E402

from cirlab import evaluate  # noqa: E402
from cirlab.acceleration import (  # noqa: E402
    autocast_dtype,
    cpu_has_native_bfloat16,
    prepare_model,
    uses_channels_last,
)
from cirlab.checkpoint import load_checkpoint  # noqa: E402
from cirlab.cli import main as cli_main  # noqa: E402
from cirlab.config import Config, load_config  # noqa: E402
from cirlab.data.benchmarks import load_benchmark  # noqa: E402
from cirlab.data.css import generate_css  # noqa: E402
from cirlab.encoders.regions import REGION_CACHE, attach_regions  # noqa: E402
from cirlab.encoders.text import Vocabulary  # noqa: E402
from cirlab.image_batches import CachedMaps, ImageBatches, PixelImages  # noqa: E402
from cirlab.masks.batches import attach_masks  # noqa: E402
from cirlab.models.base import VectorCompositionModel  # noqa: E402
from cirlab.models.registry import available_models, create_model  # noqa: E402
from cirlab.train import (  # noqa: E402
    BEST,
    LAST,
    METRICS,
    DistinctImagesForward,
    TrainingForward,
    build_optimizer,
    compute_loss,
    distinct_images,
    make_sampler,
    step_inputs,
    train,
)

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
    parser.add_argument("--paper", action="store_true",
                        help="the TIRG paper recipe's speed switches and its evaluation instead (see above)")
    parser.add_argument("--paper-data", default="data/css-full",
                        help="CSS folder of --paper (generated with --preset full if missing)")
    parser.add_argument("--without-compile", action="store_true",
                        help="leave out --paper's torch.compile row (compiling takes a minute or more)")
    parser.add_argument("--out", default="runs/bench-train-speed", help="run folders and the result table")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 1:
        parser.error("--steps and --profile-steps must be positive, --warmup not negative")
    return args


def logged_step_seconds(run: Path) -> list[float]:
    """Each step's end time (seconds since the loop started), as `train` logs it with log_every=1."""
    return [record["seconds"] for record in map(json.loads, (run / METRICS).read_text().splitlines())
            if "loss" in record]


def rate(seconds: list[float], batch_size: int, first: int, last: int) -> float:
    """Samples/s over steps first+1 .. last, from each step's end time (seconds since the loop started)."""
    start = seconds[first - 1] if first else 0.0
    return batch_size * (last - first) / (seconds[last - 1] - start)


def samples_per_second(run: Path, batch_size: int, warmup: int) -> float:
    """The rate of a `train` run after its first `warmup` steps."""
    seconds = logged_step_seconds(run)
    return rate(seconds, batch_size, warmup, len(seconds))


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
    distinct = distinct_images(config, model, augment_rng=None, attention=None)
    forward = (DistinctImagesForward if distinct else TrainingForward)(
        model, autocast_dtype(config.train, device), uses_channels_last(config.train, device))
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
                inputs = step_inputs([split.queries[i] for i in sampler.next_batch()], images, device, distinct)
            with phase("forward", device):
                queries, candidates = forward(*inputs)
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


PAPER_RECIPE = "configs/css/tirg.yaml"
# One row per speed switch, as overrides of the paper recipe (whose defaults are the last row).
PAPER_VARIANTS: dict[str, list[str]] = {
    "two passes, no switches (the TIRG code's work)": ["train.cpu_amp=false", "train.distinct_images=false"],
    "distinct images": ["train.cpu_amp=false"],
    "bfloat16 autocast": ["train.distinct_images=false"],
    "bfloat16 autocast, torch.compile": ["train.distinct_images=false", "train.compile=true"],
    "bfloat16 autocast, distinct images (the defaults)": [],
}


@dataclass
class PaperRow:
    variant: str
    arithmetic: str
    samples_per_s: float
    gflop_per_step: float
    gflop_per_s: float
    limit_gflop_per_s: float


@dataclass
class EvalRow:
    path: str
    seconds: float  # the whole `cirlab eval`
    phases: dict[str, float]


def paper_config(data: Path, overrides: list[str], args: argparse.Namespace) -> Config:
    steps = args.warmup + args.steps
    return load_config(PAPER_RECIPE, [f"data.root={data}", "model.image_weights=random", "train.device=cpu",
                                      f"train.iterations={steps}", f"train.eval_every={steps}", "train.log_every=1",
                                      *overrides, *args.set])


def step_gflop(config: Config, cache: dict[str, ImageBatches], batches: int = 4) -> float:
    """GFLOPs of one training step as `train` runs it (forward, loss and backward of the recipe's own batches,
    counted by FlopCounterMode; the optimizer's elementwise update is left out), averaged over `batches`."""
    split = load_benchmark(config).train
    device = torch.device("cpu")
    model = create_model(config.model, Vocabulary.build(split.all_texts())).train()
    images = training_images(config, model, split.image_paths, device, cache)
    distinct = distinct_images(config, model, augment_rng=None, attention=None)
    forward = (DistinctImagesForward if distinct else TrainingForward)(model, autocast_dtype(config.train, device))
    sampler = make_sampler(config.train.sampler, split, config.train.batch_size, config.train.seed)
    loss_fn = partial(compute_loss, config.train.loss, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        for _ in range(batches):
            queries, candidates = forward(*step_inputs([split.queries[i] for i in sampler.next_batch()], images,
                                                       device, distinct))
            model.training_loss(queries, candidates, loss_fn).backward()
    return counter.get_total_flops() / batches / 1e9


def arithmetic(config: Config) -> str:
    device = torch.device("cpu")
    dtype = autocast_dtype(config.train, device)
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    return name + (", NHWC" if uses_channels_last(config.train, device) else "")


def paper_rows(args: argparse.Namespace, data: Path, limits: dict[str, float]) -> list[PaperRow]:
    rows = []
    train_cache: dict[str, ImageBatches] = {}
    flop_cache: dict[str, ImageBatches] = {}
    for variant, overrides in PAPER_VARIANTS.items():
        if args.without_compile and "train.compile=true" in overrides:
            continue
        config = paper_config(data, overrides, args)
        run = Path(args.out) / f"paper-{len(rows)}"
        started = time.perf_counter()
        train(config, run, progress=False, image_cache=train_cache, overwrite=True)
        rate = samples_per_second(run, config.train.batch_size, args.warmup)
        gflop = step_gflop(config, flop_cache)
        kind = arithmetic(config)
        rows.append(PaperRow(variant, kind, round(rate, 1), round(gflop, 1),
                             round(rate / config.train.batch_size * gflop, 1), limits[kind.split(",")[0]]))
        print(f"{rows[-1]} [{time.perf_counter() - started:.0f} s]", flush=True)
    return rows


@contextmanager
def timing(module: Any, name: str, seconds: dict[str, float], phase_name: str):
    """Adds the time spent in `module.name` to seconds[phase_name] while the block runs."""
    original = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[phase_name] += time.perf_counter() - started

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, original)


def eval_split(checkpoint: Path, out: Path, reuse_gallery: bool) -> EvalRow:
    """`cirlab eval` of `checkpoint`, timed as a whole and phase by phase: decoding (PixelImages), embedding
    (the image tower over the gallery), scoring (the rest of score_evalset: query states and the score matrix)
    and ranking (Recall@K from the scores). Without `reuse_gallery`, every query's reference is encoded again."""
    seconds = dict.fromkeys(("decoding", "embedding", "scoring", "ranking"), 0.0)
    with ExitStack() as stack:
        for name, phase_name in (("PixelImages", "decoding"), ("embed_targets", "embedding"),
                                 ("score_evalset", "scoring"), ("evalset_recall_at_k", "ranking")):
            stack.enter_context(timing(evaluate, name, seconds, phase_name))
        composes = VectorCompositionModel.composes_image_features
        VectorCompositionModel.composes_image_features = reuse_gallery
        stack.callback(setattr, VectorCompositionModel, "composes_image_features", composes)
        started = time.perf_counter()
        assert cli_main(["eval", str(checkpoint), "--out", str(out)]) == 0
        total = time.perf_counter() - started
    seconds["scoring"] -= seconds["embedding"]  # score_evalset embeds the gallery first
    seconds["other"] = total - sum(seconds.values())
    label = "queries from the gallery's features" if reuse_gallery else "every reference encoded"
    return EvalRow(label, round(total, 1), {key: round(value, 1) for key, value in seconds.items()})


def machine_limits() -> dict[str, float]:
    """The CPU's matrix rate in each arithmetic a step can run in, GFLOP/s."""
    return {"float32": round(gemm_gflops(torch.float32), 1), "bfloat16": round(gemm_gflops(torch.bfloat16), 1)}


def limits_line(limits: dict[str, float]) -> str:
    return (f"the machine's limit: GEMM (4096^3, torch, CPU) float32 {limits['float32']:.0f} GFLOP/s, bfloat16 "
            f"{limits['bfloat16']:.0f} GFLOP/s; native bfloat16: {cpu_has_native_bfloat16()}")


def paper_main(args: argparse.Namespace) -> None:
    data = Path(args.paper_data)
    if not (data / "generation.json").is_file():
        generate_css(data, preset="full", seed=0)
    limits = machine_limits()
    print(limits_line(limits), flush=True)
    rows = paper_rows(args, data, limits)
    checkpoint = Path(args.out) / f"paper-{len(rows) - 1}" / BEST
    evals = [eval_split(checkpoint, Path(args.out) / f"eval-{reuse}", reuse) for reuse in (True, False)]
    first = rows[0].samples_per_s
    test = load_benchmark(paper_config(data, [], args)).evalsets[0]
    lines = [f"TIRG paper recipe from pixels ({PAPER_RECIPE}: ResNet-18 from random init, batch 32, {data}; "
             f"{args.steps} steps after {args.warmup} warm-up steps), CPU", "",
             "| switches | arithmetic | samples/s | x first row | GFLOP/step | GFLOP/s | share of the GEMM rate |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.variant} | {row.arithmetic} | {row.samples_per_s:.1f} | {row.samples_per_s / first:.2f} "
                     f"| {row.gflop_per_step:.1f} | {row.gflop_per_s:.1f} "
                     f"| {row.gflop_per_s / row.limit_gflop_per_s:.0%} of {row.limit_gflop_per_s:.0f} |")
    lines += ["", f"`cirlab eval` of the last row's checkpoint on the test split ({len(test.queries):,} queries, "
              f"{len(test.gallery):,} gallery images), seconds", "",
              "| path | total | decoding | embedding | scoring | ranking | other |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in evals:
        lines.append(f"| {row.path} | {row.seconds:.1f} | " + " | ".join(f"{row.phases[key]:.1f}" for key in
                                                                          ("decoding", "embedding", "scoring",
                                                                           "ranking", "other")) + " |")
    lines += ["", limits_line(limits), f"machine: {describe_machine()}", f"command: {command_line()}"]
    publish(Path(args.out), "\n".join(lines), {"rows": [asdict(row) for row in rows],
                                               "eval": [asdict(row) for row in evals], "gemm_gflops": limits,
                                               "args": vars(args)})


def main() -> None:
    args = parse_args()
    if args.paper:
        paper_main(args)
        return
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
    limits = machine_limits()
    lines += ["", limits_line(limits), f"machine: {describe_machine()}", f"command: {command_line()}"]
    publish(Path(args.out), "\n".join(lines), {"rows": [asdict(row) for row in rows], "gemm_gflops": limits,
                                               "args": vars(args)})


if __name__ == "__main__":
    main()
