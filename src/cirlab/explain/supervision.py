"""Where the attention loss of MMGrad training gets its masks of the edited region.

- `sidecar`: the generator's ground-truth edit regions (`edit_regions.jsonl` next to the data);
- a path: the same format written by any external source the user trusts (a segmentation or
  grounding model run over their data), so real datasets can be supervised too;
- `pixel_diff`: pixels that differ between reference and target. Only meaningful where the two
  images are pixel-aligned (synthetic pairs that re-render one scene); never for real photos.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cirlab.data.records import Query
from cirlab.data.regions import EDIT_REGIONS_FILE, read_edit_regions
from cirlab.explain.gradcam import SIDES

MASK_SOURCES = ("sidecar", "pixel_diff")


class EditMasks:
    """Edit masks of one split's queries, looked up by (reference, text, target); a query without a
    record gets an empty mask, which the attention loss leaves out."""

    def __init__(self, path: Path, split: str, side: str = "reference") -> None:
        if side not in SIDES:
            raise ValueError(f"unknown side {side!r}; known: {', '.join(SIDES)}")
        records = [r for r in read_edit_regions(path) if r.split == split]
        if not records:
            raise ValueError(f"{path}: no edit regions for split {split!r}")
        self.shape = records[0].reference_mask.shape
        self.masks = {(r.reference, r.text, r.target): getattr(r, f"{side}_mask") for r in records}
        self.edits = {(r.reference, r.text, r.target): r.edit for r in records}
        self.empty = np.zeros(self.shape, dtype=bool)

    def coverage(self, queries: Sequence[Query]) -> float:
        """Share of `queries` that have a mask."""
        return sum((q.reference, q.text, q.target) in self.masks for q in queries) / max(len(queries), 1)

    def batch(self, queries: Sequence[Query], device: torch.device | str = "cpu") -> torch.Tensor:
        masks = [self.masks.get((q.reference, q.text, q.target), self.empty) for q in queries]
        return torch.from_numpy(np.stack(masks)).to(device)


def pixel_difference_masks(references: torch.Tensor, targets: torch.Tensor, threshold: float = 0.1,
                           dilation: int = 1) -> torch.Tensor:
    """B x H x W: where any channel of two pixel-aligned image batches (B x 3 x H x W, the same
    normalisation) differs by more than `threshold` x the batch's value range, grown by `dilation` px."""
    span = torch.maximum(references.amax() - references.amin(), targets.amax() - targets.amin()).clamp_min(1e-12)
    changed = ((references - targets).abs().amax(dim=1) > threshold * span).float()
    if dilation:
        changed = F.max_pool2d(changed[:, None], 2 * dilation + 1, stride=1, padding=dilation)[:, 0]
    return changed.bool()


def edit_masks(source: str, data_root: Path, split: str, side: str) -> EditMasks | None:
    """The masks `source` names (None for `pixel_diff`, which is computed per batch)."""
    if source == "pixel_diff":
        return None
    path = Path(data_root) / EDIT_REGIONS_FILE if source == "sidecar" else Path(source)
    if not path.is_file():
        hint = " (generated datasets write it; give a sidecar-format file of your own otherwise)" \
            if source == "sidecar" else ""
        raise FileNotFoundError(f"edit-region masks not found: {path}{hint}")
    return EditMasks(path, split, side)
