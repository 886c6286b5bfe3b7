"""`cirlab data check`: every problem of a dataset on disk, each with its file and record, and what training and
evaluation would keep of it with data.missing_images=skip.

Above `cirlab.data` rather than in it: besides the readers it decodes every image through `cirlab.images`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from cirlab.config import Config, DataConfig, ProtocolConfig
from cirlab.data.benchmarks import EVAL_SPLITS, load_benchmark
from cirlab.data.circo import check_circo
from cirlab.data.cirr import check_cirr
from cirlab.data.css import load_css
from cirlab.data.css_vocabulary import EDIT_REGIONS_3D_FILE, IMAGES_3D_DIR, IMAGES_DIR
from cirlab.data.errors import DataFormatError
from cirlab.data.fashion200k import check_fashion200k
from cirlab.data.fashioniq import CATEGORIES, check_fashioniq
from cirlab.data.folder import check_folder
from cirlab.data.mitstates import check_mitstates
from cirlab.data.regions import EDIT_REGIONS_FILE, read_edit_regions
from cirlab.data.shoes import check_shoes
from cirlab.images import load_image


def check_css(root: Path) -> list[str]:
    """The `.npy` structure and each images folder's completeness first (a problem there stops the
    check), then every image decoded: images/, and images_3d/ where a generated dataset has 3D
    renders; then the edit-region sidecars that are present."""
    problems = []
    for folder in [IMAGES_DIR] + ([IMAGES_3D_DIR] if (root / IMAGES_3D_DIR).is_dir() else []):
        try:
            dataset = load_css(root, images=folder)
        except DataFormatError as error:
            return problems + [str(error)]
        paths = dataset.train.image_paths + dataset.test.image_paths
        for path in tqdm(paths, desc=f"decoding {folder}", unit="img"):
            try:
                load_image(path)
            except DataFormatError as error:
                problems.append(str(error))
    for sidecar in (root / EDIT_REGIONS_FILE, root / EDIT_REGIONS_3D_FILE):
        if sidecar.is_file():
            try:
                read_edit_regions(sidecar)
            except DataFormatError as error:
                problems.append(str(error))
    return problems


def _check_folder(root: Path) -> list[str]:
    files = sorted(root.glob("*.jsonl"))
    return check_folder(root, files) if files else [f"{root}: no .jsonl file of triplets in this folder"]


CHECKERS: dict[str, Callable[[Path], list[str]]] = {
    "css": check_css,
    "fashioniq": check_fashioniq,
    "cirr": check_cirr,
    "shoes": check_shoes,
    "fashion200k": check_fashion200k,
    "mitstates": check_mitstates,
    "folder": _check_folder,
    "circo": check_circo,
}


def check_dataset(root: Path, format_name: str) -> list[str]:
    if format_name not in CHECKERS:
        raise ValueError(f"unknown dataset format '{format_name}' (known: {', '.join(CHECKERS)})")
    if not Path(root).is_dir():
        return [f"{root}: no such folder"]
    return CHECKERS[format_name](Path(root))


# No counts: CSS needs every image (skip does not apply), and a folder does not say which JSONL files train and
# which evaluate.
_UNCOUNTED = ("css", "folder")


def _skip_configs(root: Path, format_name: str) -> list[tuple[str, Config]]:
    """(name, config) of every evaluation split of the format, each FashionIQ category apart, skipping missing
    images."""
    categories = [[category] for category in CATEGORIES] if format_name == "fashioniq" else [None]
    configs = []
    for category in categories:
        for split in EVAL_SPLITS.get(format_name, (None,)):
            name = " ".join([format_name, *(category or []), *([split] if split else [])])
            data = DataConfig(format=format_name, root=str(root), categories=category, missing_images="skip")
            configs.append((name, Config(data=data, protocol=ProtocolConfig(split=split))))
    return configs


def kept_counts(root: Path, format_name: str) -> list[str]:
    """What data.missing_images=skip would train and evaluate on: one line per split with the training triplets,
    or the queries and gallery images, kept of all; or why a split cannot be read (its problems say more)."""
    if format_name in _UNCOUNTED or not Path(root).is_dir():
        return []
    lines: dict[str, None] = {}  # ordered, without the training line repeated for every evaluation split
    for name, config in _skip_configs(Path(root), format_name):
        try:
            benchmark = load_benchmark(config)
        except ValueError as error:  # DataFormatError and ConfigError included
            lines[f"{name}: cannot be read ({error})"] = None
            continue
        lines.update(dict.fromkeys(f"{count.split}: {count.describe()}" for count in benchmark.kept))
    return list(lines)
