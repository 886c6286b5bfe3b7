"""Record types shared by every benchmark reader: one split = images, identities and queries."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Query:
    """A reference image, a modification text and the target image (indices into the split's images)."""

    reference: int
    text: str
    target: int


@dataclass
class RetrievalSplit:
    """Images of one split, their identity labels (hit rule: same label as the target) and queries."""

    name: str
    image_paths: list[Path]
    labels: np.ndarray
    queries: list[Query]
    # Images from this index on are references only, never in the gallery: image gallery_size + i is
    # another render of image i (CSS 2D-to-3D). None: every image is in the gallery.
    gallery_size: int | None = None
    # Queries grouped by identical text, in first-seen order: TIRG's sampler draws a text, then a pair.
    text_groups: list[list[int]] = field(init=False)
    # source image -> indices of its queries, for the second (same source) draw of a pair.
    queries_by_source: dict[int, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        by_text: dict[str, list[int]] = defaultdict(list)
        by_source: dict[int, list[int]] = defaultdict(list)
        for index, query in enumerate(self.queries):
            by_text[query.text].append(index)
            by_source[query.reference].append(index)
        self.text_groups = list(by_text.values())
        self.queries_by_source = dict(by_source)

    def subset(self, name: str, query_indices: list[int]) -> RetrievalSplit:
        """The same images with only the given queries (a validation split shares the gallery)."""
        return RetrievalSplit(name, self.image_paths, self.labels, [self.queries[i] for i in query_indices],
                              self.gallery_size)


def carve_validation(split: RetrievalSplit, fraction: float, seed: int) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Hold out the queries of a random `fraction` of source images as a validation split.

    Splitting by source (not by query) keeps every pair of one source on one side, so the
    validation queries' reference images were never seen as references in training.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    sources = np.array(sorted(split.queries_by_source))
    rng = np.random.default_rng(seed)
    held_out = set(rng.choice(sources, size=max(1, round(fraction * len(sources))), replace=False).tolist())
    train_idx = [i for i, q in enumerate(split.queries) if q.reference not in held_out]
    val_idx = [i for i, q in enumerate(split.queries) if q.reference in held_out]
    return split.subset(f"{split.name}-train", train_idx), split.subset(f"{split.name}-val", val_idx)
