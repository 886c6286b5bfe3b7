"""The TIRG code (github.com/google/tirg) beside cirlab on this CPU: training samples/s over the same steps of the
same recipe, one after the other, test Recall@K after them, and the time of one test evaluation.

The recipe is the TIRG code's CSS defaults (its main.py): TIRG, ResNet-18 from random init, batch 32, SGD lr 0.01
with momentum 0.9 and weight decay 1e-6, soft triplet loss, on the full synthetic CSS (data/css-full, written in
the real CSS layout, which the code reads as it is). cirlab trains configs/css/tirg.yaml, the same recipe, with
model.image_weights=random: once with its defaults and once, for --short-steps, with the code's arithmetic
(train.cpu_amp=false, train.distinct_images=false).

The TIRG code runs unchanged from a local checkout (--tirg-code; nothing is downloaded, none of it is copied here)
through the shims of benchmarks/tirg_shims.py, with its own defaults, among them a data loader with 4 worker
processes and a checkpoint every epoch. The benchmark counts its steps at its optimizer and stops it after the last
one. Its loop also evaluates the train and test splits every third epoch; those evaluations are left out of the
training time (the loop gets a `test` that returns nothing), and the test split is evaluated once at the end with
the code's own test_retrieval.test, timed, beside a timed `cirlab eval` of cirlab's checkpoint. The code sets no
seed; the benchmark seeds torch, numpy and random with --seed, for both sides.

Rates: "steps W+1 to S" is the rate after --warmup steps up to --short-steps; "whole loop" is every step from the
loop's start (data loader start-up and the per-epoch checkpoints included), evaluations left out.

    python benchmarks/official_tirg.py --tirg-code PATH                  # 3,836 steps a side: about an hour here
    python benchmarks/official_tirg.py --tirg-code PATH --steps 60 --short-steps 30   # quick look
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import command_line, describe_machine, publish  # noqa: E402
from tirg_shims import TirgCode, load_tirg_code, tirg_runtime  # noqa: E402
from train_speed import (  # noqa: E402
    EvalRow,
    eval_split,
    limits_line,
    logged_step_seconds,
    machine_limits,
    rate,
)

from cirlab.config import load_config  # noqa: E402
from cirlab.data.css import generate_css  # noqa: E402
from cirlab.train import BEST, train  # noqa: E402

RECIPE = "configs/css/tirg.yaml"
CODE_ARITHMETIC = ["train.cpu_amp=false", "train.distinct_images=false"]
KS = (1, 5, 10, 50)


@dataclass
class TrainRow:
    run: str
    steps: int
    short_rate: float       # samples/s over steps warmup+1 .. short_steps
    loop_rate: float        # samples/s over every step from the loop's start
    recall: dict[str, float]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tirg-code", required=True, help="a local checkout of github.com/google/tirg")
    parser.add_argument("--data", default="data/css-full", help="CSS folder (generated with --preset full if missing)")
    parser.add_argument("--steps", type=int, default=3836, help="training steps of each whole run")
    parser.add_argument("--short-steps", type=int, default=200, help="the early rate is read up to this step")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the early rate's clock starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-official-tirg", help="run folders and the result table")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.short_steps <= args.steps:
        parser.error("need 0 <= --warmup < --short-steps <= --steps")
    return args


def code_version(folder: Path) -> str:
    """The checkout's commit, so that a result names the code it measured."""
    if not (folder / ".git").exists():  # not inside some other repository's work tree either
        return "unknown (not a git checkout)"
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EnoughSteps(Exception):
    """Raised by the counted optimizer step after the last step of the run."""


class StepClock:
    """Wraps an optimizer's step: records when each step ends, and stops the loop after `limit` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, limit: int) -> None:
        self.seconds: list[float] = []
        self.started = time.perf_counter()
        original = optimizer.step

        def counted_step(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.seconds.append(time.perf_counter() - self.started)
            if len(self.seconds) >= limit:
                raise EnoughSteps
            return result

        optimizer.step = counted_step  # type: ignore[method-assign]


class CheckpointOnlyLogger:
    """What the code's train_loop needs of its tensorboardX writer: scalars are dropped, checkpoints go to `folder`."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file_writer = SimpleNamespace(get_logdir=lambda: str(folder))

    def add_scalar(self, *args: Any) -> None:
        pass


def official_run(code: TirgCode, args: argparse.Namespace) -> tuple[TrainRow, float]:
    """Train the code's recipe for --steps steps, then evaluate the test split with its own test; returns the row
    and the evaluation's seconds."""
    saved_argv = sys.argv
    sys.argv = ["main.py", "--dataset_path", str(args.data), "--num_iters", str(args.steps)]
    try:
        opt = code.main.parse_opt()  # the code's own defaults, as its command line gives them
    finally:
        sys.argv = saved_argv
    seed_everything(args.seed)
    with tirg_runtime():
        trainset, testset = code.main.load_dataset(opt)
        model, optimizer = code.main.create_model_and_optimizer(opt, trainset.get_all_texts())
        clock = StepClock(optimizer, args.steps)
        periodic_test = code.test_retrieval.test
        code.test_retrieval.test = lambda *_: []  # the loop's evaluations are not training time
        try:
            code.main.train_loop(opt, CheckpointOnlyLogger(Path(args.out) / "official"), trainset, testset, model,
                                 optimizer)
        except EnoughSteps:
            pass
        finally:
            code.test_retrieval.test = periodic_test
        started = time.perf_counter()
        metrics = dict(periodic_test(opt, model, testset))
        eval_seconds = time.perf_counter() - started
    recall = {f"R@{k}": 100.0 * metrics[f"recall_top{k}_correct_composition"] for k in KS}
    row = TrainRow("the TIRG code (float32, two passes)", len(clock.seconds),
                   rate(clock.seconds, opt.batch_size, args.warmup, args.short_steps),
                   rate(clock.seconds, opt.batch_size, 0, len(clock.seconds)), recall)
    return row, eval_seconds


def cirlab_run(label: str, steps: int, overrides: list[str], args: argparse.Namespace) -> tuple[TrainRow, Path]:
    config = load_config(RECIPE, [f"data.root={args.data}", "model.image_weights=random", "train.device=cpu",
                                  f"train.iterations={steps}", f"train.eval_every={steps}", "train.log_every=1",
                                  f"train.seed={args.seed}", *overrides])
    run = Path(args.out) / f"cirlab-{len(overrides)}-{steps}"
    seed_everything(args.seed)
    train(config, run, progress=False, overwrite=True)
    seconds = logged_step_seconds(run)
    batch = config.train.batch_size
    row = TrainRow(label, len(seconds), rate(seconds, batch, args.warmup, args.short_steps),
                   rate(seconds, batch, 0, len(seconds)), {})
    return row, run / BEST


def table(rows: list[TrainRow], official_eval: float, cirlab_eval: EvalRow, queries: int, gallery: int,
          args: argparse.Namespace, limits: dict[str, float]) -> str:
    official = rows[0]
    lines = [f"The TIRG code and cirlab on this CPU, one after the other: the code's CSS recipe (ResNet-18 from random "
             f"init, batch 32), {args.data}, seed {args.seed}", "",
             f"| run | steps | samples/s, steps {args.warmup + 1}-{args.short_steps} | x the code | "
             "samples/s, whole loop | x the code, whole loop | " + " | ".join(f"R@{k}" for k in KS) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(KS)]
    for row in rows:
        whole = row.steps == official.steps
        cells = [row.run, f"{row.steps}", f"{row.short_rate:.1f}", f"{row.short_rate / official.short_rate:.2f}",
                 f"{row.loop_rate:.1f}" if whole else "", f"{row.loop_rate / official.loop_rate:.2f}" if whole else "",
                 *(f"{row.recall[f'R@{k}']:.1f}" if row.recall else "" for k in KS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test evaluation of each side's last checkpoint ({queries:,} queries, {gallery:,} images), seconds",
              "", "| evaluation | seconds | x the code's time |", "|---|---:|---:|",
              f"| the TIRG code's test_retrieval.test | {official_eval:.1f} | 1.00 |",
              f"| cirlab eval | {cirlab_eval.seconds:.1f} | {cirlab_eval.seconds / official_eval:.2f} |",
              "", f"The TIRG code (commit {code_version(Path(args.tirg_code))}) ran unchanged through "
              "benchmarks/tirg_shims.py (CPU for .cuda(), random-init ResNet-18, Python 2 range, the legacy autograd "
              "Function run by a modern one); its loop's periodic evaluations are left out of its training time.",
              limits_line(limits), f"machine: {describe_machine()}", f"command: {command_line()}"]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    try:  # first: a wrong checkout is named before data generation and an hour of training
        code = load_tirg_code(Path(args.tirg_code))
    except (FileNotFoundError, RuntimeError) as error:
        sys.exit(f"official_tirg.py: {error}")
    data = Path(args.data)
    if not (data / "generation.json").is_file():
        generate_css(data, preset="full", seed=0)
    limits = machine_limits()
    print(limits_line(limits), flush=True)
    official, official_eval = official_run(code, args)
    print(official, f"eval {official_eval:.1f} s", flush=True)
    arithmetic, _ = cirlab_run("cirlab, the code's arithmetic (float32, two passes)", args.short_steps,
                               CODE_ARITHMETIC, args)
    print(arithmetic, flush=True)
    defaults, checkpoint = cirlab_run("cirlab defaults", args.steps, [], args)
    evaluated = eval_split(checkpoint, Path(args.out) / "cirlab-eval", reuse_gallery=True)
    report = json.loads((Path(args.out) / "cirlab-eval.json").read_text())
    defaults.recall = {f"R@{k}": report["metrics"][f"R@{k}"] for k in KS}
    print(defaults, evaluated, flush=True)
    rows = [official, arithmetic, defaults]
    publish(Path(args.out), table(rows, official_eval, evaluated, report["queries"], report["gallery"], args, limits),
            {"rows": [asdict(row) for row in rows], "official_eval_seconds": round(official_eval, 1),
             "cirlab_eval": asdict(evaluated), "gemm_gflops": limits, "args": vars(args)})


if __name__ == "__main__":
    main()
