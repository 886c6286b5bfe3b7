"""Synthetic CIRCO: CSS scenes in the exact CIRCO layout, with every ground truth listed.

CIRCO's annotators could only list the ground truths they found. Here every query carries a rule (a few
clauses "the scene has between m and n objects matching this description"), and `gt_img_ids` is every
gallery image whose scene satisfies it, found by testing the scenes, so images that other queries' families
or the background happen to supply are listed too.

- One gallery (CIRCO's is the whole COCO unlabeled set) serves val and test. Per query it holds the reference,
  the target (the reference with the caption's change applied), 0-5 more positives (the target with unrelated
  edits that keep the rule) and 3 distractors that share the concept but miss the change (a random edit of the
  reference or target, or, for a conjunction, only its first change); plus background scenes.
- `shared_concept` names two objects of the reference ("a large red circle with a small blue triangle"); the
  size of one is dropped from it where the change is about that object's size or count. The relative caption
  is a verb phrase, as on CIRCO ("has two red circles and has no green rectangle").
- Changes and CIRCO's semantic aspects (its names; `viewpoint` never applies to a flat drawing): `count`
  cardinality; `add` addition; `remove` negation; `color`, `shape` (of another object) compare_change;
  `size` comparative_statement + direct_addressing; `move` spatial_relations_background + direct_addressing;
  two changes joined by "and" add statement_with_conjunction. `remove` and `size` come only in conjunctions
  with one of the other kinds: alone (or together) they hold for most scenes that have the concept, which
  would give hundreds of ground truths.
- Images are PNG (lossless, so the pixels match the scenes and edit regions) under COCO-style 12-digit names;
  the names are read from `image_info_unlabeled2017.json`, as CIRCO's own loader does.

Field-by-field description: docs/formats.md.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cirlab.data.circo import ANNOTATIONS_DIR, COCO_DIR, IMAGE_INFO, IMAGES_DIR, SPLITS
from cirlab.data.cirr_scenes import COMBOS, PLACES
from cirlab.data.css import (
    MIN_IMAGE_SIZE,
    Edit,
    Scene,
    SceneObject,
    add_edit,
    edit_mask,
    make_edit,
    random_edit,
    random_object,
    random_scene,
    remove_edit,
    scene_key,
    write_pngs,
)
from cirlab.data.css_vocabulary import GRID_CELLS, SIZES
from cirlab.data.generation import GENERATION_FILE, check_arguments, prepare_output_folder
from cirlab.data.regions import EDIT_REGIONS_FILE, EditRegion, write_edit_regions
from cirlab.files import atomic_write_text

GENERATOR_VERSION = 1
SCENES_FILE = "scenes.jsonl"
QUERIES_FILE = "queries.jsonl"
PRESETS: dict[str, dict[str, int]] = {  # queries per split; "full" has CIRCO's 220 val and 800 test queries
    "demo": {"val": 30, "test": 30},
    "full": {"val": 220, "test": 800},
}
# CIRCO's names, in the order its val file lists them.
SEMANTIC_ASPECTS = ("cardinality", "statement_with_conjunction", "viewpoint", "compare_change",
                    "comparative_statement", "addition", "spatial_relations_background", "direct_addressing",
                    "negation")
CONJUNCTION_ASPECT = "statement_with_conjunction"
ASPECTS: dict[str, tuple[str, ...]] = {
    "count": ("cardinality",), "add": ("addition",), "remove": ("negation",),
    "color": ("compare_change",), "shape": ("compare_change",),
    "size": ("comparative_statement", "direct_addressing"),
    "move": ("spatial_relations_background", "direct_addressing"),
}
STANDALONE_KINDS = ("count", "add", "color", "shape", "move")
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "count": ("has {number} {plural}", "shows {number} {plural}"),
    "add": ("also has a {new}", "has a {new} too"),
    "remove": ("has no {old}", "shows no {old}"),
    "color": ("has a {new} instead of the {old_value} one", "shows a {new} in place of the {old_value} one"),
    "shape": ("has a {new} instead of the {old}", "shows a {new} in place of the {old}"),
    "size": ("has the {object} {comparative}", "shows the {object} {comparative}"),
    "move": ("has the {object} {place}", "shows the {object} {place}"),
}
COMPARATIVES = {"large": "bigger", "small": "smaller"}
NUMBERS = {2: "two", 3: "three"}
_CONJUNCTION = 0.5                     # share of queries with two changes (CIRCO val: 164 of 220)
_EXTRA_POSITIVES = (0, 0, 1, 2, 3, 5)  # drawn uniformly: a third of the queries get no extra positive
_DISTRACTORS = 3
_BACKGROUND_PER_QUERY = 1              # unrelated scenes in the gallery, per query
_ID_SPACE = 600_000                    # ids drawn below this, sparse like COCO's (its largest is 581,929)
_ATTEMPTS = 200                        # rejection-sampling tries for the distractors or extra positives
_MATCH_KEYS = ("color", "shape", "size", "cell")

Combo = tuple[str, str]  # (colour, shape)
QueryKey = tuple[str, int]  # (split, query id)


class Clause(NamedTuple):
    """Between `low` and `high` (None: no limit) objects of a scene match every (attribute, value) pair."""

    match: tuple[tuple[str, Any], ...]
    low: int
    high: int | None

    def holds(self, scene: Scene) -> bool:
        count = sum(all(getattr(obj, key) == value for key, value in self.match) for obj in scene)
        return count >= self.low and (self.high is None or count <= self.high)

    def to_json(self) -> dict[str, Any]:
        return {"match": dict(self.match), "min": self.low, "max": self.high}


def describe(**attributes: Any) -> tuple[tuple[str, Any], ...]:
    """A clause's match pairs in a fixed key order, so equal descriptions compare equal."""
    unknown = set(attributes) - set(_MATCH_KEYS)
    if unknown:
        raise ValueError(f"unknown object attribute(s) {', '.join(sorted(unknown))} (known: {', '.join(_MATCH_KEYS)})")
    return tuple((key, attributes[key]) for key in _MATCH_KEYS if key in attributes)


def satisfies(scene: Scene, rule: Sequence[Clause]) -> bool:
    return all(clause.holds(scene) for clause in rule)


@dataclass(frozen=True)
class Change:
    """One edit the caption asks for: its words, the clauses a ground truth must meet, the scene after it."""

    kind: str
    phrase: str
    clauses: tuple[Clause, ...]
    after: Scene
    edits: tuple[Edit, ...]             # its CSS edits: their footprints make its edit region
    frees_size_of: Combo | None = None  # the concept object whose size the change is about


# ---------------------------------------------------------------------------------------------
# Changes: each returns None where the scene does not allow it
# ---------------------------------------------------------------------------------------------

def _combo(obj: SceneObject) -> Combo:
    return obj.color, obj.shape


def _named(combo: Combo) -> str:
    return f"{combo[0]} {combo[1]}"


def _with(scene: Scene, combo: Combo) -> list[SceneObject]:
    return [obj for obj in scene if _combo(obj) == combo]


def _free_cells(scene: Scene) -> list[int]:
    taken = {obj.cell for obj in scene}
    return [cell for cell in range(len(GRID_CELLS)) if cell not in taken]


def _phrase(rng: random.Random, kind: str, **fields: str) -> str:
    return rng.choice(CAPTION_TEMPLATES[kind]).format(**fields)


def _unique_other(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> SceneObject | None:
    """An object that is not a concept object and the only one of its colour and shape."""
    others = [obj for obj in scene if _combo(obj) not in concept and len(_with(scene, _combo(obj))) == 1]
    return rng.choice(others) if others else None


def _fresh_combos(scene: Scene, concept: Sequence[Combo]) -> list[Combo]:
    """Colour-shape pairs neither in the scene nor in the concept: what a change may bring in."""
    present = {_combo(obj) for obj in scene}
    return [combo for combo in COMBOS if combo not in present and combo not in concept]


def _count_change(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> Change | None:
    combo = rng.choice(concept)
    number = rng.choice(sorted(NUMBERS))
    free = _free_cells(scene)
    if len(_with(scene, combo)) != 1 or len(free) < number - 1:
        return None
    edits, after = [], scene
    for cell in rng.sample(free, number - 1):  # the copies get random sizes: the count is about colour and shape
        edits.append(add_edit(after, random_object(rng, cell, [combo])))
        after = edits[-1].target
    phrase = _phrase(rng, "count", number=NUMBERS[number], plural=f"{_named(combo)}s")
    clause = Clause(describe(color=combo[0], shape=combo[1]), number, number)
    return Change("count", phrase, (clause,), after, tuple(edits), frees_size_of=combo)


def _add_change(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> Change | None:
    free, combos = _free_cells(scene), _fresh_combos(scene, concept)
    if not free or not combos:
        return None
    edit = add_edit(scene, random_object(rng, rng.choice(free), [rng.choice(combos)]))
    clause = Clause(describe(color=edit.after.color, shape=edit.after.shape), 1, None)
    return Change("add", _phrase(rng, "add", new=_named(_combo(edit.after))), (clause,), edit.target, (edit,))


def _remove_change(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> Change | None:
    old = _unique_other(rng, scene, concept)
    if old is None:
        return None
    edit = remove_edit(scene, old, ("color", "shape"))
    clause = Clause(describe(color=old.color, shape=old.shape), 0, 0)
    return Change("remove", _phrase(rng, "remove", old=_named(_combo(old))), (clause,), edit.target, (edit,))


def _replace_change(rng: random.Random, scene: Scene, concept: Sequence[Combo], attribute: str) -> Change | None:
    """Another object's colour or shape changes: the new kind is there and the old one is gone."""
    old = _unique_other(rng, scene, concept)
    if old is None:
        return None
    fresh = _fresh_combos(scene, concept)
    values = ([color for color, shape in fresh if shape == old.shape] if attribute == "color"
              else [shape for color, shape in fresh if color == old.color])
    if not values:
        return None
    edit = make_edit(scene, old, ("color", "shape"), attribute, rng.choice(values))
    new = edit.after
    phrase = _phrase(rng, attribute, new=_named(_combo(new)), old=_named(_combo(old)), old_value=old.color)
    clauses = (Clause(describe(color=new.color, shape=new.shape), 1, None),
               Clause(describe(color=old.color, shape=old.shape), 0, 0))
    return Change(attribute, phrase, clauses, edit.target, (edit,))


def _color_change(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> Change | None:
    return _replace_change(rng, scene, concept, "color")


def _shape_change(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> Change | None:
    return _replace_change(rng, scene, concept, "shape")


def _the_concept_object(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> SceneObject | None:
    """One concept object, if it is the only one of its colour and shape (so "the red circle" is definite)."""
    objects = _with(scene, rng.choice(concept))
    return objects[0] if len(objects) == 1 else None


def _size_change(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> Change | None:
    obj = _the_concept_object(rng, scene, concept)
    if obj is None:
        return None
    (size,) = [s for s in SIZES if s != obj.size]
    edit = make_edit(scene, obj, ("color", "shape"), "size", size)
    phrase = _phrase(rng, "size", object=_named(_combo(obj)), comparative=COMPARATIVES[size])
    clauses = (Clause(describe(color=obj.color, shape=obj.shape, size=size), 1, None),
               Clause(describe(color=obj.color, shape=obj.shape, size=obj.size), 0, 0))
    return Change("size", phrase, clauses, edit.target, (edit,), frees_size_of=_combo(obj))


def _move_change(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> Change | None:
    obj, free = _the_concept_object(rng, scene, concept), _free_cells(scene)
    if obj is None or not free:
        return None
    away = remove_edit(scene, obj, ("color", "shape"))
    there = add_edit(away.target, obj._replace(cell=rng.choice(free)))
    phrase = _phrase(rng, "move", object=f"{obj.size} {_named(_combo(obj))}",
                     place=PLACES[GRID_CELLS[there.after.cell]])
    clause = Clause(describe(color=obj.color, shape=obj.shape, size=obj.size, cell=there.after.cell), 1, None)
    return Change("move", phrase, (clause,), there.target, (away, there))


CHANGES = {"count": _count_change, "add": _add_change, "remove": _remove_change, "color": _color_change,
           "shape": _shape_change, "size": _size_change, "move": _move_change}


# ---------------------------------------------------------------------------------------------
# Queries and their families of gallery images
# ---------------------------------------------------------------------------------------------

@dataclass
class _Query:
    split: str
    id: int
    reference: Scene
    concept: tuple[SceneObject, SceneObject]  # two objects of the reference that every ground truth shares
    changes: tuple[Change, ...]
    positives: list[Scene] = field(default_factory=list)
    distractors: list[Scene] = field(default_factory=list)

    @property
    def key(self) -> QueryKey:
        return self.split, self.id

    @property
    def target(self) -> Scene:
        return self.changes[-1].after

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(change.kind for change in self.changes)

    @property
    def caption(self) -> str:
        return " and ".join(change.phrase for change in self.changes)

    @property
    def aspects(self) -> list[str]:
        names = {aspect for kind in self.kinds for aspect in ASPECTS[kind]}
        names |= {CONJUNCTION_ASPECT} if len(self.changes) > 1 else set()
        return [aspect for aspect in SEMANTIC_ASPECTS if aspect in names]

    def _sized(self, obj: SceneObject) -> bool:
        """Whether the concept names this object's size: not when a change is about that size or count."""
        return all(change.frees_size_of != _combo(obj) for change in self.changes)

    @property
    def concept_clauses(self) -> tuple[Clause, ...]:
        return tuple(Clause(describe(color=o.color, shape=o.shape, **({"size": o.size} if self._sized(o) else {})),
                            1, None) for o in self.concept)

    @property
    def shared_concept(self) -> str:
        first, second = (f"{o.size + ' ' if self._sized(o) else ''}{_named(_combo(o))}" for o in self.concept)
        return f"a {first} with a {second}"

    @property
    def rule(self) -> tuple[Clause, ...]:
        return self.concept_clauses + tuple(clause for change in self.changes for clause in change.clauses)


def _reference(rng: random.Random) -> tuple[Scene, tuple[SceneObject, SceneObject]]:
    """A random scene and two of its objects that are each the only one of their colour and shape."""
    while True:
        scene = random_scene(rng, COMBOS)
        unique = [obj for obj in scene if len(_with(scene, _combo(obj))) == 1]
        if len(unique) >= 2:
            first, second = rng.sample(unique, 2)
            return scene, (first, second)


def _changes(rng: random.Random, scene: Scene, concept: Sequence[Combo]) -> tuple[Change, ...] | None:
    """One standalone change, or two of different kinds (one of them standalone) applied in turn; None where
    the scene refuses one."""
    kinds = rng.sample(sorted(CHANGES), 2) if rng.random() < _CONJUNCTION else [rng.choice(STANDALONE_KINDS)]
    if not set(kinds) & set(STANDALONE_KINDS):
        return None
    changes: list[Change] = []
    for kind in kinds:
        change = CHANGES[kind](rng, changes[-1].after if changes else scene, concept)
        if change is None:
            return None
        changes.append(change)
    return tuple(changes)


def _new_query(rng: random.Random, split: str, query_id: int) -> _Query:
    while True:  # terminates: most scenes admit most changes
        reference, concept = _reference(rng)
        changes = _changes(rng, reference, [_combo(o) for o in concept])
        if changes is None:
            continue
        query = _Query(split, query_id, reference, concept, changes)
        # A later change can undo an earlier one (a copy of the wrong size after a size change): drawn again.
        if satisfies(query.target, query.rule) and not satisfies(reference, query.rule):
            return query


def _edited(rng: random.Random, scene: Scene, edits: int) -> Scene:
    for _ in range(edits):
        scene = random_edit(rng, scene, COMBOS).target
    return scene


def _fill_family(rng: random.Random, query: _Query) -> None:
    """Extra positives (the target with unrelated edits that keep the rule) and distractors (scenes that keep
    the concept and miss the change), all distinct from each other and from the reference and target."""
    seen = {scene_key(query.reference), scene_key(query.target)}

    def accept(scene: Scene, into: list[Scene]) -> None:
        if scene_key(scene) not in seen:
            seen.add(scene_key(scene))
            into.append(scene)

    wanted = rng.choice(_EXTRA_POSITIVES)
    for _ in range(_ATTEMPTS):
        if len(query.positives) == wanted:
            break
        candidate = _edited(rng, query.target, rng.randint(1, 2))
        if satisfies(candidate, query.rule):
            accept(candidate, query.positives)
    half_done = query.changes[0].after
    if len(query.changes) > 1 and not satisfies(half_done, query.rule):  # the hardest distractor of a conjunction
        accept(half_done, query.distractors)
    for _ in range(_ATTEMPTS):
        if len(query.distractors) >= _DISTRACTORS:
            break
        candidate = _edited(rng, rng.choice((query.reference, query.target)), 1)
        if satisfies(candidate, query.concept_clauses) and not satisfies(candidate, query.rule):
            accept(candidate, query.distractors)
    if not query.distractors:
        raise RuntimeError(f"{query.split} query {query.id}: found no distractor in {_ATTEMPTS} tries")


# ---------------------------------------------------------------------------------------------
# Gallery and ground truths
# ---------------------------------------------------------------------------------------------

@dataclass
class _Gallery:
    scenes: list[Scene]
    ids: list[int]
    references: dict[QueryKey, int]  # gallery position of each query's reference
    targets: dict[QueryKey, int]


def _gallery(rng: random.Random, queries: Sequence[_Query], background: int) -> _Gallery:
    """Every family's scenes and the background, shuffled, with distinct sparse ids."""
    scenes: list[Scene] = []
    starts: dict[QueryKey, int] = {}  # where each family starts before the shuffle: reference, then target
    for query in queries:
        starts[query.key] = len(scenes)
        scenes += [query.reference, query.target, *query.positives, *query.distractors]
    scenes += [random_scene(rng, COMBOS) for _ in range(background)]
    order = list(range(len(scenes)))
    rng.shuffle(order)
    moved_to = {old: new for new, old in enumerate(order)}
    return _Gallery([scenes[old] for old in order], rng.sample(range(1, _ID_SPACE), len(scenes)),
                    {key: moved_to[start] for key, start in starts.items()},
                    {key: moved_to[start + 1] for key, start in starts.items()})


def _by_combo(scenes: Sequence[Scene]) -> dict[Combo, set[int]]:
    index: dict[Combo, set[int]] = defaultdict(set)
    for position, scene in enumerate(scenes):
        for obj in scene:
            index[_combo(obj)].add(position)
    return index


def ground_truths(scenes: Sequence[Scene], rule: Sequence[Clause], by_combo: dict[Combo, set[int]]) -> list[int]:
    """Gallery positions, ascending, of every scene that satisfies `rule`. Only scenes holding the colour and
    shape of each clause that demands at least one object can satisfy it, so only those are tested."""
    candidates = set(range(len(scenes)))
    for clause in rule:
        match = dict(clause.match)
        if clause.low >= 1 and {"color", "shape"} <= set(match):
            candidates &= by_combo.get((match["color"], match["shape"]), set())
    return sorted(position for position in candidates if satisfies(scenes[position], rule))


def _ordered_ground_truths(query: _Query, gallery: _Gallery, by_combo: dict[Combo, set[int]]) -> list[int]:
    """The target first, as in CIRCO, then the others in gallery order."""
    found = ground_truths(gallery.scenes, query.rule, by_combo)
    target = gallery.targets[query.key]
    if target not in found:
        raise RuntimeError(f"{query.split} query {query.id}: its target does not satisfy its own rule")
    return [target] + [p for p in found if p != target]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.png"  # COCO's 12-digit names; PNG, so the pixels are exactly the scene


def _annotation(query: _Query, gallery: _Gallery, truths: list[int]) -> dict[str, Any]:
    """One entry with CIRCO's keys in its order; test entries have no target, ground truths or aspects."""
    val = query.split == "val"
    entry: dict[str, Any] = {"reference_img_id": gallery.ids[gallery.references[query.key]]}
    if val:
        entry["target_img_id"] = gallery.ids[gallery.targets[query.key]]
    entry.update(relative_caption=query.caption, shared_concept=query.shared_concept)
    if val:
        entry["gt_img_ids"] = [gallery.ids[p] for p in truths]
    entry["id"] = query.id
    if val:
        entry["semantic_aspects"] = query.aspects
    return entry


def _query_record(query: _Query, gallery: _Gallery, truths: list[int]) -> dict[str, Any]:
    """The generator's record of a query, test included: what it changes, its rule and its ground truths."""
    return {"split": query.split, "id": query.id, "kinds": list(query.kinds), "semantic_aspects": query.aspects,
            "reference_img_id": gallery.ids[gallery.references[query.key]],
            "target_img_id": gallery.ids[gallery.targets[query.key]],
            "gt_img_ids": [gallery.ids[p] for p in truths], "rule": [clause.to_json() for clause in query.rule]}


def _regions(queries: Sequence[_Query], gallery: _Gallery, image_size: int) -> Iterator[EditRegion]:
    """Per query, the footprints of what its changes add, remove or alter (one mask for reference and target);
    images are indexed by their position in image_info_unlabeled2017.json."""
    for query in queries:
        mask = np.logical_or.reduce([edit_mask(e, image_size) for change in query.changes for e in change.edits])
        yield EditRegion.from_masks(query.split, gallery.references[query.key], gallery.targets[query.key],
                                    query.caption, "+".join(query.kinds), None, mask, mask)


def _jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _counts(queries: Sequence[_Query], truths: dict[QueryKey, list[int]]) -> dict[str, dict[str, Any]]:
    counts = {}
    for split in SPLITS:
        ours = [q for q in queries if q.split == split]
        sizes = [len(truths[q.key]) for q in ours]
        kinds = [q.kinds for q in ours]
        counts[split] = {"queries": len(sizes), "conjunctions": sum(len(k) > 1 for k in kinds),
                         "ground_truths": sum(sizes), "max_ground_truths": max(sizes, default=0),
                         "single_ground_truth": sum(size == 1 for size in sizes),
                         # what listing the built positives alone (as an annotator would) would have missed
                         "unplanned_ground_truths": sum(sizes) - sum(1 + len(q.positives) for q in ours),
                         "kinds": {kind: sum(kind in k for k in kinds) for kind in CHANGES}}
    return counts


_OUTPUTS = (ANNOTATIONS_DIR.name, COCO_DIR.name, SCENES_FILE, QUERIES_FILE, EDIT_REGIONS_FILE,
            ".images.partial", ".images.old")


def generate_circo(out: Path, preset: str = "demo", seed: int = 0, image_size: int = 64, progress: bool = True,
                   *, queries: int | None = None) -> Path:
    """Write a synthetic CIRCO (annotations/{val,test}.json, COCO2017_unlabeled/) to `out`; returns `out`.

    The same arguments give byte-identical files. `queries` overrides the preset's number of queries per split
    (tests use tiny datasets). Besides CIRCO's files it writes scenes.jsonl (every image's objects),
    queries.jsonl (every query's rule and ground truths, test included) and edit_regions.jsonl.
    `generation.json` is written last, so its presence marks a complete dataset.
    """
    check_arguments("CIRCO", preset, PRESETS, image_size, MIN_IMAGE_SIZE, "queries", queries)
    out = prepare_output_folder(out, "CIRCO", _OUTPUTS)
    per_split = dict(PRESETS[preset]) if queries is None else {split: queries for split in SPLITS}
    every_query = []
    for split in SPLITS:
        rng = random.Random(f"cirlab-circo:{seed}:{split}")
        for query_id in range(per_split[split]):  # ids run from 0 in each split, as on CIRCO
            every_query.append(_new_query(rng, split, query_id))
            _fill_family(rng, every_query[-1])
    background = _BACKGROUND_PER_QUERY * len(every_query)
    gallery = _gallery(random.Random(f"cirlab-circo:{seed}:gallery"), every_query, background)
    by_combo = _by_combo(gallery.scenes)
    truths = {q.key: _ordered_ground_truths(q, gallery, by_combo) for q in every_query}

    write_pngs(out, {(IMAGES_DIR / _file_name(i)).as_posix(): [o.as_dict() for o in scene]
                     for i, scene in zip(gallery.ids, gallery.scenes)}, image_size, progress, "rendering CIRCO images")
    (out / IMAGE_INFO).parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": _file_name(i), "width": image_size, "height": image_size} for i in gallery.ids]
    atomic_write_text(out / IMAGE_INFO, json.dumps({"info": {"description": "cirlab synthetic CIRCO"},
                                                         "images": images}) + "\n")
    (out / ANNOTATIONS_DIR).mkdir(exist_ok=True)
    for split in SPLITS:
        entries = [_annotation(q, gallery, truths[q.key]) for q in every_query if q.split == split]
        atomic_write_text(out / ANNOTATIONS_DIR / f"{split}.json", json.dumps(entries, indent=4) + "\n")
    atomic_write_text(out / SCENES_FILE, _jsonl(
        {"id": i, "file_name": _file_name(i), "objects": [{"cell": o.cell, **o.as_dict()} for o in scene]}
        for i, scene in zip(gallery.ids, gallery.scenes)))
    atomic_write_text(out / QUERIES_FILE, _jsonl(_query_record(q, gallery, truths[q.key]) for q in every_query))
    write_edit_regions(out / EDIT_REGIONS_FILE, _regions(every_query, gallery, image_size))
    metadata = {
        "format": "circo", "generator": "cirlab.data.circo_scenes", "generator_version": GENERATOR_VERSION,
        "preset": preset, "seed": seed, "image_size": image_size,
        "structure": {"conjunction_share": _CONJUNCTION, "extra_positives": list(_EXTRA_POSITIVES),
                      "distractors_per_query": _DISTRACTORS, "background_per_query": _BACKGROUND_PER_QUERY,
                      "standalone_kinds": list(STANDALONE_KINDS)},
        "captions": {kind: list(templates) for kind, templates in CAPTION_TEMPLATES.items()},
        "semantic_aspects": {kind: list(names) for kind, names in ASPECTS.items()},
        "counts": {"images": len(gallery.scenes), "background": background, **_counts(every_query, truths)},
    }
    atomic_write_text(out / GENERATION_FILE, json.dumps(metadata, indent=2) + "\n")
    return out
