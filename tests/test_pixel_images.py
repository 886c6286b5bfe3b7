"""PixelImages: threaded decoding keeps the paths' order and reports a bad file by name; batches are the
evaluation view, or with a generator the training augmentation's windows, drawn from that generator alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.data.errors import DataFormatError
from cirlab.image_batches import PixelImages
from cirlab.images import Preprocessing, pixels_to_uint8


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


CMAP = Preprocessing(size=224, resize_mode="pad", pre_crop_size=256, augment="crop_flip")


def _noise_files(folder: Path, count: int, side: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(1)
    paths = [folder / f"{index}.png" for index in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    return paths


def _window_at(window: np.ndarray, image: np.ndarray) -> tuple[int, int, bool] | None:
    """Where `window` (h x w x 3) sits in `image`, as it is or mirrored; None when it is no sub-array of it."""
    height, width = window.shape[:2]
    for flip in (False, True):
        candidate = window[:, ::-1] if flip else window
        for top in range(image.shape[0] - height + 1):
            for left in range(image.shape[1] - width + 1):
                if (image[top, left] == candidate[0, 0]).all() and np.array_equal(
                        image[top:top + height, left:left + width], candidate):
                    return top, left, flip
    return None


def test_crop_flip_windows_are_exact_sub_arrays_of_the_pre_crop_image(tmp_path: Path) -> None:
    paths = _noise_files(tmp_path / "images", 4, 256)  # square at the pre-crop size: stored as they are
    images = PixelImages(paths, progress=False, size=CMAP, workers=1)
    stored = images.stored.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(stored[1], np.asarray(Image.open(paths[1])))
    indices = [0, 1, 2, 3] * 3
    windows = pixels_to_uint8(images.batch(indices, generator=torch.Generator().manual_seed(0)))
    assert windows.shape == (12, 224, 224, 3)
    found = [_window_at(window, stored[index]) for window, index in zip(windows, indices, strict=True)]
    assert None not in found
    assert {flip for _, _, flip in found} == {False, True}
    assert len({(top, left) for top, left, _ in found}) > 6  # the windows move
    # without a generator: the evaluation view, the centre 224 window of each stored image
    assert np.array_equal(pixels_to_uint8(images.batch([2])), stored[2:3, 16:240, 16:240])
    assert torch.equal(images.pixels, images.stored[:, :, 16:240, 16:240])


def test_the_same_generator_seed_gives_the_same_batch_and_the_global_seed_none(tmp_path: Path) -> None:
    images = PixelImages(_noise_files(tmp_path / "images", 5, 40), progress=False,
                         size=Preprocessing(size=32, augment="crop_flip", pre_crop_size=40), workers=1)

    def batch(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return images.batch([4, 0, 3, 3], generator=torch.Generator().manual_seed(seed))

    assert torch.equal(batch(0, global_seed=1), batch(0, global_seed=2))
    assert not torch.equal(batch(0, global_seed=1), batch(1, global_seed=1))
    # a generator restored from a saved state (a resumed run) repeats the next batch exactly
    generator = torch.Generator().manual_seed(7)
    images.batch([0, 1], generator=generator)
    state = generator.get_state()
    following = images.batch([2, 3, 4], generator=generator)
    assert torch.equal(images.batch([2, 3, 4], generator=torch.Generator().set_state(state)), following)


def test_a_spec_without_augmentation_ignores_the_generator(tmp_path: Path) -> None:
    images = PixelImages(_noise_files(tmp_path / "images", 3, 40), progress=False,
                         size=Preprocessing(size=32, pre_crop_size=40), workers=1)
    generator = torch.Generator().manual_seed(0)
    before = generator.get_state()
    assert torch.equal(images.batch([0, 2], generator=generator), images.batch([0, 2]))
    assert torch.equal(generator.get_state(), before)  # nothing drawn: runs without augmentation stay as they were


def test_a_null_size_resolves_to_the_images_own_size(tmp_path: Path) -> None:
    images = PixelImages(_write_images(tmp_path / "images", 3), progress=False, workers=1)
    assert images.preprocessing == Preprocessing(size=(12, 12))
    assert torch.equal(images.pixels, images.stored)
