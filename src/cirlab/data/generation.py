"""What every synthetic generator shares: argument checks and its output folder.

A generated dataset is complete once `generation.json` (its metadata record) exists; it is written
last and removed first, so a crash always leaves a folder that says it is incomplete.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

GENERATION_FILE = "generation.json"


def check_arguments(kind: str, preset: str, presets: Collection[str], image_size: int, min_image_size: int,
                    count_name: str, count: int | None) -> None:
    """Refuse an unknown preset, a too small image size or a count below 1, naming the generator."""
    if preset not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r} (known: {', '.join(presets)})")
    if image_size < min_image_size:
        raise ValueError(f"image_size must be at least {min_image_size}, got {image_size}")
    if count is not None and count < 1:
        raise ValueError(f"{count_name} must be at least 1, got {count}")


def prepare_output_folder(out: Path, kind: str, ours: Collection[str]) -> Path:
    """Create `out`, refuse it if it holds anything but a (possibly half-written) generated `kind`
    dataset (the names in `ours`, plus hidden .tmp and .old-* leftovers of a crash), and mark it
    incomplete until the generator writes its `generation.json` again."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in out.iterdir() if p.name not in ours and p.name != GENERATION_FILE
               and not (p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith(".old-")))]
    if foreign:
        raise FileExistsError(f"{out}: not empty and not a generated {kind} dataset "
                              f"(found {', '.join(sorted(foreign)[:3])})")
    (out / GENERATION_FILE).unlink(missing_ok=True)
    return out
