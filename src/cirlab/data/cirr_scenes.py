"""Synthetic CIRR: CSS scenes in image sets of six near-identical images, written in the exact CIRR rc2 layout.

Each image set is a base scene and five variants one CSS edit away from it (two of them "twins" that
edit the same object or cell in the same way with different values), so Recall_subset, which ranks
only a query's own set, measures what it measures on CIRR: telling visually similar images apart.
Every query's reference and target lie in one set; its caption is a natural sentence describing the
one edit between them. `load_cirr` and `check_cirr` read the result like the real release.
Field-by-field description: docs/formats.md.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirlab.data.css import (
    COLOURS,
    GRID_CELLS,
    MAX_OBJECTS,
    MIN_IMAGE_SIZE,
    SHAPES,
    Combo,
    Edit,
    Scene,
    SceneObject,
    add_edit,
    distinct_edits,
    edit_mask,
    make_edit,
    new_values,
    random_object,
    random_scene,
    reference_fields,
    remove_edit,
    write_pngs,
)
from cirlab.data.generation import GENERATION_FILE, check_arguments
from cirlab.data.regions import EDIT_REGIONS_FILE, EditRegion, write_edit_regions
from cirlab.files import atomic_write_text

SPLITS = ("train", "val", "test1")  # cirr.SPLITS, not imported from there: reading pulls in torch
GENERATOR_VERSION = 1
ANNOTATIONS = "cirr"     # the CLIP4Cir layout: <root>/cirr/captions, <root>/cirr/image_splits
SET_SIZE = 6             # as on CIRR: every img_set has six members, the reference included
IMAGE_FOLDERS = {"train": "train", "val": "dev", "test1": "test1"}  # the files say val, the folder dev
_TRAIN_SUBFOLDERS = 100  # NLVR2's train/<0..99>/ sub-folders (they carry no meaning)
_INVERSE_QUERIES = 2     # per set, besides one query per variant and one between the twins
_VAGUE = 0.1             # share of colour/shape captions that do not name the new value
_CSS_TEXT = 0.1          # share of captions that are the terse CSS text itself ("make top-left object red")
_OMIT_TARGET = 0.013     # share of soft-labelled queries whose target_soft omits the target (real: 37 of 4,181 val)
PRESETS: dict[str, dict[str, int]] = {  # image sets per split; a set has 6 images and 8 queries
    "demo": {"train": 40, "val": 25, "test1": 25},
    "full": {"train": 3500, "val": 520, "test1": 520},
}
COMBOS: list[Combo] = [(c, s) for c in COLOURS for s in SHAPES]

# Where a grid cell is, said with its preposition; the vocabulary stays the CSS one otherwise.
PLACES = {
    "top-left": "in the top left corner", "top-center": "at the top", "top-right": "in the top right corner",
    "middle-left": "on the left", "middle-center": "in the center", "middle-right": "on the right",
    "bottom-left": "in the bottom left corner", "bottom-center": "at the bottom",
    "bottom-right": "in the bottom right corner",
}
CAPTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("add a {new} {place}", "put a {new} {place}", "place a {new} {place}",
            "there should also be a {new} {place}", "include a {new} {place}"),
    "remove": ("remove {ref}", "take away {ref}", "get rid of {ref}", "delete {ref}", "{ref} is gone",
               "the same picture without {ref}"),
    "color": ("make {ref} {value}", "change {ref} to {value}", "paint {ref} {value}", "turn {ref} {value}",
              "{ref} should be {value} instead"),
    "shape": ("turn {ref} into a {value}", "change {ref} into a {value}", "make {ref} a {value}",
              "{ref} becomes a {value}"),
    "large": ("make {ref} bigger", "enlarge {ref}", "make {ref} large", "{ref} should be larger"),
    "small": ("make {ref} smaller", "shrink {ref}", "make {ref} small", "{ref} should be smaller"),
    "vague color": ("change the color of {ref}", "give {ref} a different color", "recolor {ref}"),
    "vague shape": ("change the shape of {ref}", "give {ref} a different shape"),
}


@dataclass(frozen=True)
class SetQuery:
    reference: int   # member slot: 0 = the base scene, 1..5 = its variants
    target: int
    edit: Edit
    vague: bool      # the caption names the attribute but not its new value


def _changed_attributes(before: SceneObject, after: SceneObject) -> list[str]:
    return [a for a in ("color", "size", "shape") if getattr(before, a) != getattr(after, a)]


def _edit_between(rng: random.Random, source: Scene, before: SceneObject | None,
                  after: SceneObject | None) -> Edit:
    """The one CSS edit turning `before` (None: an empty cell) into `after` (None: removed) in `source`."""
    if before is None:
        return add_edit(source, after)
    ref = reference_fields(rng, source, before)
    if after is None:
        return remove_edit(source, before, ref)
    (attribute,) = _changed_attributes(before, after)
    return make_edit(source, before, ref, attribute, getattr(after, attribute))


def _twin_edits(rng: random.Random, base: Scene) -> tuple[Edit, Edit]:
    """Two edits of the same object (or empty cell) differing only in one value: each is the other's near miss."""
    kinds = (["color", "shape"] if base else []) + (["add"] if len(base) < MAX_OBJECTS else [])
    kind = rng.choice(kinds)
    if kind == "add":
        first = random_object(rng, rng.choice([c for c in range(9) if c not in {o.cell for o in base}]), COMBOS)
        attribute = rng.choice(("color", "size", "shape"))
        second = first._replace(**{attribute: rng.choice(new_values(first, attribute, COMBOS))})
        return add_edit(base, first), add_edit(base, second)
    obj = rng.choice(base)
    ref = reference_fields(rng, base, obj)
    first, second = rng.sample(new_values(obj, kind, COMBOS), 2)
    return make_edit(base, obj, ref, kind, first), make_edit(base, obj, ref, kind, second)


def _image_set(rng: random.Random) -> tuple[list[Scene], list[SetQuery]]:
    """Six scenes (base first) and eight one-edit queries among them: base -> each variant, the first
    twin -> the second, and two variants back -> base."""
    base = random_scene(rng, COMBOS)
    twins = _twin_edits(rng, base)
    edits = [*twins, *distinct_edits(rng, base, SET_SIZE - 3, COMBOS, excluded=[e.target for e in twins])]
    scenes = [base] + [edit.target for edit in edits]
    # A vague size change would still say it all: size has one other value.
    queries = [SetQuery(0, slot, edit, edit.kind == "make" and edit.attribute != "size" and rng.random() < _VAGUE)
               for slot, edit in enumerate(edits, start=1)]
    queries.append(SetQuery(1, 2, _edit_between(rng, scenes[1], twins[0].after, twins[1].after), False))
    for slot in sorted(rng.sample(range(1, SET_SIZE), _INVERSE_QUERIES)):
        edit = edits[slot - 1]
        queries.append(SetQuery(slot, 0, _edit_between(rng, scenes[slot], edit.after, edit.before), False))
    return scenes, queries


def _noun_phrase(obj: SceneObject, ref: tuple[str, ...]) -> str:
    words = [getattr(obj, f) for f in ("size", "color") if f in ref] + [obj.shape if "shape" in ref else "object"]
    return " ".join(["the", *words] + ([PLACES[GRID_CELLS[obj.cell]]] if "cell" in ref else []))


def caption(rng: random.Random, edit: Edit, vague: bool = False) -> str:
    """A natural sentence for one CSS edit, from several templates, with CIRR-like casing and punctuation."""
    if edit.kind == "add":
        new = edit.after
        key, fields = "add", {"new": f"{new.size} {new.color} {new.shape}", "place": PLACES[GRID_CELLS[new.cell]]}
    else:
        fields = {"ref": _noun_phrase(edit.before, edit.ref)}
        if edit.kind == "remove":
            key = "remove"
        elif vague:
            key = f"vague {edit.attribute}"
        else:
            value = getattr(edit.after, edit.attribute)
            key = value if edit.attribute == "size" else edit.attribute
            fields["value"] = value
    text = edit.text if not vague and rng.random() < _CSS_TEXT else rng.choice(CAPTION_TEMPLATES[key]).format(**fields)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.3 else text


def _changes(a: Scene, b: Scene) -> dict[int, tuple[SceneObject | None, SceneObject | None]]:
    """Cell -> (object in a, object in b) for every cell where the two scenes differ."""
    in_a, in_b = {o.cell: o for o in a}, {o.cell: o for o in b}
    return {cell: (in_a.get(cell), in_b.get(cell)) for cell in sorted(set(in_a) | set(in_b))
            if in_a.get(cell) != in_b.get(cell)}


def soft_label(reference: Scene, query: SetQuery, member: Scene) -> float | None:
    """How well `member` satisfies the query's caption: 1.0 it does, 0.5 partly (the same change of the
    same object or cell with another value), -1.0 it does not (another change of that object or cell),
    None when it changes something else (unlabelled)."""
    edit = query.edit
    cell = (edit.before if edit.before is not None else edit.after).cell
    changes = _changes(reference, member)
    if set(changes) != {cell}:
        return None
    before, after = changes[cell]
    if (before, after) == (edit.before, edit.after):
        return 1.0
    kind = "add" if before is None else "remove" if after is None else "make"
    if kind != edit.kind:
        return -1.0
    if kind == "make" and _changed_attributes(before, after) != [edit.attribute]:
        return -1.0
    return 1.0 if query.vague else 0.5


@dataclass
class _Split:
    entries: list[dict[str, Any]]
    images: dict[str, dict[str, Any]]   # name -> {"path": relative path, "objects": scene as object dicts}
    regions: list[tuple[str, str, Edit, str]]  # (reference name, target name, edit, caption), in entry order
    counts: dict[str, int]


def _image_name(split: str, set_id: int, position: int) -> str:
    """NLVR2-style names "<folder>-<n>-<m>-img<0|1>": six per set, two per sentence id m."""
    return f"{IMAGE_FOLDERS[split]}-{set_id}-{position // 2}-img{position % 2}"


def _relative_path(split: str, set_id: int, name: str) -> str:
    sub = f"/{set_id % _TRAIN_SUBFOLDERS}" if split == "train" else ""
    return f"./{IMAGE_FOLDERS[split]}{sub}/{name}.png"


def _entry(rng: random.Random, query: SetQuery, scenes: list[Scene], names: list[str], set_id: int,
           labelled: bool, counts: dict[str, int]) -> dict[str, Any]:
    """One rc2 caption entry without its pairid; test1 (`labelled` false) has no targets, as in the real kit."""
    members = sorted(names)
    reference, target = names[query.reference], names[query.target]
    entry: dict[str, Any] = {"reference": reference}
    if labelled:
        labels = [(names[slot], soft_label(scenes[query.reference], query, scenes[slot]))
                  for slot in range(SET_SIZE) if slot != query.reference]
        soft = {name: label for name, label in labels if label is not None}
        if len(soft) > 1 and rng.random() < _OMIT_TARGET:
            del soft[target]
            counts["target_missing_from_soft"] += 1
        soft = {name: soft[name] for name in members if name in soft}
        for label in soft.values():
            counts[f"soft_{label}"] += 1
        entry.update(target_hard=target, target_soft=soft)
    entry["caption"] = caption(rng, query.edit, query.vague)
    entry["img_set"] = {"id": set_id, "members": members, "reference_rank": members.index(reference)}
    if labelled:
        entry["img_set"]["target_rank"] = members.index(target)
    counts["vague_captions"] += query.vague
    return entry


def _generate_split(rng: random.Random, split: str, sets: int, first_set: int, first_pair: int) -> _Split:
    result = _Split([], {}, [], {"sets": sets, "images": 0, "queries": 0, "vague_captions": 0,
                                 "soft_1.0": 0, "soft_0.5": 0, "soft_-1.0": 0, "target_missing_from_soft": 0})
    pending = []
    for set_id in range(first_set, first_set + sets):
        scenes, queries = _image_set(rng)
        positions = rng.sample(range(SET_SIZE), SET_SIZE)  # the base lands anywhere in the set
        names = [_image_name(split, set_id, p) for p in positions]
        for name, scene in sorted(zip(names, scenes)):
            result.images[name] = {"path": _relative_path(split, set_id, name),
                                   "objects": [o.as_dict() for o in scene]}
        for query in queries:
            entry = _entry(rng, query, scenes, names, set_id, split != "test1", result.counts)
            pending.append((entry, (entry["reference"], names[query.target], query.edit, entry["caption"])))
    rng.shuffle(pending)  # the real files do not group queries by set
    for pairid, (entry, region) in enumerate(pending, start=first_pair):
        result.entries.append({"pairid": pairid, **entry})
        result.regions.append(region)
    result.counts["images"], result.counts["queries"] = len(result.images), len(result.entries)
    return result


def _regions(split: str, generated: _Split, image_size: int) -> Iterator[EditRegion]:
    """One region per query, in entry order; images are indexed by their position in the split file.
    A generator, so that each mask is freed once written."""
    index = {name: position for position, name in enumerate(generated.images)}
    for reference, target, edit, text in generated.regions:
        mask = edit_mask(edit, image_size)
        yield EditRegion.from_masks(split, index[reference], index[target], text, edit.kind, edit.attribute,
                                    mask, mask)


def generate_cirr(out: Path, preset: str = "demo", seed: int = 0, image_size: int = 64, progress: bool = True,
                  *, sets: int | None = None) -> Path:
    """Write a synthetic CIRR (rc2 layout, CLIP4Cir folder structure) to the new or empty folder `out`.

    The same arguments give byte-identical files. `sets` overrides the preset's number of image sets
    per split (tests use tiny datasets). `generation.json` is written last, so its presence marks a
    complete dataset.
    """
    check_arguments("CIRR", preset, PRESETS, image_size, MIN_IMAGE_SIZE, "sets", sets)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; choose a new output folder")
    counts = dict(PRESETS[preset]) if sets is None else {split: sets for split in SPLITS}

    generated: dict[str, _Split] = {}
    first_set = first_pair = 0
    for split in SPLITS:  # set ids and pair ids run on across the splits, unique as on CIRR
        rng = random.Random(f"cirlab-cirr:{seed}:{split}")
        generated[split] = _generate_split(rng, split, counts[split], first_set, first_pair)
        first_set += counts[split]
        first_pair += len(generated[split].entries)

    out.mkdir(parents=True, exist_ok=True)
    scenes = {info["path"][2:]: info["objects"] for gen in generated.values() for info in gen.images.values()}
    write_pngs(out, scenes, image_size, progress, "rendering CIRR images")
    for folder in ("captions", "image_splits"):
        (out / ANNOTATIONS / folder).mkdir(parents=True, exist_ok=True)
    for split, gen in generated.items():
        atomic_write_text(out / ANNOTATIONS / "captions" / f"cap.rc2.{split}.json", json.dumps(gen.entries) + "\n")
        paths = {name: info["path"] for name, info in gen.images.items()}
        atomic_write_text(out / ANNOTATIONS / "image_splits" / f"split.rc2.{split}.json", json.dumps(paths) + "\n")
    # test1 targets are withheld, as in the real kit, so its edit regions are too.
    write_edit_regions(out / EDIT_REGIONS_FILE,
                       (r for split in ("train", "val") for r in _regions(split, generated[split], image_size)))
    metadata = {
        "format": "cirr", "generator": "cirlab.data.cirr_scenes", "generator_version": GENERATOR_VERSION,
        "preset": preset, "seed": seed, "image_size": image_size,
        "structure": {"set_size": SET_SIZE, "twin_variants": 2, "queries_per_set": SET_SIZE + _INVERSE_QUERIES,
                      "vague_share": _VAGUE, "css_text_share": _CSS_TEXT, "omit_target_share": _OMIT_TARGET},
        "captions": {key: list(templates) for key, templates in CAPTION_TEMPLATES.items()},
        "counts": {split: gen.counts for split, gen in generated.items()},
    }
    atomic_write_text(out / GENERATION_FILE, json.dumps(metadata, indent=2) + "\n")
    return out
