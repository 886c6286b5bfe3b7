"""Building a dataset's mask cache, and scoring it against the generator's ground truth."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cirlab.masks.cache import MASKS_FOLDER, MaskCache, read_mask
from cirlab.masks.iou import IoUSummary, mask_iou
from cirlab.masks.sources import GROUND_TRUTH_FOLDER, MaskSource, ground_truth_path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def dataset_images(root: Path) -> list[Path]:
    """Every png/jpg/jpeg under `root`, sorted; the mask folders and hidden folders (caches) are not images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    skipped = {MASKS_FOLDER, GROUND_TRUTH_FOLDER}
    images = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if (path.suffix.lower() in IMAGE_SUFFIXES and parts[0] not in skipped
                and not any(part.startswith(".") for part in parts) and path.is_file()):
            images.append(path)
    return sorted(images)


def ensure_masks(cache: MaskCache, source: MaskSource, images: Sequence[Path], progress: bool = True) -> int:
    """Compute and write the masks of `images` that `cache` lacks; returns how many were missing.

    Hard links to one file (the garments generator links its two layouts' photos) are computed once."""
    missing = [image for image in images if not cache.has(image)]
    if not missing:
        return 0
    if not source.can_compute:
        raise ValueError(f"{len(missing)} image(s) have no {source.name} mask in {cache.folder} (first: "
                         f"{missing[0]}): {source.missing_hint()}")
    same_file: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for image in missing:
        stat = os.stat(image)
        same_file[(stat.st_dev, stat.st_ino)].append(image)
    groups = list(same_file.values())
    masks = source.compute(cache.root, [group[0] for group in groups])
    for group, mask in tqdm(zip(groups, masks), total=len(groups), desc=f"{source.name} masks", unit="img",
                            disable=not progress):
        for image in group:
            cache.write(image, mask)
    return len(missing)


def ground_truth_iou(cache: MaskCache, images: Sequence[Path], progress: bool = True) -> IoUSummary | None:
    """IoU of the cached masks of `images` against the generator's masks; None when no image has one."""
    pairs = [(image, truth) for image in images if (truth := ground_truth_path(cache.root, image)) is not None]
    if not pairs:
        return None
    return IoUSummary.of([mask_iou(cache.read(image), read_mask(truth))
                          for image, truth in tqdm(pairs, desc="IoU", unit="img", disable=not progress)])


@dataclass(frozen=True)
class MaskBuild:
    folder: Path
    computed: int                # masks written now
    cached: int                  # masks that were there already
    iou: IoUSummary | None       # against the ground truth, where the dataset has it


def build_masks(root: Path, source: MaskSource, overwrite: bool = False, progress: bool = True) -> MaskBuild:
    """One `source` mask per image of the dataset at `root`, cached in root/dominant_masks/<source>/
    (see `cirlab.masks.cache`); existing masks are kept unless `overwrite`. Scored against the
    generator's masks when the dataset has them."""
    if not source.can_compute:
        raise ValueError(f"the {source.name} source cannot compute masks as configured: {source.missing_hint()}")
    images = dataset_images(root)
    if not images:
        raise ValueError(f"no images (png, jpg, jpeg) under {root}")
    cache = MaskCache(root, source.name)
    cache.prepare(source.settings(), overwrite)
    computed = ensure_masks(cache, source, images, progress)
    return MaskBuild(cache.folder, computed, len(images) - computed, ground_truth_iou(cache, images, progress))
