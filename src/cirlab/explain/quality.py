"""How well a model's explanation maps land on the ground-truth edit regions of a split.

For a fixed, seeded sample of queries (with a non-empty mask on the explained side) the map of the
chosen method is scored with the pointing game, energy in mask and PxAP, per edit type, beside two
maps that know nothing: uniform noise and a centre prior. Maps come from the model in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cirlab.data.records import Query
from cirlab.explain.gradcam import method_scalar, mmgrad, upsample_map
from cirlab.explain.metrics import METRICS, MapScores, centre_prior_baseline, random_baseline, score_map, summarise
from cirlab.explain.supervision import EditMasks
from cirlab.image_batches import ImageBatches
from cirlab.models.base import CIRModel


def default_tolerance(height: int) -> float:
    """Pointing-game tolerance scaled to the image: 2 px at 64 px (1/32 of the side). The notes' 15 px
    at 224 px is about 1/15; on CSS's tiny objects that would accept misses two objects away."""
    return height / 32


def _sample(queries: Sequence[Query], masks: EditMasks, count: int, seed: int) -> list[Query]:
    with_mask = [q for q in queries if masks.masks.get((q.reference, q.text, q.target), masks.empty).any()]
    if count >= len(with_mask):
        return with_mask
    chosen = np.random.default_rng(seed).choice(len(with_mask), size=count, replace=False)
    return [with_mask[i] for i in sorted(chosen)]


def explanation_quality(model: CIRModel, queries: Sequence[Query], images: ImageBatches, masks: EditMasks,
                        device: torch.device, method: str = "mmgrad", side: str = "reference",
                        count: int = 1000, tolerance_px: float | None = None, batch_size: int = 64,
                        seed: int = 0) -> dict[str, Any]:
    """Summaries (see `explain.metrics.summarise`) of the method's maps and of the two baselines."""
    scalar = method_scalar(method)
    chosen = _sample(queries, masks, count, seed)
    if not chosen:
        raise ValueError("no query of this split has a non-empty edit mask on the explained side")
    height, width = masks.shape
    tolerance = default_tolerance(height) if tolerance_px is None else tolerance_px
    centre = centre_prior_baseline((height, width))
    scored: dict[str, list[MapScores]] = {method: [], "random": [], "centre_prior": []}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(chosen), batch_size):
            batch = chosen[start:start + batch_size]
            cams = mmgrad(model, images.batch([q.reference for q in batch], device), [q.text for q in batch],
                          images.batch([q.target for q in batch], device), scalar=scalar, side=side)
            maps = upsample_map(cams.detach(), (height, width)).cpu().numpy()
            for offset, (query, saliency) in enumerate(zip(batch, maps)):
                key = (query.reference, query.text, query.target)
                mask, edit = masks.masks[key], masks.edits[key]
                noise = random_baseline((height, width), seed + start + offset)
                for name, candidate in ((method, saliency), ("random", noise), ("centre_prior", centre)):
                    scored[name].append(score_map(candidate, mask, edit, tolerance))
    finally:
        model.train(was_training)
    return {"method": method, "side": side, "queries": len(chosen), "tolerance_px": tolerance,
            "maps": {name: summarise(records) for name, records in scored.items()}}


def explanation_table(quality: dict[str, Any]) -> str:
    """Markdown: one row per map (the method, then the baselines) and edit type, one column per metric."""
    names = {"pointing_game": "pointing game", "energy_in_mask": "energy in mask", "pxap": "PxAP"}
    lines = ["| map | edit | " + " | ".join(names[m] for m in METRICS) + " | n |",
             "|---|---|" + "---:|" * (len(METRICS) + 1)]
    for name, summary in quality["maps"].items():
        for edit, values in summary.items():
            cells = " | ".join(f"{100 * values[m]:.1f}" for m in METRICS)
            lines.append(f"| {name} | {edit} | {cells} | {values['count']} |")
    lines += ["", f"explanations: {quality['method']} on the {quality['side']} image, {quality['queries']} queries, "
              f"pointing-game tolerance {quality['tolerance_px']:g} px; metrics in percent"]
    return "\n".join(lines)
