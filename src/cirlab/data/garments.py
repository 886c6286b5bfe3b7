"""Synthetic garments in the real FashionIQ and Fashion200k on-disk layouts.

Dresses, shirts and tops with a colour, a pattern, a sleeve length, a hem length, a neckline and a
chest print, photographed like products on textured backgrounds among clutter and partial
occluders (`garment_render`). Each split of each category is a set of families: a base garment and
four variants that differ from it in one to three attributes; three of the variants are paired with
the base (two as targets, one as the reference) and captioned twice (`garment_captions`), the fourth
is a gallery-only near neighbour. Every garment of a category is unique, so validation and test
garments never occur in training. The files follow docs/formats.md (section "Synthetic garments"), so
`load_fashioniq` and `load_fashion200k` read generated and real data alike.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from cirlab.data.fashioniq import CATEGORIES, SPLITS, join_captions
from cirlab.data.garment_captions import product_caption, relative_captions
from cirlab.data.garment_render import (
    ATTRIBUTES,
    PATTERNS,
    PRINTS,
    Garment,
    Photo,
    attribute_values,
    edit_region,
    random_photo,
    render,
)
from cirlab.data.generation import GENERATION_FILE, check_arguments, prepare_output_folder
from cirlab.data.regions import EDIT_REGIONS_FILE, EditRegion, write_edit_regions
from cirlab.files import atomic_write_text

LAYOUTS = ("fashioniq", "fashion200k", "both")
PRESETS: dict[str, dict[str, int]] = {  # families per category and split; a family is 5 images, 3 triplets
    "demo": {"train": 60, "val": 20, "test": 20},
    "full": {"train": 1200, "val": 400, "test": 400},
}
GENERATOR_VERSION = 1
GARMENTS_FILE = "garments.jsonl"
TRIPLETS_FILE = "triplets.jsonl"
MASKS_DIR = "masks"
QUERIES_FILE = "test_queries.txt"
# Fashion200k names: the label-file category and the folder under women/ of each FashionIQ category.
FASHION200K_NAMES = {"dress": ("dress", "dresses"), "shirt": ("shirt", "shirts"), "toptee": ("top", "tops")}
FASHION200K_SPLITS = ("train", "test")  # Fashion200k has no validation split: val is not written there
MIN_IMAGE_SIZE = 32
JPEG_QUALITY = 92

_ID_LETTER = {"dress": "D", "shirt": "S", "toptee": "T"}
_VARIANTS = 4
_CHANGES = ((1, 2, 3), (45, 35, 20))        # attributes changed per variant, and their weights
_PATTERN_WEIGHTS = (2, 1, 1, 1, 1)         # plain is the most common fabric
_PRINT_WEIGHTS = (2, 1, 1, 1, 1, 1)        # as is no print
_STAGING = ".garments.partial"
_OUTPUT_DIRS = ("images", MASKS_DIR, "women")
_OUTPUT_FILES = ("captions", "image_splits", "labels", QUERIES_FILE, EDIT_REGIONS_FILE, GARMENTS_FILE,
                 TRIPLETS_FILE, GENERATION_FILE)


@dataclass
class _Image:
    id: str
    garment: Garment
    photo: Photo
    visible: float = 0.0     # filled in when rendered: the Fashion200k "detection score"


@dataclass
class _Triplet:
    reference: int           # image indices in the split
    target: int
    captions: list[str]
    mentioned: list[list[str]]


@dataclass
class _Split:
    category: str
    name: str
    families: int
    images: list[_Image] = field(default_factory=list)
    triplets: list[_Triplet] = field(default_factory=list)


def _random_garment(rng: random.Random, category: str, taken: set[Garment]) -> Garment:
    values = attribute_values(category)
    while True:  # terminates: the presets use well under half of each category's garments
        garment = Garment(category, color=rng.choice(values["color"]),
                          pattern=rng.choices(PATTERNS, weights=_PATTERN_WEIGHTS)[0],
                          sleeves=rng.choice(values["sleeves"]), hem=rng.choice(values["hem"]),
                          neckline=rng.choice(values["neckline"]), print=rng.choices(PRINTS, weights=_PRINT_WEIGHTS)[0])
        if garment not in taken:
            return garment


def _variant(rng: random.Random, base: Garment, taken: set[Garment]) -> Garment:
    values = attribute_values(base.category)
    while True:  # terminates: hundreds of garments are one to three changes from any base
        attributes = rng.sample(ATTRIBUTES, rng.choices(*_CHANGES)[0])
        garment = replace(base, **{a: rng.choice([v for v in values[a] if v != getattr(base, a)]) for a in attributes})
        if garment not in taken:
            return garment


def _generate_split(seed: int, split: _Split, first_id: int, taken: set[Garment]) -> None:
    """Families of one category and split; `taken` (every garment of the category so far) grows."""
    rng = random.Random(f"cirlab-garments:{seed}:{split.category}:{split.name}")
    for _ in range(split.families):
        base = _random_garment(rng, split.category, taken)
        taken.add(base)
        family = [base]
        for _ in range(_VARIANTS):
            family.append(_variant(rng, base, taken))
            taken.add(family[-1])
        start = len(split.images)
        for garment in family:
            image_id = f"G{_ID_LETTER[split.category]}{first_id + len(split.images):08d}"
            photo = random_photo(random.Random(f"cirlab-garments:{seed}:photo:{image_id}"), garment)
            split.images.append(_Image(image_id, garment, photo))
        for reference, target in ((0, 1), (0, 2), (3, 0)):  # the last variant is in the gallery only
            captions, mentioned = relative_captions(rng, family[reference], family[target])
            split.triplets.append(_Triplet(start + reference, start + target, captions, mentioned))


def _generate(seed: int, families: dict[str, int]) -> list[_Split]:
    splits = []
    for category in CATEGORIES:
        taken: set[Garment] = set()
        first_id = 0
        for name in SPLITS:
            split = _Split(category, name, families[name])
            _generate_split(seed, split, first_id, taken)
            first_id += len(split.images)
            splits.append(split)
    return splits


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _fashion200k_path(image: _Image) -> str:
    folder = FASHION200K_NAMES[image.garment.category][1]
    return f"women/{folder}/synthetic/{image.id}/{image.id}_0.jpeg"


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps small prints sharp
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _place(staging: Path, relative: str, data: bytes, link_to: Path | None = None) -> None:
    """Write `data` at staging/relative, or hard-link it to `link_to` (the same bytes) where possible."""
    path = staging / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if link_to is not None:
        try:
            os.link(link_to, path)
            return
        except OSError:
            pass  # a file system without hard links gets a copy
    path.write_bytes(data)


def _regions(splits: list[_Split], size: int, progress: bool) -> Iterator[EditRegion]:
    """One record per triplet, computed from the garments and photos alone (no pixels are kept)."""
    total = sum(len(s.triplets) for s in splits)
    with tqdm(total=total, desc="edit regions", unit="triplet", disable=not progress) as bar:
        for split in splits:
            for triplet in split.triplets:
                reference, target = split.images[triplet.reference], split.images[triplet.target]
                yield EditRegion.from_masks(
                    f"{split.category}.{split.name}", triplet.reference, triplet.target,
                    join_captions(triplet.captions, "clip4cir")[0], "change",
                    "+".join(reference.garment.changed(target.garment)),
                    edit_region(reference.garment, target.garment, reference.photo, size),
                    edit_region(reference.garment, target.garment, target.photo, size))
                bar.update()


def _render_all(staging: Path, splits: list[_Split], size: int, layout: str, progress: bool) -> None:
    """Every image (JPEG) and its garment mask (PNG)."""
    fashioniq, fashion200k = layout in ("fashioniq", "both"), layout in ("fashion200k", "both")
    total = sum(len(s.images) for s in splits)
    with tqdm(total=total, desc="rendering garments", unit="img", disable=not progress) as bar:
        for split in splits:
            for image in split.images:
                rendered = render(image.garment, image.photo, size)
                image.visible = rendered.visible
                photo = _jpeg(rendered.image)
                if fashioniq:
                    _place(staging, f"images/{image.id}.jpg", photo)
                if fashion200k:
                    _place(staging, _fashion200k_path(image), photo,
                           staging / f"images/{image.id}.jpg" if fashioniq else None)
                _place(staging, f"{MASKS_DIR}/{image.id}.png", _png(Image.fromarray(rendered.garment_mask)))
                bar.update()


def _json_list(items: list) -> str:
    return "[\n" + ",\n".join(json.dumps(item) for item in items) + "\n]\n"


def _write_fashioniq(out: Path, splits: list[_Split]) -> None:
    for folder in ("captions", "image_splits"):
        (out / folder).mkdir(exist_ok=True)
    for split in splits:
        entries = []
        for triplet in split.triplets:
            entry = {"target": split.images[triplet.target].id, "candidate": split.images[triplet.reference].id,
                     "captions": triplet.captions}
            if split.name == "test":  # the real kit withholds test targets
                del entry["target"]
            entries.append(entry)
        atomic_write_text(out / "captions" / f"cap.{split.category}.{split.name}.json", _json_list(entries))
        atomic_write_text(out / "image_splits" / f"split.{split.category}.{split.name}.json",
                          _json_list([image.id for image in split.images]))


def _one_word_apart(first: str, second: str) -> bool:
    a, b = first.split(), second.split()
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def _write_fashion200k(out: Path, splits: list[_Split]) -> int:
    """Label files per category and split, and test_queries.txt: the test pairs whose product
    captions differ in exactly one word (TIRG's "replace A with B" texts name one word); returns
    their number."""
    (out / "labels").mkdir(exist_ok=True)
    queries = []
    for split in splits:
        lines = [f"{_fashion200k_path(i)}\t{i.visible:.4f}\t{product_caption(i.garment)}\n" for i in split.images]
        name = FASHION200K_NAMES[split.category][0]
        atomic_write_text(out / "labels" / f"{name}_{split.name}_detect_all.txt", "".join(lines))
        if split.name == "test":
            for triplet in split.triplets:
                source, target = split.images[triplet.reference], split.images[triplet.target]
                if _one_word_apart(product_caption(source.garment), product_caption(target.garment)):
                    queries.append(f"{_fashion200k_path(source)} {_fashion200k_path(target)}\n")
    if queries:  # without the file, the reader builds queries from sibling captions itself
        atomic_write_text(out / QUERIES_FILE, "".join(queries))
    return len(queries)


def _write_records(out: Path, splits: list[_Split]) -> None:
    garments, triplets = [], []
    for split in splits:
        garments += [json.dumps({"id": image.id, "category": split.category, "split": split.name,
                                 "attributes": image.garment.attributes(), "background": image.photo.background,
                                 "props": len(image.photo.props), "occluders": len(image.photo.occluders),
                                 "visible": round(image.visible, 4)}) + "\n" for image in split.images]
        for triplet in split.triplets:
            reference, target = split.images[triplet.reference].garment, split.images[triplet.target].garment
            triplets.append(json.dumps({
                "category": split.category, "split": split.name, "candidate": split.images[triplet.reference].id,
                "target": split.images[triplet.target].id, "captions": triplet.captions,
                "changes": {a: [getattr(reference, a), getattr(target, a)] for a in reference.changed(target)},
                "mentioned": triplet.mentioned}) + "\n")
    atomic_write_text(out / GARMENTS_FILE, "".join(garments))
    atomic_write_text(out / TRIPLETS_FILE, "".join(triplets))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folders over the old ones; folders this layout does not write go away."""
    os.sync()  # one flush for every image: an fsync per file would cost minutes at full scale
    for name in _OUTPUT_DIRS:
        final, old = out / name, out / f".old-{name}"
        _remove(old)
        if final.exists():
            final.rename(old)
        if (staging / name).exists():
            (staging / name).rename(final)
        _remove(old)
    staging.rmdir()


def generate_garments(out: Path, preset: str = "demo", seed: int = 0, image_size: int = 256, layout: str = "both",
                      progress: bool = True, *, families: int | None = None) -> Path:
    """Write a synthetic garments dataset to `out` in the FashionIQ layout, the Fashion200k layout, or
    both at once (one folder that both readers accept); returns `out`.

    The same arguments give byte-identical files. `families` overrides the preset's number of
    families per category and split (tests use tiny datasets). `generation.json` is written last, so
    its presence marks a complete dataset."""
    check_arguments("garments", preset, PRESETS, image_size, MIN_IMAGE_SIZE, "families", families)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    out = prepare_output_folder(out, "garments", set(_OUTPUT_DIRS + _OUTPUT_FILES) | {_STAGING})

    counts = dict(PRESETS[preset]) if families is None else {name: families for name in SPLITS}
    splits = [s for s in _generate(seed, counts) if layout != "fashion200k" or s.name in FASHION200K_SPLITS]
    staging = out / _STAGING
    _remove(staging)
    staging.mkdir()
    _render_all(staging, splits, image_size, layout, progress)
    _move_into_place(staging, out)
    for name in ("captions", "image_splits", "labels", QUERIES_FILE):
        _remove(out / name)  # stale files of another layout; this one's are rewritten below
    test_queries = None
    if layout in ("fashioniq", "both"):
        _write_fashioniq(out, splits)
    if layout in ("fashion200k", "both"):
        test_queries = _write_fashion200k(out, [s for s in splits if s.name in FASHION200K_SPLITS])
    _write_records(out, splits)
    write_edit_regions(out / EDIT_REGIONS_FILE, _regions(splits, image_size, progress))
    metadata = {
        "format": [name for name in ("fashioniq", "fashion200k") if layout in (name, "both")],
        "generator": "cirlab.data.garments", "generator_version": GENERATOR_VERSION,
        "preset": preset, "seed": seed, "image_size": image_size, "layout": layout,
        "attributes": {category: attribute_values(category) for category in CATEGORIES},
        "structure": {"images_per_family": 1 + _VARIANTS, "triplets_per_family": 3,
                      "changed_attributes": dict(zip(*_CHANGES)), "captions_per_triplet": 2},
        "counts": {category: {s.name: {"families": s.families, "images": len(s.images), "triplets": len(s.triplets)}
                              for s in splits if s.category == category} for category in CATEGORIES},
    }
    if test_queries is not None:
        metadata["fashion200k_test_queries"] = test_queries
    atomic_write_text(out / GENERATION_FILE, json.dumps(metadata, indent=2) + "\n")
    return out
