"""`cirlab data check`: every problem of a dataset on disk, each with its file and record.

Above `cirlab.data` rather than in it: besides the readers it decodes every image through `cirlab.images`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from cirlab.data.cirr import check_cirr
from cirlab.data.css import load_css
from cirlab.data.css_vocabulary import EDIT_REGIONS_3D_FILE, IMAGES_3D_DIR, IMAGES_DIR
from cirlab.data.errors import DataFormatError
from cirlab.data.fashion200k import check_fashion200k
from cirlab.data.fashioniq import check_fashioniq
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
}


def check_dataset(root: Path, format_name: str) -> list[str]:
    if format_name not in CHECKERS:
        raise ValueError(f"unknown dataset format '{format_name}' (known: {', '.join(CHECKERS)})")
    if not Path(root).is_dir():
        return [f"{root}: no such folder"]
    return CHECKERS[format_name](Path(root))
