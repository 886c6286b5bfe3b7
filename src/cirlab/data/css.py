"""CSS ("Color, Shape, Size", TIRG): the exact 2D renderer, a synthetic generator and the reader.

The generator writes the real CSS on-disk format (a pickled dict inside a `.npy` plus
`images/css_{split}_{idx:06d}.png`), so `load_css` serves TIRG's original file and generated data
alike. Field-by-field description: docs/formats.md.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from numbers import Integral, Real
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image
from tqdm import tqdm

from cirlab.data.css3d import RegionRecorder, settings
from cirlab.data.css_vocabulary import (
    BASE_SIZE,
    COLOURS,
    EDIT_REGIONS_3D_FILE,
    GRID_CELLS,
    HALF_SIZE,
    IMAGES_3D_DIR,
    IMAGES_DIR,
    SHAPES,
    SIZES,
)
from cirlab.data.errors import DataFormatError
from cirlab.data.generation import GENERATION_FILE, check_arguments, prepare_output_folder
from cirlab.data.regions import EDIT_REGIONS_FILE, EditRegion, write_edit_regions
from cirlab.files import atomic_write_bytes, atomic_write_text

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # NumPy < 2 has no numpy._core
    from numpy.core import multiarray as _multiarray

SPLITS = ("train", "test")
DATA_FILE = "css_toy_dataset_novel2_small.dup.npy"
GENERATOR_VERSION = 1

MIN_IMAGE_SIZE = 40                           # below this, truncation can merge neighbouring cells
_FLOAT_PALETTE = {name: np.array(rgb) / 255.0 for name, rgb in COLOURS.items()}
_UINT8_PALETTE = {name: np.array(rgb, dtype=np.uint8) for name, rgb in COLOURS.items()}

_Index = tuple[int | slice, slice]


def _half_size(size: str, image_size: int) -> float:
    if size not in HALF_SIZE:
        raise ValueError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    return HALF_SIZE[size] * image_size / BASE_SIZE


@lru_cache(maxsize=1 << 16)
def _footprint(shape: str, size: str, cy: float, cx: float, image_size: int) -> tuple[_Index, ...]:
    """The numpy indices TIRG's renderer paints, with its int() truncation and slice semantics."""
    h = _half_size(size, image_size)
    if shape == "rectangle":
        return ((slice(int(cy - h), int(cy + h)), slice(int(cx - h), int(cx + h))),)
    if shape == "circle":  # TIRG's "circle" is an L1 ball: half-width h - |r - cy| on row r
        rows = range(int(cy - h), int(cy + h) + 1)
        spans = tuple((r, slice(int(cx + abs(r - cy) - h), int(cx - abs(r - cy) + h))) for r in rows)
    elif shape == "triangle":  # apex up; the half-width grows by 1/2 px per row
        rows = range(int(cy - h), int(cy + h))
        spans = tuple((r, slice(int(cx - (r - cy + h) / 2), int(cx + (r - cy + h) / 2))) for r in rows)
    else:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    if rows and rows[-1] >= image_size:  # the reference raises IndexError here too
        raise ValueError(f"a {size} {shape} centred at row {cy:g} runs off the bottom of a {image_size}-px canvas")
    return spans


def _object_footprint(obj: dict, image_size: int) -> tuple[_Index, ...]:
    y, x = obj["pos"]
    return _footprint(obj["shape"], obj["size"], float(y) * image_size, float(x) * image_size, image_size)


def _paint(canvas: np.ndarray, objects: Iterable[dict], palette: dict[str, np.ndarray]) -> np.ndarray:
    for obj in objects:
        if obj["color"] not in palette:
            raise ValueError(f"unknown colour {obj['color']!r} (known: {', '.join(COLOURS)})")
        for index in _object_footprint(obj, canvas.shape[0]):
            canvas[index] = palette[obj["color"]]  # later objects overwrite earlier ones, as in TIRG
    return canvas


def render_scene(objects: list[dict], image_size: int = 64) -> np.ndarray:
    """TIRG's 2D rendering of a scene: H x W x 3 float64 in [0, 1] on a white canvas."""
    return _paint(np.ones((image_size, image_size, 3)), objects, _FLOAT_PALETTE)


def object_mask(obj: dict, image_size: int = 64) -> np.ndarray:
    """H x W bool: the pixels one object covers when drawn alone."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    for index in _object_footprint(obj, image_size):
        mask[index] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------

MAX_OBJECTS = 5
_JITTER = 2            # px at 64: with half-size 8 a large object stays inside its 21.3-px cell
_EDITS = 5             # queried edits per source: TIRG pairs two of them as hard negatives
_VARIANTS = 1          # extra one-edit neighbours per source that no query asks for (gallery only)
_DEPTH = 3             # a family is a tree of sources this many levels deep ...
_BRANCHING = 2         # ... where this many targets of each source become sources themselves
PRESETS: dict[str, dict[str, int]] = {  # families per split; a family has 7 sources, 35 queries, 43 images
    "demo": {"train": 43, "test": 23},
    "full": {"train": 460, "test": 460},
}
TEXT_TEMPLATES = {
    "add": "add <size> <color> <shape> to <cell>",
    "remove": "remove <ref>",
    "make": "make <ref> <new color | new size | new shape>",
}


class SceneObject(NamedTuple):
    cell: int
    shape: str
    color: str
    size: str
    dy: int  # jitter in px of the 64-px canvas; scales with the image
    dx: int

    def as_dict(self) -> dict[str, Any]:
        row, col = divmod(self.cell, 3)
        pos = ((row + 0.5) / 3 + self.dy / BASE_SIZE, (col + 0.5) / 3 + self.dx / BASE_SIZE)
        return {"color": self.color, "shape": self.shape, "size": self.size, "pos": pos}


Scene = tuple[SceneObject, ...]  # sorted by cell, at most one object per cell
Combo = tuple[str, str]          # (colour, shape)
REFERENCE_FIELDS = ("cell", "size", "color", "shape")


class Edit(NamedTuple):
    text: str
    kind: str                      # "add" | "remove" | "make"
    attribute: str | None          # for "make": "color" | "size" | "shape"
    before: SceneObject | None     # the edited object in the source (None for add)
    after: SceneObject | None      # the edited object in the target (None for remove)
    target: Scene
    ref: tuple[str, ...] = ()      # the REFERENCE_FIELDS the text names `before` by (remove, make)


def scene_key(scene: Scene) -> tuple[tuple[int, str, str, str], ...]:
    return tuple((o.cell, o.shape, o.color, o.size) for o in scene)


def _held_out_combos(seed: int) -> list[Combo]:
    """One (colour, shape) per shape, distinct colours: never in a train scene, free in test."""
    colours = random.Random(f"cirlab-css:{seed}:held-out").sample(list(COLOURS), len(SHAPES))
    return list(zip(colours, SHAPES))


def random_object(rng: random.Random, cell: int, combos: Sequence[Combo]) -> SceneObject:
    color, shape = rng.choice(combos)
    size = rng.choice(SIZES)
    return SceneObject(cell, shape, color, size, rng.randint(-_JITTER, _JITTER), rng.randint(-_JITTER, _JITTER))


def random_scene(rng: random.Random, combos: Sequence[Combo]) -> Scene:
    cells = sorted(rng.sample(range(9), rng.randint(1, MAX_OBJECTS)))
    return tuple(random_object(rng, cell, combos) for cell in cells)


def reference_fields(rng: random.Random, scene: Scene, obj: SceneObject) -> tuple[str, ...]:
    """A minimal-size subset of REFERENCE_FIELDS that picks out `obj` alone in `scene`."""
    for n in range(len(REFERENCE_FIELDS) + 1):
        unique = [subset for subset in combinations(REFERENCE_FIELDS, n)
                  if sum(all(getattr(o, f) == getattr(obj, f) for f in subset) for o in scene) == 1]
        if unique:
            break  # the position alone is always unique, so this happens by n = 1
    return rng.choice(unique)  # ties are drawn at random so every attribute gets used in text


def _describe(obj: SceneObject, ref: tuple[str, ...]) -> str:
    words = [GRID_CELLS[obj.cell]] if "cell" in ref else []
    words += [getattr(obj, f) for f in ("size", "color") if f in ref]
    words.append(obj.shape if "shape" in ref else "object")
    return " ".join(words)


def new_values(obj: SceneObject, attribute: str, combos: Sequence[Combo]) -> list[str]:
    if attribute == "size":
        return [s for s in SIZES if s != obj.size]
    if attribute == "color":
        return [c for c in COLOURS if c != obj.color and (c, obj.shape) in combos]
    return [s for s in SHAPES if s != obj.shape and (obj.color, s) in combos]


def add_edit(scene: Scene, new: SceneObject) -> Edit:
    text = f"add {new.size} {new.color} {new.shape} to {GRID_CELLS[new.cell]}"
    return Edit(text, "add", None, None, new, tuple(sorted(scene + (new,))))


def remove_edit(scene: Scene, obj: SceneObject, ref: tuple[str, ...]) -> Edit:
    others = tuple(o for o in scene if o.cell != obj.cell)
    return Edit(f"remove {_describe(obj, ref)}", "remove", None, obj, None, others, ref)


def make_edit(scene: Scene, obj: SceneObject, ref: tuple[str, ...], attribute: str, value: str) -> Edit:
    new = obj._replace(**{attribute: value})
    others = tuple(o for o in scene if o.cell != obj.cell)
    return Edit(f"make {_describe(obj, ref)} {value}", "make", attribute, obj, new, tuple(sorted(others + (new,))),
                ref)


def random_edit(rng: random.Random, scene: Scene, combos: Sequence[Combo]) -> Edit:
    kinds = (["add"] if len(scene) < MAX_OBJECTS else []) + (["remove", "make"] if scene else [])
    kind = rng.choice(kinds)
    if kind == "add":
        taken = {o.cell for o in scene}
        return add_edit(scene, random_object(rng, rng.choice([c for c in range(9) if c not in taken]), combos))
    obj = rng.choice(scene)
    ref = reference_fields(rng, scene, obj)
    if kind == "remove":
        return remove_edit(scene, obj, ref)
    attribute = rng.choice(("color", "size", "shape"))
    return make_edit(scene, obj, ref, attribute, rng.choice(new_values(obj, attribute, combos)))


def distinct_edits(rng: random.Random, scene: Scene, count: int, combos: Sequence[Combo],
                   excluded: Iterable[Scene] = ()) -> list[Edit]:
    """`count` edits of `scene` with distinct targets, none of them one of the `excluded` scenes."""
    seen = {scene_key(other) for other in excluded}
    edits: list[Edit] = []
    while len(edits) < count:  # terminates: every scene admits well over `count` distinct edits
        edit = random_edit(rng, scene, combos)
        if scene_key(edit.target) not in seen:
            seen.add(scene_key(edit.target))
            edits.append(edit)
    return edits


@dataclass
class _GeneratedSplit:
    scenes: list[Scene]
    pairs: list[tuple[int, Edit, int]]  # (source image, edit, target image)


def _generate_split(rng: random.Random, families: int, combos: Sequence[Combo]) -> _GeneratedSplit:
    """Trees of edits: chained sources make a source's parent and siblings compete with its targets,
    which keeps image-only retrieval weak, as on real CSS."""
    split = _GeneratedSplit([], [])
    for _ in range(families):
        split.scenes.append(random_scene(rng, combos))
        frontier: list[tuple[int, Scene | None]] = [(len(split.scenes) - 1, None)]
        for level in range(_DEPTH):
            next_frontier = []
            for source, parent in frontier:
                targets = []
                # Excluding the parent: no edit undoes the edit that produced its source.
                for number, edit in enumerate(distinct_edits(rng, split.scenes[source], _EDITS + _VARIANTS,
                                                             combos, () if parent is None else (parent,))):
                    split.scenes.append(edit.target)
                    if number < _EDITS:
                        split.pairs.append((source, edit, len(split.scenes) - 1))
                        targets.append(len(split.scenes) - 1)
                if level + 1 < _DEPTH:
                    next_frontier += [(t, split.scenes[source]) for t in rng.sample(targets, _BRANCHING)]
            frontier = next_frontier
    return split


def _labels(scenes: Sequence[Scene]) -> np.ndarray:
    ids: dict[tuple, int] = {}
    return np.array([ids.setdefault(scene_key(scene), len(ids)) for scene in scenes], dtype=np.int64)


def _mods(pairs: Iterable[tuple[int, Edit, int]]) -> list[dict[str, Any]]:
    """Pairs grouped by identical text (one mod per distinct text), in first-seen order."""
    by_text: dict[str, dict[str, Any]] = {}
    for source, edit, target in pairs:
        mod = by_text.setdefault(edit.text, {"to_str": edit.text, "from": [], "to": []})
        mod["from"].append(source)
        mod["to"].append(target)
    return list(by_text.values())


def edit_mask(edit: Edit, image_size: int) -> np.ndarray:
    """The pixels an edit is about, the same in source and target: the edited object before and after."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    for obj in (edit.before, edit.after):
        if obj is not None:
            mask |= object_mask(obj.as_dict(), image_size)
    return mask


def _regions(name: str, pairs: Sequence[tuple[int, Edit, int]], mods: Sequence[dict],
             mask_of: Callable[[int, Edit, int], np.ndarray]) -> list[EditRegion]:
    """One region per query, in `CSSSplit.queries()` order."""
    edits = {(source, edit.text, target): edit for source, edit, target in pairs}
    regions = []
    for mod in mods:
        for source, target in zip(mod["from"], mod["to"]):
            edit = edits[(source, mod["to_str"], target)]
            mask = mask_of(source, edit, target)
            regions.append(EditRegion.from_masks(name, source, target, mod["to_str"], edit.kind, edit.attribute,
                                                 mask, mask))
    return regions


def _image_name(split: str, index: int) -> str:
    return f"css_{split}_{index:06d}.png"


def write_pngs(out: Path, scenes: dict[str, list[dict]], image_size: int, progress: bool, desc: str,
               draw: Callable[[str, list[dict]], np.ndarray] | None = None) -> None:
    """Render each scene to the PNG at its path relative to `out` (with `draw(path, objects)`, TIRG's 2D
    renderer by default); every top-level folder of those paths is staged whole and renamed into place
    (replacing an old one) only when complete."""
    staging, old = out / ".images.partial", out / ".images.old"
    for stale in (staging, old):
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir()
    old.mkdir()
    for relative, objects in tqdm(scenes.items(), desc=desc, unit="img", disable=not progress):
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (draw(relative, objects) if draw is not None
                  else _paint(np.full((image_size, image_size, 3), 255, dtype=np.uint8), objects, _UINT8_PALETTE))
        Image.fromarray(pixels).save(path, format="PNG")
    os.sync()  # one flush for all PNGs: an fsync per file would cost minutes at full scale
    for folder in sorted(staging.iterdir()):
        if (out / folder.name).exists():
            (out / folder.name).rename(old / folder.name)
        folder.rename(out / folder.name)
    shutil.rmtree(staging)
    shutil.rmtree(old)


_OUTPUTS = (DATA_FILE, IMAGES_DIR, EDIT_REGIONS_FILE, ".images.partial", ".images.old", IMAGES_3D_DIR,
            EDIT_REGIONS_3D_FILE)


def _write_3d(out: Path, generated: dict[str, _GeneratedSplit], image_size: int,
              progress: bool) -> tuple[list[EditRegion], dict[str, Any]]:
    """The 3D renders into images_3d/; returns their edit regions (the edited object, before and after,
    with the shadow it casts: see `cirlab.data.css3d.Render3D.region`) and the renderer's settings."""
    def path(split: str, image: int) -> str:
        return f"{IMAGES_3D_DIR}/{_image_name(split, image)}"

    def edited(split: str, source: int, edit: Edit, target: int) -> list[tuple[str, int]]:
        scenes = generated[split].scenes
        return [(path(split, image), scenes[image].index(obj))
                for image, obj in ((source, edit.before), (target, edit.after)) if obj is not None]

    recorder = RegionRecorder(image_size, {key for split, gen in generated.items()
                                           for pair in gen.pairs for key in edited(split, *pair)})
    scenes = {path(split, index): [o.as_dict() for o in scene]
              for split, gen in generated.items() for index, scene in enumerate(gen.scenes)}
    write_pngs(out, scenes, image_size, progress, "rendering CSS 3D images", draw=recorder.draw)
    regions: list[EditRegion] = []
    for split, gen in generated.items():
        def mask(source: int, edit: Edit, target: int, split: str = split) -> np.ndarray:
            return np.logical_or.reduce([recorder.region(*key) for key in edited(split, source, edit, target)])
        regions += _regions(split, gen.pairs, _mods(gen.pairs), mask)
    return regions, {"images": IMAGES_3D_DIR, "edit_regions": EDIT_REGIONS_3D_FILE, **settings()}


def generate_css(out: Path, preset: str = "demo", seed: int = 0, image_size: int = 64, progress: bool = True,
                 *, families: int | None = None, with_3d: bool = False) -> Path:
    """Write a synthetic CSS dataset in the real on-disk format to `out`; returns `out`.

    The same arguments give byte-identical files. `families` overrides the preset's number of edit
    trees per split (tests use tiny datasets). `with_3d` also writes a 3D render of every scene
    (`cirlab.data.css3d`) to images_3d/ and their edit regions to edit_regions_3d.jsonl.
    `generation.json` is written last, so its presence marks a complete dataset.
    """
    check_arguments("CSS", preset, PRESETS, image_size, MIN_IMAGE_SIZE, "families", families)
    out = prepare_output_folder(out, "CSS", _OUTPUTS)
    if not with_3d:  # 3D renders of an earlier generation would not match the new scenes
        shutil.rmtree(out / IMAGES_3D_DIR, ignore_errors=True)
        (out / EDIT_REGIONS_3D_FILE).unlink(missing_ok=True)

    held_out = _held_out_combos(seed)
    every_combo = [(c, s) for c in COLOURS for s in SHAPES]
    allowed = {"train": [c for c in every_combo if c not in held_out], "test": every_combo}
    counts = dict(PRESETS[preset]) if families is None else {split: families for split in SPLITS}
    generated = {split: _generate_split(random.Random(f"cirlab-css:{seed}:{split}"), counts[split], allowed[split])
                 for split in SPLITS}

    data, regions, summary = {}, [], {}
    for split, gen in generated.items():
        mods = _mods(gen.pairs)
        labels = _labels(gen.scenes)
        data[split] = {"objects_img": [[o.as_dict() for o in scene] for scene in gen.scenes],
                       "labels": labels, "mods": mods}
        regions += _regions(split, gen.pairs, mods, lambda source, edit, target: edit_mask(edit, image_size))
        summary[split] = {"families": counts[split], "images": len(gen.scenes), "queries": len(gen.pairs),
                          "mods": len(mods), "sources": len({s for s, _, _ in gen.pairs}),
                          "labels": int(labels.max()) + 1}

    scenes = {f"{IMAGES_DIR}/{_image_name(split, index)}": objects
              for split in SPLITS for index, objects in enumerate(data[split]["objects_img"])}
    write_pngs(out, scenes, image_size, progress, "rendering CSS images")
    regions_3d, renders_3d = _write_3d(out, generated, image_size, progress) if with_3d else (None, None)
    buffer = io.BytesIO()
    np.save(buffer, data, allow_pickle=True)  # the real CSS format is a pickled dict
    atomic_write_bytes(out / DATA_FILE, buffer.getvalue())
    write_edit_regions(out / EDIT_REGIONS_FILE, regions)
    if regions_3d is not None:
        write_edit_regions(out / EDIT_REGIONS_3D_FILE, regions_3d)
    metadata = {
        "format": "css", "generator": "cirlab.data.css", "generator_version": GENERATOR_VERSION,
        "preset": preset, "seed": seed, "image_size": image_size,
        "held_out_combinations": [{"color": c, "shape": s} for c, s in held_out],
        "structure": {"depth": _DEPTH, "branching": _BRANCHING, "edits_per_source": _EDITS,
                      "gallery_only_variants_per_source": _VARIANTS, "max_objects": MAX_OBJECTS,
                      "jitter_px_at_64": _JITTER},
        "texts": TEXT_TEMPLATES, "counts": summary,
    }
    if renders_3d is not None:
        metadata["renders_3d"] = renders_3d
    atomic_write_text(out / GENERATION_FILE, json.dumps(metadata, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

# Everything a pickled NumPy array or scalar references, under NumPy 1 and NumPy 2 module names.
_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(module, name): getattr(_multiarray, name)
       for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")},
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits plain containers, strings, numbers and NumPy arrays; any other global is refused."""

    def __init__(self, handle: io.BufferedReader, path: Path) -> None:
        super().__init__(handle, encoding="latin1")  # latin1: the original file is a Python 2 pickle
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise DataFormatError(f"{self._path}: refusing to unpickle {module}.{name} "
                                  "(a CSS file may only hold containers, strings, numbers and NumPy arrays)")
        return _NUMPY_GLOBALS[(module, name)]


def _read_pickled_npy(path: Path) -> Any:
    """The object inside a pickled 0-d object `.npy`, without ever running arbitrary pickle code."""
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            version = npy_format.read_magic(handle)
            if version not in readers:
                raise DataFormatError(f"{path}: unsupported .npy format version {version}")
            shape, _, dtype = readers[version](handle)
            if dtype != np.dtype(object) or shape != ():
                raise DataFormatError(f"{path}: expected a pickled dict (0-d object array), "
                                      f"found a {dtype} array of shape {shape}")
            array = _NumpyOnlyUnpickler(handle, path).load()
    except DataFormatError:
        raise
    except Exception as error:  # any failure to parse these untrusted bytes is a format error
        raise DataFormatError(f"{path}: not a readable CSS .npy file ({type(error).__name__}: {error})") from None
    if not (isinstance(array, np.ndarray) and array.shape == () and array.dtype == object):
        raise DataFormatError(f"{path}: the pickle holds a {type(array).__name__}, expected a 0-d object array")
    return array.item()


def _integer(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _parse_object(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected an object dict, found {type(obj).__name__}")
    missing = [key for key in ("color", "shape", "size", "pos") if key not in obj]
    if missing:
        raise DataFormatError(f"{where}: missing {', '.join(missing)}")
    for key, known in (("color", COLOURS), ("shape", SHAPES), ("size", SIZES)):
        if obj[key] not in known:
            raise DataFormatError(f"{where}: unknown {key} {obj[key]!r}")
    pos = obj["pos"]
    if not (isinstance(pos, (list, tuple, np.ndarray)) and len(pos) == 2
            and all(isinstance(v, Real) and not isinstance(v, bool) for v in pos)):
        raise DataFormatError(f"{where}: 'pos' must be two numbers (y, x), found {pos!r}")
    return {"color": obj["color"], "shape": obj["shape"], "size": obj["size"], "pos": (float(pos[0]), float(pos[1]))}


def _parse_scenes(raw: Any, where: str) -> list[list[dict]]:
    if not isinstance(raw, (list, tuple)):
        raise DataFormatError(f"{where}: 'objects_img' must be a list of scenes, found {type(raw).__name__}")
    scenes = []
    for index, scene in enumerate(raw):
        if not isinstance(scene, (list, tuple)):
            raise DataFormatError(f"{where}: objects_img[{index}] must be a list of objects, "
                                  f"found {type(scene).__name__}")
        scenes.append([_parse_object(obj, f"{where}: objects_img[{index}][{k}]") for k, obj in enumerate(scene)])
    return scenes


def _parse_labels(raw: Any, count: int, where: str) -> np.ndarray:
    if raw is None:
        return np.arange(count, dtype=np.int64)  # the original file may lack labels: identity = index
    labels = np.asarray(raw)
    if labels.shape != (count,) or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise DataFormatError(f"{where}: 'labels' must be {count} integers (one per image), "
                              f"found {labels.dtype} of shape {labels.shape}")
    return labels.astype(np.int64)


def _parse_indices(raw: Any, count: int, where: str) -> list[int]:
    if not (isinstance(raw, (list, tuple, np.ndarray)) and all(_integer(v) for v in raw)):
        raise DataFormatError(f"{where}: must be a list of image indices")
    bad = [int(v) for v in raw if not 0 <= v < count]
    if bad:
        raise DataFormatError(f"{where}: image index {bad[0]} out of range (the split has {count} images)")
    return [int(v) for v in raw]


def _parse_mods(raw: Any, count: int, where: str) -> list[dict[str, Any]]:
    if not isinstance(raw, (list, tuple)):
        raise DataFormatError(f"{where}: 'mods' must be a list, found {type(raw).__name__}")
    mods = []
    for number, mod in enumerate(raw):
        at = f"{where}: mods[{number}]"
        if not (isinstance(mod, dict) and {"to_str", "from", "to"} <= set(mod)):
            raise DataFormatError(f"{at}: expected a dict with 'to_str', 'from' and 'to'")
        if not isinstance(mod["to_str"], str):
            raise DataFormatError(f"{at}: 'to_str' must be a string, found {type(mod['to_str']).__name__}")
        sources = _parse_indices(mod["from"], count, f"{at}['from']")
        targets = _parse_indices(mod["to"], count, f"{at}['to']")
        if len(sources) != len(targets):
            raise DataFormatError(f"{at}: 'from' has {len(sources)} entries but 'to' has {len(targets)}")
        mods.append({"to_str": mod["to_str"], "from": sources, "to": targets})
    return mods


def _image_paths(root: Path, name: str, count: int, data_file: Path, images: str) -> list[Path]:
    folder = root / images
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: missing images folder of {data_file}")
    present = set(os.listdir(folder))
    paths = [folder / _image_name(name, index) for index in range(count)]
    for index, path in enumerate(paths):
        if path.name not in present:
            raise DataFormatError(f"{path}: missing image ({name} image {index} of {data_file})")
    return paths


@dataclass
class CSSSplit:
    """One split as stored: scenes, identity labels, modification groups and image files."""

    scenes: list[list[dict]]      # objects_img: per image, its objects {color, shape, size, pos=(y, x)}
    labels: np.ndarray            # int64 per image; a retrieved image hits when its label equals the target's
    mods: list[dict]              # {"to_str": str, "from": list[int], "to": list[int]}
    image_paths: list[Path]

    def queries(self) -> list[tuple[int, str, int]]:
        """Every (source, text, target) of every mod, in mod order: the test queries of TIRG."""
        return [(source, mod["to_str"], target)
                for mod in self.mods for source, target in zip(mod["from"], mod["to"])]

    def edits_by_source(self) -> dict[int, list[tuple[str, int]]]:
        """Source image -> its (text, target) pairs, for the second, same-source draw of TIRG's sampler."""
        by_source: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for source, text, target in self.queries():
            by_source[source].append((text, target))
        return dict(by_source)


@dataclass
class CSSDataset:
    root: Path
    train: CSSSplit
    test: CSSSplit


def _parse_split(raw: Any, name: str, root: Path, data_file: Path, images: str) -> CSSSplit:
    where = f"{data_file}: split '{name}'"
    if not (isinstance(raw, dict) and {"objects_img", "mods"} <= set(raw)):
        raise DataFormatError(f"{where}: expected a dict with 'objects_img' and 'mods'")
    scenes = _parse_scenes(raw["objects_img"], where)
    labels = _parse_labels(raw.get("labels"), len(scenes), where)
    mods = _parse_mods(raw["mods"], len(scenes), where)
    return CSSSplit(scenes, labels, mods, _image_paths(root, name, len(scenes), data_file, images))


def load_css(path: Path, images: str = IMAGES_DIR) -> CSSDataset:
    """Read a CSS dataset (TIRG's original or a generated one); `path` is its folder or its `.npy` file.
    `images` names the folder next to it that holds the images (IMAGES_3D_DIR: a generated dataset's 3D renders)."""
    path = Path(path)
    if path.is_dir():
        root, data_file = path, path / DATA_FILE
    elif path.is_file():
        root, data_file = path.parent, path
    else:
        raise DataFormatError(f"{path}: no such CSS folder or file")
    if not data_file.is_file():
        raise DataFormatError(f"{data_file}: missing CSS data file")
    data = _read_pickled_npy(data_file)
    if not (isinstance(data, dict) and set(SPLITS) <= set(data)):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataFormatError(f"{data_file}: expected a dict with 'train' and 'test', found {found}")
    return CSSDataset(root, *(_parse_split(data[name], name, root, data_file, images) for name in SPLITS))
