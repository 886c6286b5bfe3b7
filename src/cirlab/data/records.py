"""Record types shared by every benchmark reader: one split = images, identities and queries."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

Option = TypeVar("Option")


class Pick(Protocol):
    """Picks one of `options` uniformly: `random.Random.choice`, or `uniform_pick(numpy_generator)`."""

    def __call__(self, options: Sequence[Option]) -> Option: ...


def uniform_pick(rng: np.random.Generator) -> Pick:
    """A `Pick` drawing from a NumPy generator (the training sampler's, whose state is checkpointed)."""
    def pick(options: Sequence[Option]) -> Option:
        return options[int(rng.integers(len(options)))]
    return pick


class TargetDraws(ABC):
    """Every valid (text, target) of each training source image, held in the reader's own index (never
    as a list of every pair), and random draws from it by the reader's rule. Images are the reader's ids."""

    @abstractmethod
    def images(self) -> Iterable[str]:
        """Every image id a draw can name, as source or target."""

    @abstractmethod
    def draw(self, source: str, pick: Pick) -> tuple[str, str]:
        """(text, target id) for the image `source`, by the reader's sampling rule."""

    @abstractmethod
    def texts(self, source: str) -> frozenset[str]:
        """Every text a draw for `source` can give."""


@dataclass(frozen=True)
class Query:
    """A reference image, a modification text and the target image (indices into the split's images)."""

    reference: int
    text: str
    target: int


@dataclass
class Redraw:
    """A training split's fresh draws: its reader's `TargetDraws` over the split's image order."""

    draws: TargetDraws
    image_ids: list[str]                          # split image index -> reader id
    index: dict[str, int] = field(init=False)     # reader id -> split image index

    def __post_init__(self) -> None:
        self.index = {image: position for position, image in enumerate(self.image_ids)}

    def query(self, reference: int, rng: np.random.Generator, unlike: str | None = None) -> Query:
        """A fresh query of `reference`; with `unlike`, one whose text differs from it (rejection, as
        TIRG's pairs), unless every text of the source is that one."""
        source, pick = self.image_ids[reference], uniform_pick(rng)
        text, target = self.draws.draw(source, pick)
        if unlike is not None and text == unlike and self.draws.texts(source) - {unlike}:
            while text == unlike:
                text, target = self.draws.draw(source, pick)
        return Query(reference, text, self.index[target])


@dataclass
class RetrievalSplit:
    """Images of one split, their identity labels (hit rule: same label as the target) and queries.

    With `redraw` (Fashion200k and MIT-States training, as TIRG), each query is one slot of its reference
    image: the stored text and target are one seeded draw (what validation scores), and `draw` gives a
    fresh one each time the slot is sampled.
    """

    name: str
    image_paths: list[Path]
    labels: np.ndarray
    queries: list[Query]
    # Images from this index on are references only, never in the gallery: image gallery_size + i is
    # another render of image i (CSS 2D-to-3D). None: every image is in the gallery.
    gallery_size: int | None = None
    redraw: Redraw | None = None
    # Per query, the texts a training draw picks from uniformly (CLIP4Cir's random caption order); None: fixed.
    text_variants: list[tuple[str, ...]] | None = None
    # Queries grouped by identical text, in first-seen order: TIRG's sampler draws a text, then a pair.
    # A redraw split's stored texts are one draw among many, so it has one group: a uniform draw of slots.
    text_groups: list[list[int]] = field(init=False)
    # source image -> indices of its queries, for the second (same source) draw of a pair.
    queries_by_source: dict[int, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        by_text: dict[str, list[int]] = defaultdict(list)
        by_source: dict[int, list[int]] = defaultdict(list)
        for index, query in enumerate(self.queries):
            by_text[query.text].append(index)
            by_source[query.reference].append(index)
        self.text_groups = list(by_text.values()) if self.redraw is None else [list(range(len(self.queries)))]
        self.queries_by_source = dict(by_source)

    def draw(self, query_index: int, rng: np.random.Generator) -> Query:
        """The query to train on for slot `query_index`: a fresh draw from `rng` for its reference image
        with redraw information, the stored query with one of its text variants drawn from `rng`, else the
        stored query (and `rng` is not touched)."""
        if self.redraw is not None:
            return self.redraw.query(self.queries[query_index].reference, rng)
        query = self.queries[query_index]
        if self.text_variants is not None and self.text_variants[query_index]:
            return Query(query.reference, uniform_pick(rng)(self.text_variants[query_index]), query.target)
        return query

    def draw_batch(self, query_indices: Sequence[int], rng: np.random.Generator) -> list[Query]:
        """`draw` for each index in order; positions 2j and 2j + 1 with the same reference image are a
        pair (the pair sampler's) and get different texts, as TIRG's MIT-States pairs (its two targets
        of one source have different adjectives). Draw the whole global batch, then shard it, so that
        every process consumes `rng` alike."""
        batch: list[Query] = []
        for position, index in enumerate(query_indices):
            partner = batch[-1] if position % 2 else None
            if self.redraw is not None and partner is not None and partner.reference == self.queries[index].reference:
                batch.append(self.redraw.query(partner.reference, rng, unlike=partner.text))
            else:
                batch.append(self.draw(index, rng))
        return batch

    def all_texts(self) -> set[str]:
        """Every text a training step can show (for the vocabulary): the stored ones and every redrawable one."""
        texts = {query.text for query in self.queries}
        for variants in self.text_variants or []:
            texts.update(variants)
        if self.redraw is not None:
            for reference in self.queries_by_source:
                texts |= self.redraw.draws.texts(self.redraw.image_ids[reference])
        return texts

    def subset(self, name: str, query_indices: list[int], *, redraw: bool = True) -> RetrievalSplit:
        """The same images with only the given queries (a validation split shares the gallery);
        `redraw=False` keeps the stored queries only (a validation split scores fixed queries)."""
        variants = [self.text_variants[i] for i in query_indices] if redraw and self.text_variants else None
        return RetrievalSplit(name, self.image_paths, self.labels, [self.queries[i] for i in query_indices],
                              self.gallery_size, self.redraw if redraw else None, variants)


def carve_validation(split: RetrievalSplit, fraction: float, seed: int) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Hold out the queries of a random `fraction` of source images as a validation split.

    Splitting by source (not by query) keeps every pair of one source on one side, so the
    validation queries' reference images were never seen as references in training. The training
    part keeps the split's redraw information; the validation part scores its stored queries.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    sources = np.array(sorted(split.queries_by_source))
    rng = np.random.default_rng(seed)
    held_out = set(rng.choice(sources, size=max(1, round(fraction * len(sources))), replace=False).tolist())
    train_idx = [i for i, q in enumerate(split.queries) if q.reference not in held_out]
    val_idx = [i for i, q in enumerate(split.queries) if q.reference in held_out]
    return split.subset(f"{split.name}-train", train_idx), split.subset(f"{split.name}-val", val_idx, redraw=False)
