"""Explanation-quality metrics of a saliency map against a ground-truth edit mask (NumPy).

Maps are float H x W, masks bool H x W, both at image resolution (upsample maps first, e.g. with
`cirlab.explain.gradcam.upsample_map`). Every metric needs a non-empty mask: records whose side has
no region (e.g. the target of a "remove") are to be left out by the caller, not scored as misses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

METRICS: tuple[str, ...] = ("pointing_game", "energy_in_mask", "pxap")


def _check(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    saliency, mask = np.asarray(saliency, dtype=np.float64), np.asarray(mask)
    if saliency.ndim != 2 or saliency.shape != mask.shape:
        raise ValueError(f"expected an H x W map and mask of the same shape, got {saliency.shape} and {mask.shape}")
    if mask.dtype != bool:
        raise ValueError(f"the mask must be bool, got {mask.dtype}")
    if not mask.any():
        raise ValueError("the mask is empty; leave such records out")
    if not np.isfinite(saliency).all():
        raise ValueError("the map has non-finite values")
    return saliency, mask


def pointing_game(saliency: np.ndarray, mask: np.ndarray, tolerance_px: float = 15.0) -> bool:
    """Hit if the map's maximum lies within ``tolerance_px`` (Euclidean, inclusive) of a mask pixel.

    Ties go to the first maximum in row-major order (``np.argmax``). Inclusive, so tolerance 0 means
    "on the mask"; TorchRay's reference counts distances strictly below the tolerance, which differs
    only for a mask pixel at exactly ``tolerance_px``.
    """
    saliency, mask = _check(saliency, mask)
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    row, col = np.unravel_index(np.argmax(saliency), saliency.shape)
    rows, cols = np.nonzero(mask)
    return bool(((rows - row) ** 2 + (cols - col) ** 2).min() <= tolerance_px ** 2)


def energy_in_mask(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total mass inside the mask ("relevance mass"), for a non-negative map.

    An all-zero map counts as uniform and scores chance, |mask| / (H * W): it prefers no location,
    just like a constant map (which `upsample_map` turns into zeros).
    """
    saliency, mask = _check(saliency, mask)
    if (saliency < 0).any():
        raise ValueError("energy_in_mask needs a non-negative map")
    total = saliency.sum()
    if total == 0:
        return float(mask.mean())
    return float(saliency[mask].sum() / total)


def pixel_average_precision(saliency: np.ndarray, mask: np.ndarray) -> float:
    """PxAP of one map: average precision of the pixels ranked by saliency, with the mask as labels.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct saliency values taken as thresholds, high to
    low, R_0 = 0; pixels of equal saliency enter together, as in sklearn's average_precision_score.
    Unlike the WSOL benchmark's dataset-level histogram PxAP this is exact and per image; in [0, 1].
    """
    saliency, mask = _check(saliency, mask)
    order = np.argsort(-saliency.ravel(), kind="stable")
    scores, labels = saliency.ravel()[order], mask.ravel()[order]
    # The last pixel of each run of equal scores closes one threshold.
    ends = np.append(np.flatnonzero(np.diff(scores)), scores.size - 1)
    true_positives = np.cumsum(labels)[ends]
    precision = true_positives / (ends + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def random_baseline(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Uniform noise in [0, 1): a map with no information, reproducible from ``seed``."""
    return np.random.default_rng(seed).random(shape)


def centre_prior_baseline(shape: tuple[int, int], sigma_fraction: float = 0.25) -> np.ndarray:
    """Gaussian centred on the image (peak 1 at the exact centre), sigma = ``sigma_fraction`` of each
    side: the "objects tend to be in the middle" prior a map should beat."""
    height, width = shape
    rows = (np.arange(height) - (height - 1) / 2) / (sigma_fraction * height)
    cols = (np.arange(width) - (width - 1) / 2) / (sigma_fraction * width)
    return np.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2))


@dataclass(frozen=True)
class MapScores:
    """The three metrics of one map, with the edit type ("add", "remove", "make", ...) of its query."""

    edit: str
    pointing_game: bool
    energy_in_mask: float
    pxap: float


def score_map(saliency: np.ndarray, mask: np.ndarray, edit: str, tolerance_px: float = 15.0) -> MapScores:
    return MapScores(edit, pointing_game(saliency, mask, tolerance_px), energy_in_mask(saliency, mask),
                     pixel_average_precision(saliency, mask))


def _means(records: list[MapScores]) -> dict[str, float]:
    means = {name: float(np.mean([getattr(record, name) for record in records])) for name in METRICS}
    return {**means, "count": len(records)}


def summarise(records: Iterable[MapScores]) -> dict[str, dict[str, float]]:
    """Mean of each metric per edit type, over all records ("overall", micro) and over edit types
    ("macro", each type weighted equally, as the pointing game is usually reported).
    The pointing-game mean is the hit rate."""
    records = list(records)
    if not records:
        raise ValueError("no records to summarise")
    groups: dict[str, list[MapScores]] = {}
    for record in records:
        if record.edit in ("overall", "macro"):
            raise ValueError(f"edit type {record.edit!r} clashes with a summary key")
        groups.setdefault(record.edit, []).append(record)
    summary = {edit: _means(groups[edit]) for edit in sorted(groups)}
    macro = {name: float(np.mean([summary[edit][name] for edit in groups])) for name in METRICS}
    return {**summary, "overall": _means(records), "macro": {**macro, "count": len(records)}}
