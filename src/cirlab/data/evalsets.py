"""Benchmark-independent evaluation sets: queries with resolved hit rules, and Recall@K over them.

Every reader (FashionIQ, CIRR, Shoes, Fashion200k, MIT-States, folder) reduces its benchmark to an
`EvalSet`: an ordered gallery, one `EvalQuery` per official query with the hit rule already resolved
into explicit target ids, and a `protocol` dict recording every choice that changes the numbers.
The metrics here then need no benchmark knowledge.

Several texts per query (FashionIQ "symmetric" caption joining): the caller scores each variant
(`EvalSet.texts(v)` for v in `range(EvalSet.text_variants)`) and averages the score matrices with
`average_variant_scores` before computing recall.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cirlab.data.errors import DataFormatError
from cirlab.data.records import Pick, TargetDraws


@dataclass(frozen=True)
class Triplet:
    """A training example: reference image id, modification text, target image id. With `variants`, every
    training draw takes one of those texts at random (CLIP4Cir's caption orders); `text` is the first."""

    reference: str
    text: str
    target: str
    variants: tuple[str, ...] = ()


@dataclass
class TrainingSet:
    """A benchmark's training triplets and the file of every image they name.

    With `draws` (readers whose reference code samples pairs on the fly), each triplet is one slot of its
    reference image: its text and target are one seeded draw, and training draws afresh from `draws`.
    """

    triplets: list[Triplet]
    image_paths: dict[str, Path]
    draws: TargetDraws | None = None

    @classmethod
    def located(cls, triplets: list[Triplet], locate: Callable[[str], Path],
                draws: TargetDraws | None = None) -> TrainingSet:
        """Triplets (and every image `draws` can name) whose image files `locate(image_id)` finds."""
        named = dict.fromkeys(image for t in triplets for image in (t.reference, t.target))
        named.update(dict.fromkeys(draws.images() if draws is not None else ()))
        return cls(triplets, {image: locate(image) for image in named}, draws)


@dataclass(frozen=True)
class EvalQuery:
    reference: str                          # image id
    text: str                               # what the model sees (captions joined per the protocol)
    targets: frozenset[str]                 # gallery ids that count as a hit; empty where labels are withheld
    excluded: frozenset[str]                # gallery ids removed from this query's ranking
    subset: tuple[str, ...] | None = None   # CIRR: the other members of the query's image set
    query_id: str | None = None             # e.g. the CIRR pairid, for submission files
    text_variants: tuple[str, ...] = ()     # if set: all texts whose score matrices are averaged ([0] == text)
    ground_truths: frozenset[str] = frozenset()  # mAP's relevant ids where they differ from `targets` (CIRCO's
                                                 # gt_img_ids; its Recall@K counts target_img_id alone); empty: targets
    aspects: tuple[str, ...] = ()           # CIRCO's semantic aspects: mAP is also averaged per aspect


@dataclass
class EvalSet:
    benchmark: str
    split: str
    gallery: list[str]                      # ordered image ids; score matrices use this column order
    image_paths: dict[str, Path]            # every image id of the gallery and the queries
    queries: list[EvalQuery]
    protocol: dict[str, Any]                # every choice that changes the numbers
    ks: tuple[int, ...]
    map_ks: tuple[int, ...] = ()            # K of mAP@K, also reported when set (several targets per query)
    aspect_k: int | None = None             # if set: mAP@aspect_k per aspect of the queries (CIRCO: 10)

    def describe(self) -> str:
        """One line stating the protocol."""
        choices = "; ".join(f"{key} = {value}" for key, value in self.protocol.items())
        average = f", mAP@K for K in {list(self.map_ks)}" if self.map_ks else ""
        average += f", mAP@{self.aspect_k} per semantic aspect" if self.aspect_k else ""
        return (f"{self.benchmark} {self.split}: {choices}; Recall@K for K in {list(self.ks)}{average} "
                f"({len(self.queries)} queries, gallery of {len(self.gallery)})")

    @property
    def text_variants(self) -> int:
        """How many texts each query has (their score matrices are averaged); 1 for most protocols."""
        return max((len(q.text_variants) for q in self.queries), default=1) or 1

    def texts(self, variant: int = 0) -> list[str]:
        """The text of every query for one variant, in query order."""
        if not 0 <= variant < self.text_variants:
            raise IndexError(f"variant {variant} out of range: this set has {self.text_variants}")
        return [q.text_variants[variant] if q.text_variants else q.text for q in self.queries]


def average_variant_scores(per_variant: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
    """Mean of the Q x G score matrices of each text variant (FashionIQ "symmetric"), summed in place: one
    variant (most protocols) costs one float64 copy, not a stack of copies for np.mean."""
    if not per_variant:
        raise ValueError("no score matrices to average")
    total = _as_array(per_variant[0])
    for scores in per_variant[1:]:
        total += _as_array(scores)
    return total / len(per_variant) if len(per_variant) > 1 else total


def _as_array(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    return np.array(scores, dtype=np.float64)  # a copy: exclusions are written into it


def _columns(ids: Iterable[str], column: Mapping[str, int], what: str, index: int) -> list[int]:
    try:
        return [column[i] for i in ids]
    except KeyError as error:
        raise ValueError(f"query {index}: {what} id {error.args[0]!r} is not in the gallery") from None


def _checked_scores(scores: np.ndarray | torch.Tensor, evalset: EvalSet) -> np.ndarray:
    array = _as_array(scores)
    expected = (len(evalset.queries), len(evalset.gallery))
    if array.shape != expected:
        raise ValueError(f"scores have shape {array.shape}, expected (queries, gallery) = {expected}")
    unlabelled = sum(1 for q in evalset.queries if not q.targets)
    if unlabelled:
        raise ValueError(f"{evalset.benchmark} {evalset.split}: {unlabelled} of {len(evalset.queries)} queries have "
                         "no targets (labels withheld); this split can only be scored by its test server (for CIRR, "
                         "`cirlab eval CHECKPOINT --submission DIR` writes the server's files)")
    return array


def _best_rank(row: np.ndarray, candidates: list[int], targets: list[int]) -> float:
    """0-based rank of the best target among `candidates`; ties broken by gallery order."""
    order = sorted(candidates, key=lambda c: (-row[c], c))
    ranks = [order.index(t) for t in targets if t in candidates]
    return min(ranks, default=float("inf"))


def _target_ranks(array: np.ndarray, evalset: EvalSet) -> np.ndarray:
    """0-based rank of each query's best target over the gallery minus its excluded ids."""
    column = {image: c for c, image in enumerate(evalset.gallery)}
    ranks = np.empty(len(evalset.queries))
    for index, (row, query) in enumerate(zip(array, evalset.queries)):
        excluded = _columns(query.excluded, column, "excluded", index)
        targets = [t for t in _columns(query.targets, column, "target", index) if t not in excluded]
        row[excluded] = -np.inf
        if not targets:
            ranks[index] = np.inf
            continue
        best = max(row[targets])
        # Stable ordering: an equal score ranks ahead only if it comes earlier in the gallery.
        first = min(t for t in targets if row[t] == best)
        ahead = (row > best) | ((row == best) & (np.arange(len(row)) < first))
        ahead[excluded] = False
        ranks[index] = ahead.sum()
    return ranks


def recall_at_k(scores: np.ndarray | torch.Tensor, evalset: EvalSet,
                ks: Sequence[int] | None = None) -> dict[str, float]:
    """Percentage of queries with any target in the top K after removing each query's excluded ids.

    `scores` is Q x len(gallery) in gallery column order; higher is better; ties rank by gallery order."""
    ranks = _target_ranks(_checked_scores(scores, evalset), evalset)
    return {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in (ks or evalset.ks)}


def _top_columns(array: np.ndarray, top: int) -> np.ndarray:
    """The `top` best columns of every row, best first, ties in gallery order (what a stable sort of each row
    gives): one partition of the whole matrix and a sort of `top` columns per row, not a sort of the gallery."""
    top = min(top, array.shape[1])
    kth = -np.partition(-array, top - 1, axis=1)[:, top - 1:top]
    better = array > kth
    tied = array == kth
    # of the columns tied with the top-th score, the earliest in the gallery take the places left
    chosen = better | (tied & (np.cumsum(tied, axis=1) <= top - better.sum(axis=1, keepdims=True)))
    columns = np.nonzero(chosen)[1].reshape(len(array), top)
    order = np.argsort(-np.take_along_axis(array, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)


def average_precisions(scores: np.ndarray | torch.Tensor, evalset: EvalSet,
                       ks: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """Each query's AP@K, a fraction, for K in `ks` (default the set's `map_ks`) and the set's `aspect_k`:
    AP@K = sum over k <= K of P@k x rel_k, divided by min(K, number of ground truths) (CIRCO's evaluation.py).
    The ground truths are `ground_truths`, else `targets`; excluded ids leave the ranking first (an excluded
    ground truth is none). Ties rank by gallery order, as in `recall_at_k`."""
    array = _checked_scores(scores, evalset)
    if np.isnan(array).any():
        raise ValueError("scores contain NaN")
    ks = tuple(dict.fromkeys([*(ks or evalset.map_ks), *([evalset.aspect_k] if evalset.aspect_k else [])]))
    column = {image: c for c, image in enumerate(evalset.gallery)}
    relevant = []
    for index, query in enumerate(evalset.queries):
        excluded = _columns(query.excluded, column, "excluded", index)
        array[index, excluded] = -np.inf
        truths = _columns(query.ground_truths or query.targets, column, "ground-truth", index)
        relevant.append(sorted(set(truths) - set(excluded)))
    top = _top_columns(array, max(ks))
    hits = np.array([np.isin(ranked, truths) for ranked, truths in zip(top, relevant)]).reshape(top.shape)
    precision_sums = np.cumsum(hits * np.cumsum(hits, axis=1) / np.arange(1, top.shape[1] + 1), axis=1)
    counts = np.array([len(truths) for truths in relevant])
    return {k: np.divide(precision_sums[:, min(k, top.shape[1]) - 1], np.minimum(k, counts),
                         out=np.zeros(len(counts)), where=counts > 0) for k in ks}


def mean_average_precision(precisions: Mapping[int, np.ndarray], evalset: EvalSet,
                           ks: Sequence[int] | None = None) -> dict[str, float]:
    """mAP@K in percent from every query's AP@K (`average_precisions`, chunks concatenated in query order), and
    with the set's `aspect_k` the mean over the queries of each semantic aspect ("mAP@10/negation")."""
    metrics = {f"mAP@{k}": 100.0 * float(np.mean(precisions[k])) for k in (ks or evalset.map_ks)}
    if evalset.aspect_k:
        for aspect in sorted({aspect for query in evalset.queries for aspect in query.aspects}):
            members = np.array([aspect in query.aspects for query in evalset.queries])
            metrics[f"mAP@{evalset.aspect_k}/{aspect}"] = 100.0 * float(np.mean(precisions[evalset.aspect_k][members]))
    return metrics


def map_at_k(scores: np.ndarray | torch.Tensor, evalset: EvalSet, ks: Sequence[int] | None = None) -> dict[str, float]:
    """Mean average precision at K, in percent, over every ground truth of each query (CIRCO's metric; see
    `average_precisions`), with mAP per semantic aspect where the set asks for it."""
    return mean_average_precision(average_precisions(scores, evalset, ks), evalset, ks)


def recall_subset_at_k(scores: np.ndarray | torch.Tensor, evalset: EvalSet,
                       ks: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
    """CIRR Recall_subset@K: rank only within each query's `subset` (its image set minus the reference)."""
    array = _checked_scores(scores, evalset)
    column = {image: c for c, image in enumerate(evalset.gallery)}
    ranks = np.empty(len(evalset.queries))
    for index, (row, query) in enumerate(zip(array, evalset.queries)):
        if query.subset is None:
            raise ValueError(f"query {index}: no subset; Recall_subset needs CIRR image sets")
        excluded = set(_columns(query.excluded, column, "excluded", index))
        members = [c for c in _columns(query.subset, column, "subset", index) if c not in excluded]
        ranks[index] = _best_rank(row, members, _columns(query.targets, column, "target", index))
    return {f"Rsubset@{k}": 100.0 * float(np.mean(ranks < k)) for k in ks}


def ranked_ids(scores: np.ndarray | torch.Tensor, evalset: EvalSet, top: int,
               within_subset: bool = False) -> list[list[str]]:
    """Each query's `top` best image ids, excluded ids removed, ties in gallery order; over the whole
    gallery, or over the query's `subset` only. Needs no targets (test-server submissions)."""
    array = _as_array(scores)
    if array.shape != (len(evalset.queries), len(evalset.gallery)):
        raise ValueError(f"scores have shape {array.shape}, expected {(len(evalset.queries), len(evalset.gallery))}")
    column = {image: c for c, image in enumerate(evalset.gallery)}
    rankings = []
    for index, (row, query) in enumerate(zip(array, evalset.queries)):
        excluded = set(_columns(query.excluded, column, "excluded", index))
        if within_subset:
            if query.subset is None:
                raise ValueError(f"query {index}: no subset to rank within")
            candidates = [c for c in _columns(query.subset, column, "subset", index) if c not in excluded]
        else:
            candidates = [c for c in range(len(row)) if c not in excluded]
        ordered = np.sort(np.asarray(candidates, dtype=np.int64))
        best = ordered[np.argsort(-row[ordered], kind="stable")][:top]
        rankings.append([evalset.gallery[c] for c in best])
    return rankings


# ---------------------------------------------------------------------------------------------
# Helpers shared by the readers
# ---------------------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or malformed file raises DataFormatError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: missing file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path}: not valid JSON ({error})") from None


def read_lines(path: Path) -> list[str]:
    """The lines of a text file without line endings; a missing file raises DataFormatError."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: missing file") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(f"{path}: not UTF-8 text ({error})") from None


def read_json_records(path: Path, record_problems: Callable[[Any, str], list[str]],
                      noun: str) -> tuple[list[dict], list[str]]:
    """A JSON list of records and every problem `record_problems(record, where)` finds in it."""
    records = read_json(path)
    if not isinstance(records, list):
        return [], [f"{path}: expected a JSON list of {noun}"]
    return records, [p for i, r in enumerate(records) for p in record_problems(r, f"{path}: entry {i}")]


def raise_first(problems: list[str], checker: str) -> None:
    """Loaders stop at malformed input; the matching check function lists every problem."""
    if problems:
        more = f" (and {len(problems) - 1} more problems; {checker} lists them all)" if len(problems) > 1 else ""
        raise DataFormatError(problems[0] + more)


def absent_images(image_paths: Mapping[str, Path]) -> list[str]:
    """The ids whose image file does not exist, in mapping order."""
    return [image for image, path in image_paths.items() if not path.is_file()]


def missing_images(image_paths: Mapping[str, Path]) -> list[str]:
    """One problem line per image id whose file does not exist."""
    return [f"image {image!r}: missing file {image_paths[image]}" for image in absent_images(image_paths)]


# ---------------------------------------------------------------------------------------------
# Benchmarks with missing images (data.missing_images)
# ---------------------------------------------------------------------------------------------

MISSING_IMAGE_POLICIES = ("error", "skip")
# A redraw whose target is missing is drawn again; a kept slot's stored target exists, so a run of this many
# misses has a negligible chance unless nearly all of a source's targets are gone.
_REDRAW_ATTEMPTS = 10_000


@dataclass(frozen=True)
class KeptCount:
    """What data.missing_images=skip keeps of one split: its training triplets or evaluation queries, and the
    gallery of an evaluation split."""

    split: str                                  # e.g. "fashioniq-dress train", "cirr val"
    noun: str                                   # "training triplets" or "queries"
    kept: int
    total: int
    gallery: tuple[int, int] | None = None      # (kept, total) gallery images; None for training

    def describe(self) -> str:
        text = f"{self.kept:,} of {self.total:,} {self.noun} kept"
        return text if self.gallery is None else f"{text}; gallery {self.gallery[0]:,} of {self.gallery[1]:,}"


class AvailableDraws(TargetDraws):
    """A reader's training draws without the missing images: a draw naming a missing target is drawn again,
    so the reader's rule holds, conditioned on the target existing. `texts` stays the reader's (it may name a
    text whose every target is missing: a larger vocabulary, nothing more)."""

    def __init__(self, draws: TargetDraws, missing: set[str]) -> None:
        self.draws, self.missing = draws, missing

    def images(self) -> Iterable[str]:
        return [image for image in self.draws.images() if image not in self.missing]

    def draw(self, source: str, pick: Pick) -> tuple[str, str]:
        for _ in range(_REDRAW_ATTEMPTS):
            text, target = self.draws.draw(source, pick)
            if target not in self.missing:
                return text, target
        raise DataFormatError(f"image {source!r}: {_REDRAW_ATTEMPTS:,} training draws in a row named a missing "
                              "target image")

    def texts(self, source: str) -> frozenset[str]:
        return self.draws.texts(source)


def raise_missing_images(image_maps: Iterable[Mapping[str, Path]], check_command: str) -> None:
    """data.missing_images=error: stop at load time, naming the first missing file and how many are missing."""
    paths = list(dict.fromkeys(path for images in image_maps for path in images.values()))
    absent = [path for path in paths if not path.is_file()]
    if absent:
        raise DataFormatError(f"{absent[0]}: missing image ({len(absent):,} of the benchmark's {len(paths):,} images "
                              f"are missing; `{check_command}` lists them, data.missing_images=skip leaves them out)")


def _available_query(query: EvalQuery, missing: set[str]) -> EvalQuery | None:
    """The query over the images that exist, or None when its reference or every one of its targets is missing.
    A query with several targets (a label rule, several ground truths) stays while one of them exists, scored
    on the existing ones: a missing image can no more be retrieved than one the dataset never had."""
    targets = query.targets - missing
    if query.reference in missing or (query.targets and not targets):
        return None
    subset = None if query.subset is None else tuple(member for member in query.subset if member not in missing)
    return replace(query, targets=targets, excluded=query.excluded - missing, subset=subset,
                   ground_truths=query.ground_truths - missing)


def evalset_without_missing(evalset: EvalSet) -> tuple[EvalSet, KeptCount]:
    """The evaluation set without its missing images: queries whose reference or every target is missing are
    dropped (an unlabelled query needs its reference only), and the gallery loses the missing images. The
    protocol states the counts."""
    missing = set(absent_images(evalset.image_paths))
    queries = [kept for kept in (_available_query(q, missing) for q in evalset.queries) if kept is not None]
    gallery = [image for image in evalset.gallery if image not in missing]
    count = KeptCount(f"{evalset.benchmark} {evalset.split}", "queries", len(queries), len(evalset.queries),
                      (len(gallery), len(evalset.gallery)))
    available = replace(evalset, gallery=gallery, queries=queries,
                        image_paths={i: p for i, p in evalset.image_paths.items() if i not in missing},
                        protocol={**evalset.protocol, "missing_images": f"skipped: {count.describe()}"})
    return available, count


def training_without_missing(training: TrainingSet, split: str) -> tuple[TrainingSet, KeptCount]:
    """The training set without the triplets whose reference or target is missing; draws skip missing targets."""
    missing = set(absent_images(training.image_paths))
    kept = [t for t in training.triplets if t.reference not in missing and t.target not in missing]
    draws = AvailableDraws(training.draws, missing) if training.draws is not None and missing else training.draws
    available = TrainingSet.located(kept, training.image_paths.__getitem__, draws)
    return available, KeptCount(split, "training triplets", len(kept), len(training.triplets))
