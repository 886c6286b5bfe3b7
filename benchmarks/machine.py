"""What machine, command, date and commit a benchmark ran on, printed with every table and kept in its JSON.

`publish` writes OUT/results.md (the table as printed) and OUT/results.json (the same table, the raw numbers
and where they came from). Copying that JSON to benchmarks/results/NAME.json publishes it: docs/results.md
and the README's summary are generated from those files by benchmarks/render_results.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from cirlab.config import Config
from cirlab.encoders.image import image_initialisation
from cirlab.files import atomic_write_text


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{gpu}, Python {platform.python_version()}")


def gemm_gflops(dtype: torch.dtype = torch.float32, n: int = 4096, repeats: int = 3) -> float:
    """The best of `repeats` n x n matrix products in `dtype` on the CPU with torch's threads: the machine's
    matrix rate, the limit a compute-bound benchmark is measured against."""
    a, b = torch.randn(2, n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    a @ b  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2.0 * n ** 3 / best / 1e9


def image_towers(configs: dict[str, Config]) -> str:
    """How each model's image tower was initialised, for the line under a table: "image towers: bundled
    EfficientNet-Lite0 ImageNet weights (tirg, concat)"; results from differently started towers do not compare."""
    models_by_start: dict[str, list[str]] = {}
    for model, config in configs.items():
        start = image_initialisation(config.model.image_backbone, config.model.image_weights)
        models_by_start.setdefault(start, []).append(model)
    return "image towers: " + "; ".join(f"{start} ({', '.join(models)})" for start, models in models_by_start.items())


def command_line() -> str:
    return "python " + " ".join(sys.argv)


def source_commit() -> str:
    """The commit the benchmark's code came from, "+dirty" when the code or recipes in the work tree differ from
    it (edits to docs and published results do not count: they change no number)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks/*.py", "configs",
                      "pyproject.toml").strip()
        return commit + ("+dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


COMMIT = source_commit()  # read when the benchmark starts: the code it ran, whatever is edited meanwhile


def publish(out: Path, table: str, details: dict[str, Any]) -> None:
    """Print the table, and keep it in OUT/results.md, and in OUT/results.json with the raw numbers, the
    benchmark's name, command, machine, date and commit."""
    print("\n" + table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": Path(sys.argv[0]).stem, "command": command_line(), "machine": describe_machine(),
              "date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": COMMIT,
              "markdown": table, "details": details}
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps(record, indent=2))
