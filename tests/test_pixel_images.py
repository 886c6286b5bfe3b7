"""PixelImages: threaded decoding keeps the paths' order and reports a bad file by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.data.errors import DataFormatError
from cirlab.image_batches import PixelImages


def _write_images(folder: Path, count: int) -> list[Path]:
    """Images whose top-left pixel encodes their index, so any reordering shows."""
    folder.mkdir()
    paths = []
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        pixels[0, 0] = (index, 255 - index, 7)
        paths.append(folder / f"{index:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_threaded_decoding_equals_one_thread_in_path_order(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "images", 40)
    threaded = PixelImages(paths[::-1], progress=False, workers=4)
    single = PixelImages(paths[::-1], progress=False, workers=1)
    assert torch.equal(threaded.pixels, single.pixels)
    assert threaded.pixels[:, 0, 0, 0].tolist() == list(range(39, -1, -1))


def test_a_corrupt_image_among_many_is_named(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "images", 20)
    paths[13].write_bytes(paths[13].read_bytes()[:50])
    with pytest.raises(DataFormatError, match=f"{paths[13]}: corrupt or unreadable image"):
        PixelImages(paths, progress=False, workers=4)
