"""What machine and command a benchmark ran on, printed with every table."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

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


def command_line() -> str:
    return "python " + " ".join(sys.argv)


def publish(out: Path, table: str, details: dict[str, Any]) -> None:
    """Print the table, and keep it in OUT/results.md with the raw numbers (and the machine) in results.json."""
    print("\n" + table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps({**details, "machine": describe_machine()}, indent=2))
