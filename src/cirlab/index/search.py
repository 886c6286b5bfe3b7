"""Composed search over an index: a reference (an image, or a gallery id) modified by a text.

`search_many` answers a batch of queries with one encoder pass per image size and one index search, which
is what a server gathering concurrent requests wants; `search_index` is the one-query case.

Ranking: the index is searched by inner product with `model.query_vectors`. Where that is the model's
score (`vectors_score_exactly`: cosine models, OFFSET), its hits are the answer, as exact as the index's
factory. Otherwise (CMAP) the search has two stages: the index returns a shortlist of `shortlist` images by
the vectors' estimate of the score, and `model.score` ranks the shortlist over the full target features the
index keeps. A shortlist as large as the index scores every image exactly, as the ranking evaluation does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cirlab.images import image_tensor, load_image
from cirlab.index.base import Index, IndexMismatchError, UnknownImageError
from cirlab.models.base import CIRModel

Hits = list[tuple[str, float]]  # (image id, score), best first
DEFAULT_SHORTLIST = 200  # images a two-stage search rescores exactly; measured by benchmarks/two_stage.py


@dataclass(frozen=True)
class SearchQuery:
    """One composed query; a gallery reference is left out of its own results unless `exclude_reference`
    is False (an uploaded image cannot be recognised in the gallery, so nothing is left out for it)."""

    reference: Image.Image | str
    text: str
    k: int = 10
    exclude_reference: bool = True

    @property
    def skipped(self) -> str | None:
        return self.reference if isinstance(self.reference, str) and self.exclude_reference else None


def _gallery_image(index: Index, image_id: str) -> Image.Image:
    if image_id not in index:
        raise UnknownImageError(f"reference {image_id!r} is not an image of the index at {index.folder}")
    if index.gallery_root is None:
        raise ValueError(f"{index.folder}: index records no gallery folder to load {image_id!r} from")
    return load_image(index.gallery_root / image_id)


def _query_states(index: Index, model: CIRModel, queries: Sequence[SearchQuery]) -> torch.Tensor:
    """The model's query states (B x ...), in eval mode; queries whose preprocessed images have the same
    size share one encoder pass (nothing is resized to make them match)."""
    device = next(model.parameters()).device
    tensors = [image_tensor(_gallery_image(index, query.reference) if isinstance(query.reference, str)
                            else query.reference, model.preprocessing) for query in queries]
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for position, tensor in enumerate(tensors):
        by_size[tuple(tensor.shape)].append(position)
    states: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for members in by_size.values():
                pixels = torch.stack([tensors[member] for member in members]).to(device)
                encoded = model.encode_queries(pixels, [queries[member].text for member in members]).float()
                states.update(zip(members, encoded, strict=True))
    finally:
        model.train(was_training)
    return torch.stack([states[position] for position in range(len(queries))])


def exact_scores(model: CIRModel, state: torch.Tensor, index: Index, ids: Sequence[str],
                 batch_size: int = 8192) -> np.ndarray:
    """`model.score` of one query state against the kept target features of `ids`, read `batch_size`
    rows at a time, so that memory stays bounded however many images are scored."""
    with torch.no_grad():
        return np.concatenate([np.empty(0, dtype=np.float32)] + [
            model.score(state[None], torch.from_numpy(index.features_of(list(ids[start:start + batch_size])))
                        .to(state.device))[0].cpu().numpy() for start in range(0, len(ids), batch_size)])


def _best(ids: Sequence[str], scores: Sequence[float], query: SearchQuery) -> Hits:
    return [(name, float(score)) for name, score in zip(ids, scores, strict=True) if name != query.skipped][:query.k]


def _two_stage(index: Index, model: CIRModel, states: torch.Tensor, vectors: np.ndarray,
               queries: Sequence[SearchQuery], shortlist: int) -> list[Hits]:
    depth = max([shortlist] + [query.k + (query.skipped is not None) for query in queries])
    if depth >= len(index):  # the whole gallery: nothing to shortlist
        candidates = [index.ids()] * len(queries)
    else:
        candidates = index.search(vectors, depth)[1]
    results = []
    for state, names, query in zip(states, candidates, queries, strict=True):
        scores = exact_scores(model, state, index, names)
        order = np.argsort(-scores, kind="stable")[:query.k + (query.skipped is not None)]
        results.append(_best([names[i] for i in order], scores[order], query))
    return results


def search_many(index: Index, model: CIRModel, queries: Sequence[SearchQuery],
                shortlist: int = DEFAULT_SHORTLIST) -> list[Hits]:
    """The k best (image id, score) of each query, in order, from one index search for all of them (see the
    module docstring; `shortlist` matters only to a two-stage search). Raises on the first bad query (an
    unknown gallery id, an unreadable image): a caller that must isolate failures retries one by one."""
    if not queries:
        return []
    return search_states(index, model, _query_states(index, model, queries), queries, shortlist)


def search_states(index: Index, model: CIRModel, states: torch.Tensor, queries: Sequence[SearchQuery],
                  shortlist: int = DEFAULT_SHORTLIST) -> list[Hits]:
    """`search_many` for query states already encoded (B x ..., one per query; the queries give k and the
    reference to leave out)."""
    if shortlist < 1:
        raise ValueError(f"shortlist must be at least 1, not {shortlist}")
    with torch.no_grad():
        vectors = model.query_vectors(states).float().cpu().numpy()
    if vectors.shape[1] != index.dim:
        raise IndexMismatchError(f"{index.folder}: index holds {index.dim}-dimensional vectors, but "
                                 f"{type(model).__name__} searches with {vectors.shape[1]}; it was built by an "
                                 "earlier cirlab that stored another layout for this model: rebuild it")
    if not model.vectors_score_exactly:
        return _two_stage(index, model, states, vectors, queries, shortlist)
    scores, ids = index.search(vectors, max(query.k + (query.skipped is not None) for query in queries))
    return [_best(row_ids, row_scores[:len(row_ids)], query)
            for row_ids, row_scores, query in zip(ids, scores, queries, strict=True)]


def search_index(index: Index, model: CIRModel, reference_image: Image.Image | str, text: str,
                 k: int = 10, exclude_reference: bool = True, shortlist: int = DEFAULT_SHORTLIST) -> Hits:
    """The k best (image id, score) for one reference (an image, or a gallery id) modified by `text`
    (`search_many` of one query)."""
    return search_many(index, model, [SearchQuery(reference_image, text, k, exclude_reference)], shortlist)[0]


def overlap_recall(exact: Sequence[Hits], found: Sequence[Hits]) -> float:
    """Mean over queries of the share of each exact top k (`exact`, e.g. a search whose shortlist is the whole
    index) that `found` also returns: the recall of an approximate search against exact ranking."""
    if len(exact) != len(found) or not exact:
        raise ValueError(f"recall needs the same, non-zero number of queries on both sides ({len(exact)}, "
                         f"{len(found)})")
    shares = [len({name for name, _ in wanted} & {name for name, _ in got}) / len(wanted)
              for wanted, got in zip(exact, found, strict=True) if wanted]
    return float(np.mean(shares)) if shares else 1.0
