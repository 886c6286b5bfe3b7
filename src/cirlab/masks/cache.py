"""Where dominant-portion masks live: one grey PNG per image, cached next to the dataset.

Layout, for a dataset folder DATA and a mask source SOURCE:

    DATA/dominant_masks/SOURCE/manifest.json      {"source", "settings", "format"}
    DATA/dominant_masks/SOURCE/<image path relative to DATA, suffix .png>

e.g. DATA/images/GD00000001.jpg -> DATA/dominant_masks/saliency/images/GD00000001.png. Mirroring the
dataset's own tree keeps images that share a file name in different folders apart. A mask has its
image's own size; 0-255 is how dominant a pixel is. Every file is written atomically, the manifest
first, so an interrupted build leaves complete masks and a rerun computes only the missing ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cirlab.files import atomic_write_bytes, atomic_write_text, png_bytes

MASKS_FOLDER = "dominant_masks"
MANIFEST = "manifest.json"
FORMAT = ("one grey PNG per image, at the image's size, named by the image's path relative to the dataset "
          "with the suffix .png; 255 = dominant")


class MaskCache:
    """The masks of one source under one dataset folder."""

    def __init__(self, root: Path, source: str) -> None:
        self.root = Path(root)
        self.source = source
        self.folder = self.root / MASKS_FOLDER / source

    @classmethod
    def find(cls, image: Path, source: str) -> MaskCache | None:
        """The cache of `source` in the nearest folder above `image` that holds one (a manifest), or None."""
        for folder in Path(image).absolute().parents:
            if (folder / MASKS_FOLDER / source / MANIFEST).is_file():
                return cls(folder, source)
        return None

    def settings(self) -> dict[str, Any] | None:
        """The settings recorded in the manifest; None when there is no manifest yet."""
        path = self.folder / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
            return dict(manifest["settings"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"unreadable mask manifest {path}: {error}") from error

    def prepare(self, settings: dict[str, Any], overwrite: bool = False) -> None:
        """Make the folder hold masks made with `settings`: a new folder gets the manifest; one made with
        other settings is refused, or with `overwrite` emptied first."""
        recorded = self.settings()
        if recorded == settings and not overwrite:
            return
        if recorded is not None and not overwrite:
            raise ValueError(f"the {self.source} masks in {self.folder} were made with {recorded}, not {settings}: "
                             "pass --overwrite to recompute them all")
        if overwrite and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {"source": self.source, "settings": settings, "format": FORMAT}
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    def path_of(self, image: Path) -> Path:
        """The mask file of `image`, which must lie inside the dataset folder."""
        try:
            relative = Path(image).absolute().relative_to(self.root.absolute())
        except ValueError:
            raise ValueError(f"image {image} is not inside the dataset folder {self.root}, whose masks are in "
                             f"{self.folder}") from None
        return (self.folder / relative).with_suffix(".png")

    def has(self, image: Path) -> bool:
        return self.path_of(image).is_file()

    def write(self, image: Path, mask: np.ndarray) -> None:
        if mask.ndim != 2 or mask.dtype != np.uint8:
            raise ValueError(f"a mask must be an H x W uint8 array, got {mask.dtype} of shape {mask.shape}")
        path = self.path_of(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, png_bytes(Image.fromarray(mask)))

    def read(self, image: Path) -> np.ndarray:
        """The mask of `image` (H x W uint8); raises ValueError naming the file when it is missing or broken."""
        return read_mask(self.path_of(image))


def read_mask(path: Path) -> np.ndarray:
    """A grey mask PNG as an H x W uint8 array (colour files are converted to grey)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except FileNotFoundError:
        raise ValueError(f"mask file {path} is missing") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"mask file {path} is corrupt or unreadable ({error})") from None

