"""FashionIQ (dress / shirt / toptee): the official annotation files and the de-facto evaluation.

Layout (CLIP4Cir / SPRC / SEARLE):
    <root>/captions/cap.<category>.<split>.json     [{"candidate", "target", "captions": [c1, c2]}]
    <root>/image_splits/split.<category>.<split>.json   [ASIN, ...]
    <root>/images/<ASIN>.jpg  (or .png: the community re-upload)
The test caption files have no "target" (labels withheld), so test queries have no targets.

Protocol choices, each a keyword argument:
- gallery: "split" = every ASIN of split.<cat>.<split>.json (CLIP4Cir, default) or "queries" = the
  union of candidates and targets of the split's triplets (the "VAL protocol"; higher numbers).
- reference: "kept" in the gallery (CLIP4Cir, SEARLE, Pic2Word; default) or "removed" (ARTEMIS, OFFSET).
- caption_join: how the two captions become the text (see `join_captions`); "cmap" makes two queries
  per triplet (one per caption order) and "symmetric" one query with two text variants whose score
  matrices are averaged (`EvalSet.texts`, `average_variant_scores`).
Training triplets use the same join (both orders for "cmap" and "symmetric"), or with
train_captions="clip4cir_random" CLIP4Cir's training texts: at every draw, one of "C1 and c2", "C2 and c1",
"C1" and "C2" at random (`clip4cir_training_texts`; the draw is the training loop's, from its RNG).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import EvalQuery, EvalSet, TrainingSet, Triplet, raise_first, read_json, read_json_records

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
CAPTION_JOINS = ("clip4cir", "starter_kit", "offset", "cmap", "symmetric")
TRAIN_CAPTIONS = ("join", "clip4cir_random")
GALLERIES = ("split", "queries")
REFERENCE_RULES = ("kept", "removed")
IMAGE_EXTENSIONS = (".jpg", ".png")
KS = (10, 50)

_CLIP4CIR_STRIP = ".?, "
_TOKEN = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")
_PUNCTUATION_TO_SPACE = str.maketrans({char: " " for char in string.punctuation})


def _kit_tokens(caption: str) -> list[str]:
    # The start kit lower-cases and NLTK-tokenises: words (hyphen/apostrophe inside kept) and each
    # punctuation mark become tokens. NLTK's contraction splitting ("does n't") is not reproduced.
    return _TOKEN.findall(caption.lower())


def _kit_join(first: str, second: str) -> str:
    return " ".join(_kit_tokens(first) + ["<and>"] + _kit_tokens(second))


def _offset_clean(caption: str, corrections: Mapping[str, str]) -> str:
    # DQU-CIR / OFFSET: lower-case, every punctuation mark becomes a space, words spell-corrected.
    words = caption.lower().translate(_PUNCTUATION_TO_SPACE).split()
    return " ".join(corrections.get(word, word) for word in words)


def join_captions(captions: Sequence[str], strategy: str = "clip4cir",
                  corrections: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The text(s) for one triplet's two captions: one string, or both orders for "cmap"/"symmetric".

    - clip4cir:    "{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"
    - starter_kit: lower-cased tokens of c1, "<and>", tokens of c2, space-separated
    - offset:      "{clean(c1)} and {clean(c2)}", clean = lower-case, punctuation to spaces,
                   whitespace collapsed, words mapped through `corrections` (DQU-CIR's correction_dict)
    - cmap:        the starter-kit join in both orders (two queries)
    - symmetric:   "{c1.strip('.?, ')} and {c2.strip('.?, ')}" and the reverse, not capitalised (SEARLE)
    """
    first, second = captions
    if strategy == "clip4cir":
        return (f"{first.strip(_CLIP4CIR_STRIP).capitalize()} and {second.strip(_CLIP4CIR_STRIP)}",)
    if strategy == "starter_kit":
        return (_kit_join(first, second),)
    if strategy == "offset":
        table = corrections or {}
        return (f"{_offset_clean(first, table)} and {_offset_clean(second, table)}",)
    if strategy == "cmap":
        return _kit_join(first, second), _kit_join(second, first)
    if strategy == "symmetric":
        a, b = first.strip(_CLIP4CIR_STRIP), second.strip(_CLIP4CIR_STRIP)
        return f"{a} and {b}", f"{b} and {a}"
    raise ValueError(f"unknown caption join {strategy!r} (known: {', '.join(CAPTION_JOINS)})")


def clip4cir_training_texts(captions: Sequence[str]) -> tuple[str, ...]:
    """CLIP4Cir's four training texts of one triplet, of which each step takes one uniformly: both joined
    orders and each caption alone, stripped of ".?, " and capitalised as its validation join."""
    first, second = (caption.strip(_CLIP4CIR_STRIP) for caption in captions)
    return (f"{first.capitalize()} and {second}", f"{second.capitalize()} and {first}",
            first.capitalize(), second.capitalize())


def _captions_file(root: Path, category: str, split: str) -> Path:
    return root / "captions" / f"cap.{category}.{split}.json"


def _split_file(root: Path, category: str, split: str) -> Path:
    return root / "image_splits" / f"split.{category}.{split}.json"


def _entry_problems(entry: Any, where: str, with_target: bool) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: expected an object, got {type(entry).__name__}"]
    problems = []
    keys = ("candidate", "target") if with_target else ("candidate",)
    for key in keys:
        if not isinstance(entry.get(key), str) or not entry[key]:
            problems.append(f"{where}: missing or non-string {key!r}")
    captions = entry.get("captions")
    if not (isinstance(captions, list) and len(captions) == 2 and all(isinstance(c, str) for c in captions)):
        problems.append(f"{where}: 'captions' must be a list of exactly 2 strings")
    return problems


def _read_entries(path: Path, with_target: bool) -> tuple[list[dict], list[str]]:
    return read_json_records(path, lambda entry, where: _entry_problems(entry, where, with_target), "triplets")


def _read_split(path: Path) -> tuple[list[str], list[str]]:
    names = read_json(path)
    if not isinstance(names, list):
        return [], [f"{path}: expected a JSON list of image names"]
    problems = [f"{path}: entry {i}: expected a non-empty string, got {n!r}"
                for i, n in enumerate(names) if not isinstance(n, str) or not n]
    return names, problems


def _image_extension(images: Path, names: Sequence[str], image_ext: str) -> str:
    """The file extension of this copy of the images: ".jpg", ".png", or detected from the first image of
    `names` that exists (the first may be missing: data.missing_images=skip)."""
    if image_ext != "auto":
        if image_ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"unknown image extension {image_ext!r} (known: auto, {', '.join(IMAGE_EXTENSIONS)})")
        return image_ext
    for name in names:
        for extension in IMAGE_EXTENSIONS:
            if (images / f"{name}{extension}").is_file():
                return extension
    raise DataFormatError(f"{images}: none of the split's {len(names)} images exists as .jpg or .png")


def _texts(entry: dict, caption_join: str, corrections: Mapping[str, str] | None) -> tuple[str, ...]:
    return join_captions(entry["captions"], caption_join, corrections)


def _training_set(root: Path, category: str, caption_join: str, corrections: Mapping[str, str] | None,
                  extension: str, train_captions: str) -> TrainingSet:
    path = _captions_file(root, category, "train")
    entries, problems = _read_entries(path, with_target=True)
    raise_first(problems, "check_fashioniq")
    if train_captions == "clip4cir_random":
        triplets = [Triplet(e["candidate"], texts[0], e["target"], texts)
                    for e in entries for texts in [clip4cir_training_texts(e["captions"])]]
    else:
        triplets = [Triplet(e["candidate"], text, e["target"]) for e in entries
                    for text in _texts(e, caption_join, corrections)]
    return TrainingSet.located(triplets, lambda image: root / "images" / f"{image}{extension}")


def _queries(entries: list[dict], caption_join: str, reference: str,
             corrections: Mapping[str, str] | None) -> list[EvalQuery]:
    queries = []
    for entry in entries:
        texts = _texts(entry, caption_join, corrections)
        targets = frozenset([entry["target"]]) if "target" in entry else frozenset()
        excluded = frozenset([entry["candidate"]]) if reference == "removed" else frozenset()
        if caption_join == "symmetric":
            queries.append(EvalQuery(entry["candidate"], texts[0], targets, excluded, text_variants=texts))
        else:
            queries.extend(EvalQuery(entry["candidate"], text, targets, excluded) for text in texts)
    return queries


def _gallery(names: list[str], entries: list[dict], gallery: str) -> list[str]:
    if gallery == "split":
        return list(names)
    used = {image for e in entries for image in (e["candidate"], e.get("target")) if image}
    return [name for name in names if name in used]


def _membership_problems(entries: list[dict], names: list[str], path: Path, split_path: Path) -> list[str]:
    known = set(names)
    return [f"{path}: entry {i}: {key} {e[key]!r} is not in {split_path.name}"
            for i, e in enumerate(entries) if isinstance(e, dict)
            for key in ("candidate", "target") if isinstance(e.get(key), str) and e[key] not in known]


def _protocol(gallery: str, reference: str, caption_join: str, corrections: Path | None,
              image_ext: str) -> dict[str, Any]:
    protocol: dict[str, Any] = {
        "gallery": ("all images of the split" if gallery == "split"
                    else "candidates and targets of the split's triplets"),
        "reference": reference,
        "caption_join": caption_join,
        "hit": "the triplet's target image",
        "image_ext": image_ext,
    }
    if caption_join == "cmap":
        protocol["queries"] = "two per triplet, one per caption order"
    if caption_join == "symmetric":
        protocol["text_scoring"] = "mean of the score matrices of both caption orders"
    if caption_join == "offset":
        protocol["corrections"] = str(corrections) if corrections else "none"
    return protocol


def load_fashioniq(root: Path | str, category: str, split: str = "val", *, gallery: str = "split",
                   reference: str = "kept", caption_join: str = "clip4cir", image_ext: str = "auto",
                   corrections: Path | None = None, train_captions: str = "join") -> tuple[TrainingSet, EvalSet]:
    """Training triplets of `category` (from cap.<category>.train.json, which must exist) and its
    evaluation set for `split` ("val" or "test").

    `train_captions`: "join" (the training texts use `caption_join`) or "clip4cir_random" (see the module doc).

    `corrections`: a JSON word -> word mapping applied by the "offset" join (DQU-CIR's
    correction_dict_<category>.json); ignored by the other joins."""
    root = Path(root)
    for name, value, known in (("category", category, CATEGORIES), ("split", split, SPLITS[1:]),
                               ("gallery", gallery, GALLERIES), ("reference", reference, REFERENCE_RULES),
                               ("caption_join", caption_join, CAPTION_JOINS),
                               ("train_captions", train_captions, TRAIN_CAPTIONS)):
        if value not in known:
            raise ValueError(f"unknown {name} {value!r} (known: {', '.join(known)})")
    table = read_json(corrections) if corrections is not None and caption_join == "offset" else None
    captions_path, split_path = _captions_file(root, category, split), _split_file(root, category, split)
    entries, problems = _read_entries(captions_path, with_target=split != "test")
    names, split_problems = _read_split(split_path)
    raise_first(problems + split_problems, "check_fashioniq")
    raise_first(_membership_problems(entries, names, captions_path, split_path), "check_fashioniq")
    if not names:
        raise DataFormatError(f"{split_path}: no images")
    extension = _image_extension(root / "images", names, image_ext)
    image_ids = set(names) | {e["candidate"] for e in entries}
    evalset = EvalSet(
        benchmark=f"fashioniq-{category}", split=split, gallery=_gallery(names, entries, gallery),
        image_paths={image: root / "images" / f"{image}{extension}" for image in sorted(image_ids)},
        queries=_queries(entries, caption_join, reference, table),
        protocol=_protocol(gallery, reference, caption_join, corrections, extension), ks=KS)
    return _training_set(root, category, caption_join, table, extension, train_captions), evalset


def combine_categories(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per-category metrics as "<category>/<metric>", their unweighted mean per metric (CLIP4Cir), and
    "avg" = mean of the averaged R@10 and R@50 (the leaderboards' single number) when both exist."""
    combined = {f"{category}/{metric}": value for category, metrics in per_category.items()
                for metric, value in metrics.items()}
    metrics = set.intersection(*(set(m) for m in per_category.values())) if per_category else set()
    for metric in sorted(metrics):
        combined[metric] = mean(per_category[c][metric] for c in per_category)
    if {"R@10", "R@50"} <= metrics:
        combined["avg"] = (combined["R@10"] + combined["R@50"]) / 2
    return combined


def check_fashioniq(root: Path | str, categories: Sequence[str] = CATEGORIES,
                    splits: Sequence[str] = SPLITS, image_ext: str = "auto") -> list[str]:
    """Every problem in the FashionIQ files of `categories` x `splits`: missing or malformed files and
    records, triplet images not in their split, and missing images."""
    root = Path(root)
    problems: list[str] = []
    for category in categories:
        for split in splits:
            problems += _check_one(root, category, split, image_ext)
    return problems


def _check_one(root: Path, category: str, split: str, image_ext: str) -> list[str]:
    captions_path, split_path = _captions_file(root, category, split), _split_file(root, category, split)
    try:
        entries, problems = _read_entries(captions_path, with_target=split != "test")
    except DataFormatError as error:
        entries, problems = [], [str(error)]
    try:
        names, split_problems = _read_split(split_path)
    except DataFormatError as error:
        names, split_problems = [], [str(error)]
    problems += split_problems
    if names:
        problems += _membership_problems(entries, names, captions_path, split_path)
    names = [n for n in names if isinstance(n, str) and n]
    extensions = [image_ext] if image_ext != "auto" else list(IMAGE_EXTENSIONS)
    for name in names:
        if not any((root / "images" / f"{name}{ext}").is_file() for ext in extensions):
            problems.append(f"image {name!r}: missing file {root / 'images' / name}{'|'.join(extensions)}")
    return problems
