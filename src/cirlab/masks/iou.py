"""How well a mask source finds the dominant portion: IoU against ground-truth masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

THRESHOLD = 128  # a pixel of a soft uint8 mask is "in" from this value (0.5) up


def mask_iou(predicted: np.ndarray, truth: np.ndarray, threshold: int = THRESHOLD) -> float:
    """Intersection over union of two uint8 masks, each binarised at `threshold` (pixel >= threshold is in).

    Two empty masks agree perfectly: 1.0."""
    if predicted.shape != truth.shape:
        raise ValueError(f"masks of different sizes cannot be compared: {predicted.shape} vs {truth.shape}")
    a, b = predicted >= threshold, truth >= threshold
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


@dataclass(frozen=True)
class IoUSummary:
    count: int
    mean: float
    median: float
    p10: float       # 10th percentile: how bad the bad cases are

    @classmethod
    def of(cls, ious: Sequence[float]) -> IoUSummary:
        if not ious:
            raise ValueError("no IoU values to summarise")
        values = np.asarray(ious, dtype=np.float64)
        return cls(len(values), float(values.mean()), float(np.median(values)), float(np.percentile(values, 10)))

    def describe(self) -> str:
        return (f"IoU at 0.5 over {self.count} images: mean {self.mean:.3f}, median {self.median:.3f}, "
                f"10th percentile {self.p10:.3f}")
