"""Fashion200k with TIRG's composed-retrieval protocol.

Layout:
    <root>/labels/<category>_<split>_detect_all.txt   (all files of the split are read)
        lines "image_path <TAB> detection_score <TAB> description"
    <root>/test_queries.txt                           lines "source_path target_path" (TIRG's release)
    <root>/<image_path>                               e.g. women/dresses/.../<id>_0.jpeg
An image's id is its path string as written in the label file.

TIRG's rules, reproduced:
- captions are stripped and ".", "?", "&", "*" spelled out as "dotmark", "questionmark", "andmark",
  "starmark";
- a caption's parents are the caption with one word removed by *substring* replacement
  (`caption.replace(word, "")`, one pass of double-space collapsing, strip): removing "a" from
  "a black dress" also turns "black" into "blck". Kept for fidelity;
- a parent with at least two children links them as siblings; images of such children are
  "modifiable";
- the text is "replace {w_s} with {w_t}": w_s is the first source word absent from the target
  caption (the last source word if none is), and w_t the same the other way round;
- evaluation: gallery = every test image; the query's own image is removed; a hit is any image whose
  caption equals the target caption; R@1/10/50.
- training (TIRG `caption_index_sample_`): every time a modifiable image is sampled, a fresh target:
  a random parent of its caption, a random child caption of that parent other than its own, a random
  image with that caption (not uniform over targets: each parent, then each sibling, weighs alike).
  Here too: the training set has one slot per modifiable train image (TIRG's loader redraws a
  non-modifiable index until it is modifiable, so every modifiable image is alike), and `draws`
  (`SiblingDraws`) gives the fresh target each time the slot is sampled. The slot's stored triplet is
  one such draw from a generator seeded with `seed`: what a validation split carved from it scores.
Without test_queries.txt, test queries are every modifiable test image x every sibling caption
(documented in the protocol).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cirlab.data.evalsets import EvalQuery, EvalSet, TrainingSet, Triplet, missing_images, raise_first, read_lines
from cirlab.data.records import Pick, TargetDraws

SPLITS = ("train", "test")
QUERIES_FILE = "test_queries.txt"
KS = (1, 10, 50)
_MARKS = ((".", "dotmark"), ("?", "questionmark"), ("&", "andmark"), ("*", "starmark"))


@dataclass(frozen=True)
class LabelledImage:
    path: str          # as written in the label file; also the image id
    caption: str       # cleaned


def clean_caption(caption: str) -> str:
    """TIRG's caption post-processing."""
    caption = caption.strip()
    for mark, word in _MARKS:
        caption = caption.replace(mark, word)
    return caption


def different_words(source: str, target: str) -> tuple[str, str]:
    """(w_s, w_t) as TIRG picks them; its loops fall through to the last word when none differs."""
    source_words, target_words = source.split(), target.split()
    w_s = next((w for w in source_words if w not in target_words), source_words[-1])
    w_t = next((w for w in target_words if w not in source_words), target_words[-1])
    return w_s, w_t


def modification_text(source: str, target: str) -> str:
    w_s, w_t = different_words(source, target)
    return f"replace {w_s} with {w_t}"


def parent_captions(caption: str) -> list[str]:
    """The caption with each of its words removed, by TIRG's substring replacement (quirk kept)."""
    return [caption.replace(word, "").replace("  ", " ").strip() for word in caption.split()]


def _parse_labels(path: Path) -> tuple[list[LabelledImage], list[str]]:
    images, problems = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            problems.append(f"{path}: line {number}: expected 3 TAB-separated fields, got {len(fields)}")
            continue
        image_path, score, caption = fields
        try:
            float(score)
        except ValueError:
            problems.append(f"{path}: line {number}: detection score {score!r} is not a number")
            continue
        if not image_path.strip() or not clean_caption(caption):
            problems.append(f"{path}: line {number}: empty image path or caption")
            continue
        images.append(LabelledImage(image_path.strip(), clean_caption(caption)))
    return images, problems


def _read_split(root: Path, split: str) -> tuple[list[LabelledImage], list[str]]:
    """Every label file of `split` (TIRG reads all of them, whatever the category), in name order."""
    files = sorted((root / "labels").glob(f"*_{split}_detect_all.txt"))
    if not files:
        return [], [f"{root / 'labels'}: no *_{split}_detect_all.txt label files"]
    images: list[LabelledImage] = []
    problems: list[str] = []
    for path in files:
        found, file_problems = _parse_labels(path)
        images += found
        problems += file_problems
    counts: dict[str, int] = defaultdict(int)
    for image in images:
        counts[image.path] += 1
    problems += [f"{split} labels: image path {path!r} is listed {n} times" for path, n in counts.items() if n > 1]
    return images, problems


class CaptionIndex:
    """TIRG's caption index: images per caption, children per parent, parents per modifiable image."""

    def __init__(self, images: list[LabelledImage]) -> None:
        self.images_of: dict[str, list[str]] = defaultdict(list)
        for image in images:
            self.images_of[image.caption].append(image.path)
        children: dict[str, list[str]] = {}
        for caption in self.images_of:
            for parent in parent_captions(caption):
                siblings = children.setdefault(parent, [])
                if caption not in siblings:
                    siblings.append(caption)
        self.children = {parent: kids for parent, kids in children.items() if len(kids) >= 2}
        # Per image, in TIRG's order (one entry per linking parent).
        self.parents_of: dict[str, list[str]] = defaultdict(list)
        for parent, kids in self.children.items():
            for caption in kids:
                for path in self.images_of[caption]:
                    self.parents_of[path].append(parent)

    def siblings(self, path: str, caption: str) -> list[str]:
        """Captions one word away from `caption` through any of the image's parents, first-seen order."""
        found = dict.fromkeys(c for p in self.parents_of.get(path, []) for c in self.children[p] if c != caption)
        return list(found)


class SiblingDraws(TargetDraws):
    """TIRG's training draw of a modifiable image: parent, sibling caption, image of that caption."""

    def __init__(self, images: list[LabelledImage]) -> None:
        self.index = CaptionIndex(images)
        # Modifiable images only; every target is one too (it has the source's parent).
        self.caption_of = {image.path: image.caption for image in images if image.path in self.index.parents_of}
        self._texts: dict[str, frozenset[str]] = {}  # per caption: all images of a caption share their parents

    def images(self) -> Iterable[str]:
        return self.caption_of

    def draw(self, source: str, pick: Pick) -> tuple[str, str]:
        caption = self.caption_of[source]
        while True:  # as TIRG: a random parent, then a random child other than the own caption
            target_caption = pick(self.index.children[pick(self.index.parents_of[source])])
            if target_caption != caption:
                break
        return modification_text(caption, target_caption), pick(self.index.images_of[target_caption])

    def texts(self, source: str) -> frozenset[str]:
        caption = self.caption_of[source]
        if caption not in self._texts:
            siblings = self.index.siblings(source, caption)
            self._texts[caption] = frozenset(modification_text(caption, sibling) for sibling in siblings)
        return self._texts[caption]


def _train_triplets(images: list[LabelledImage], draws: SiblingDraws, seed: int) -> list[Triplet]:
    """One seeded draw per modifiable image, in label-file order."""
    rng = random.Random(seed)
    return [Triplet(image.path, *draws.draw(image.path, rng.choice))
            for image in images if image.path in draws.caption_of]


def _query(source: LabelledImage, target_caption: str, index: CaptionIndex) -> EvalQuery:
    return EvalQuery(source.path, modification_text(source.caption, target_caption),
                     frozenset(index.images_of[target_caption]), frozenset([source.path]))


def _listed_queries(path: Path, by_path: dict[str, LabelledImage]) -> tuple[list[tuple[str, str]], list[str]]:
    pairs, problems = [], []
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            problems.append(f"{path}: line {number}: expected 'source_path target_path', got {len(fields)} fields")
            continue
        unknown = [f for f in fields if f not in by_path]
        problems += [f"{path}: line {number}: {f!r} is not a test image" for f in unknown]
        if not unknown:
            pairs.append((fields[0], fields[1]))
    return pairs, problems


def _test_queries(root: Path, images: list[LabelledImage], index: CaptionIndex) -> tuple[list[EvalQuery], str]:
    by_path = {image.path: image for image in images}
    path = root / QUERIES_FILE
    if path.is_file():
        pairs, problems = _listed_queries(path, by_path)
        raise_first(problems, "check_fashion200k")
        return [_query(by_path[s], by_path[t].caption, index) for s, t in pairs], QUERIES_FILE
    built = [_query(image, caption, index) for image in images for caption in index.siblings(image.path, image.caption)]
    return built, "built: every modifiable test image x every sibling caption"


def _protocol(queries: str, seed: int) -> dict[str, Any]:
    return {"gallery": "all test images", "reference": "removed (that exact image only)",
            "hit": "retrieved image has the target caption", "queries": queries,
            "text": "replace {w_s} with {w_t}",
            "train": f"a fresh TIRG draw each time a modifiable image is sampled (stored draw: seed {seed})"}


def load_fashion200k(root: Path | str, *, seed: int = 0) -> tuple[TrainingSet, EvalSet]:
    """Training slots (a seeded TIRG draw each, and the draws to redraw them) and the test evaluation set."""
    root = Path(root)
    train, train_problems = _read_split(root, "train")
    test, test_problems = _read_split(root, "test")
    raise_first(train_problems + test_problems, "check_fashion200k")
    index = CaptionIndex(test)
    queries, origin = _test_queries(root, test, index)
    evalset = EvalSet(benchmark="fashion200k", split="test", gallery=[image.path for image in test],
                      image_paths={image.path: root / image.path for image in test}, queries=queries,
                      protocol=_protocol(origin, seed), ks=KS)
    draws = SiblingDraws(train)
    return TrainingSet.located(_train_triplets(train, draws, seed), lambda image: root / image, draws), evalset


def check_fashion200k(root: Path | str) -> list[str]:
    """Every problem: missing label files, malformed lines, duplicate paths, test_queries.txt lines
    naming unknown images, and missing image files."""
    root = Path(root)
    problems: list[str] = []
    for split in SPLITS:
        images, split_problems = _read_split(root, split)
        problems += split_problems + missing_images({image.path: root / image.path for image in images})
        if split == "test" and (root / QUERIES_FILE).is_file():
            problems += _listed_queries(root / QUERIES_FILE, {image.path: image for image in images})[1]
    return problems
