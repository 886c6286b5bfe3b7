"""MIT-States with TIRG's composed-retrieval protocol.

Layout: <root>/images/<adj noun>/*.jpg, one folder per state-object pair. As in TIRG, folders without
a space, or whose adjective is literally "adj" (the unlabelled "adj <noun>" folders), are skipped.
The split is by noun: TIRG's 49 test nouns are test, every other noun is train.

Evaluation (TIRG `test_retrieval.py`): for every test image and every *other* adjective seen with its
noun in the test split, one query whose text is that adjective alone; a hit is any image captioned
"<adjective> <noun>"; gallery = every test image, the query's own image removed; R@1/5/10.
Training (TIRG `MITStates.__getitem__`): its loader shuffles images; a sampled image gets two fresh
targets, each a random adjective of its noun (it may be the image's own) and a random image of
"<adjective> <noun>", both redrawn until their adjectives differ; the two are consecutive in a batch.
Here: two slots per train image (so a uniform draw of slots is a uniform draw of images), adjacent;
`draws` (`AdjectiveDraws`) gives each slot a fresh (adjective, target) when sampled, and
`RetrievalSplit.draw_batch` keeps TIRG's rule for a pair of slots of one image drawn together (the
pair sampler's): their adjectives differ. The stored triplets are one such pair per image from a
generator seeded with `seed`: what a validation split carved from them scores.
An image's id is its path relative to <root>/images, e.g. "ancient castle/img_1.jpg".
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cirlab.data.errors import DataFormatError
from cirlab.data.evalsets import EvalQuery, EvalSet, TrainingSet, Triplet, raise_first
from cirlab.data.records import Pick, TargetDraws

TEST_NOUNS = frozenset({
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock", "clothes", "coffee",
    "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden", "gate", "glass", "horse", "island",
    "laptop", "lead", "lightning", "mirror", "orange", "paint", "persimmon", "plastic", "plate", "potato", "road",
    "rubber", "sand", "shell", "sky", "smoke", "steel", "stream", "table", "tea", "tomato", "vacuum", "wax",
    "wheel", "window", "wool",
})
SPLITS = ("train", "test")
KS = (1, 5, 10)
PROTOCOL = {
    "split": "TIRG's 49 test nouns",
    "queries": "every test image x every other adjective of its noun in the test split",
    "text": "the target adjective",
    "gallery": "all test images",
    "reference": "removed (that exact image only)",
    "hit": "retrieved image has the caption '<target adjective> <noun>'",
}


@dataclass(frozen=True)
class StateImage:
    image: str   # id: "<adj noun>/<file>"
    adj: str
    noun: str

    @property
    def caption(self) -> str:
        return f"{self.adj} {self.noun}"


def _pair(folder: str) -> tuple[str, str] | None:
    """(adjective, noun) of a folder name, or None for the folders TIRG skips."""
    if " " not in folder:
        return None
    adj, noun = folder.split(" ", 1)
    return None if adj == "adj" else (adj, noun)


def _scan(root: Path, split: str) -> tuple[list[StateImage], list[str]]:
    images_dir = root / "images"
    if not images_dir.is_dir():
        return [], [f"{images_dir}: missing image folder"]
    images, problems = [], []
    for folder in sorted(p for p in images_dir.iterdir() if p.is_dir()):
        pair = _pair(folder.name)
        if pair is None or (pair[1] in TEST_NOUNS) != (split == "test"):
            continue
        if " " in pair[1]:
            problems.append(f"{folder}: folder name has more than one space (expected '<adj> <noun>')")
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix != ".jpg":
                problems.append(f"{file}: not a .jpg image")
            else:
                images.append(StateImage(f"{folder.name}/{file.name}", *pair))
    return images, problems


class _Index:
    def __init__(self, images: list[StateImage]) -> None:
        self.images_of: dict[str, list[str]] = defaultdict(list)
        self.adjectives: dict[str, list[str]] = defaultdict(list)   # per noun, first-seen order
        for image in images:
            self.images_of[image.caption].append(image.image)
            if image.adj not in self.adjectives[image.noun]:
                self.adjectives[image.noun].append(image.adj)

    def problems(self, split: str) -> list[str]:
        # TIRG asserts this: a noun seen with one adjective has nothing to change into.
        return [f"{split} noun {noun!r}: only one adjective ({adjs[0]!r}); TIRG needs at least two"
                for noun, adjs in self.adjectives.items() if len(adjs) < 2]


def _queries(images: list[StateImage], index: _Index) -> list[EvalQuery]:
    return [EvalQuery(image.image, adj, frozenset(index.images_of[f"{adj} {image.noun}"]), frozenset([image.image]))
            for image in images for adj in index.adjectives[image.noun] if adj != image.adj]


class AdjectiveDraws(TargetDraws):
    """TIRG's training draw of one target: a random adjective of the image's noun, a random image of it."""

    def __init__(self, images: list[StateImage], index: _Index) -> None:
        self.index = index
        self.noun_of = {image.image: image.noun for image in images}

    def images(self) -> Iterable[str]:
        return self.noun_of

    def draw(self, source: str, pick: Pick) -> tuple[str, str]:
        noun = self.noun_of[source]
        adj = pick(self.index.adjectives[noun])
        return adj, self.target(adj, noun, pick)

    def target(self, adj: str, noun: str, pick: Pick) -> str:
        return pick(self.index.images_of[f"{adj} {noun}"])

    def texts(self, source: str) -> frozenset[str]:
        return frozenset(self.index.adjectives[self.noun_of[source]])


def _train_triplets(images: list[StateImage], draws: AdjectiveDraws, seed: int) -> list[Triplet]:
    """Per image, TIRG's pair drawn with a seeded generator: two adjectives, redrawn until they differ."""
    rng = random.Random(seed)
    triplets = []
    for image in images:
        adjectives = draws.index.adjectives[image.noun]
        first, second = rng.choice(adjectives), rng.choice(adjectives)
        while first == second:
            first, second = rng.choice(adjectives), rng.choice(adjectives)
        triplets += [Triplet(image.image, adj, draws.target(adj, image.noun, rng.choice)) for adj in (first, second)]
    return triplets


def _split(root: Path, split: str) -> tuple[list[StateImage], _Index]:
    images, problems = _scan(root, split)
    index = _Index(images)
    raise_first(problems + index.problems(split), "check_mitstates")
    if not images:
        raise DataFormatError(f"{root / 'images'}: no {split} images")
    return images, index


def load_mitstates(root: Path | str, *, seed: int = 0) -> tuple[TrainingSet, EvalSet]:
    """Training slots (two per train image: a seeded TIRG pair, and the draws to redraw them) and the
    test evaluation set."""
    root = Path(root)
    train, train_index = _split(root, "train")
    test, test_index = _split(root, "test")
    evalset = EvalSet(benchmark="mitstates", split="test", gallery=[image.image for image in test],
                      image_paths={image.image: root / "images" / image.image for image in test},
                      queries=_queries(test, test_index),
                      protocol={**PROTOCOL, "train": "two fresh TIRG draws (different adjectives) each time a train "
                                                     f"image is sampled (stored pair: seed {seed})"},
                      ks=KS)
    draws = AdjectiveDraws(train, train_index)
    training = TrainingSet.located(_train_triplets(train, draws, seed), lambda image: root / "images" / image, draws)
    return training, evalset


def check_mitstates(root: Path | str) -> list[str]:
    """Every problem: missing image folder, malformed folder names, non-.jpg files, nouns with a
    single adjective."""
    root = Path(root)
    problems: list[str] = []
    for split in SPLITS:
        images, scan_problems = _scan(root, split)
        problems += [p for p in scan_problems if p not in problems] + _Index(images).problems(split)
    return problems
