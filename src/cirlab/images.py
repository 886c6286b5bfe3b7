"""The one image pipeline: decode any supported file to upright RGB, then fit it to the model's input.

Every entry point (training, evaluation, indexing, `cirlab search`/`explain`, the REST API) decodes with
`load_image` or `decode_image` and preprocesses with `fit_image`/`image_tensor`, so a photo is seen
the same way everywhere. This module knows no dataset format and no model: it sits below both.

Decoding rules (`to_rgb`):
- EXIF orientation is applied, so a rotated phone photo is upright;
- animated GIF/WebP: the first frame;
- transparency (RGBA, LA, P with a transparent colour) is composited on white, as product photos expect;
- 16-bit and 32-bit grey (I;16, I) are scaled to 8 bits by their range, CMYK and the rest convert to RGB.

Size rules: any size from 1 x 1 and any aspect ratio. The only limit is on the *total* pixel count
(`max_pixels`, checked from the header before decoding), because decoding memory grows with the total:
an 8192 x 512 panorama is as cheap as a 2048 x 2048 photo.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from cirlab.data.errors import DataFormatError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

# What this module does to every image, in words: written beside the size into each checkpoint.
PREPROCESSING_STEPS = ["decode to upright RGB (EXIF orientation, first frame, transparency on white)",
                       "bicubic scale to cover size, centre crop", "ImageNet mean/std normalisation"]
Size = tuple[int, int]  # (height, width) of the model's input
_WHITE = (255, 255, 255)


class ImageDecodeError(DataFormatError):
    """An image that cannot be decoded; `too_large` tells a pixel-limit refusal from a broken file."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image as upright 8-bit RGB of its first frame (see the module's decoding rules)."""
    image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int | None, formats: tuple[str, ...] | None
            ) -> Image.Image:
    try:
        with Image.open(source, formats=formats) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageDecodeError(f"{name} is {image.width} x {image.height} pixels, more than the limit of "
                                       f"{max_pixels} pixels in total", too_large=True)
            image.load()
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"{name}: missing image") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"{name} has too many pixels ({error})", too_large=True) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow's "cannot identify image file <_io.BytesIO ...>" names an object, not the problem
        why = "no known image format" if isinstance(error, Image.UnidentifiedImageError) else str(error)
        problem = f" is not a readable {'/'.join(formats)} image" if formats else ": corrupt or unreadable image"
        raise ImageDecodeError(f"{name}{problem} ({why})") from None


def load_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file to upright RGB, so a truncated or corrupt file fails here, named."""
    return _decode(Path(path), str(path), max_pixels, None)


def decode_image(data: bytes, max_pixels: int | None = None, formats: tuple[str, ...] | None = None,
                 name: str = "image upload") -> Image.Image:
    """Decode image bytes in memory (an upload) to upright RGB; the pixel limit is checked from the header."""
    if not data:
        raise ImageDecodeError(f"{name} is empty")
    return _decode(io.BytesIO(data), name, max_pixels, formats)


def as_size(size: int | Size | list[int] | None) -> Size | None:
    """A model input size as (height, width): an int is a square side; None means as the images come."""
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"image size must be a positive number of pixels, got {size}")
    return height, width


def fit_image(image: Image.Image, size: int | Size | None) -> Image.Image:
    """Upright RGB (`to_rgb`), scaled to cover `size` and centre-cropped to it (torchvision's Resize +
    CenterCrop); None: unchanged.

    The crop box is chosen in source pixels and resized in one step, so a 1 x 100000 strip never
    becomes a huge intermediate image."""
    image = image if image.mode == "RGB" else to_rgb(image)  # a PIL image from Python gets the same decoding rules
    target = as_size(size)
    if target is None or image.size == (target[1], target[0]):
        return image
    height, width = target
    scale = max(width / image.width, height / image.height)  # the smallest scale that covers the target
    box_width, box_height = width / scale, height / scale
    # clamped: the float box of an exact fit can overshoot the image by 1e-14, which Pillow refuses
    left, top = max(0.0, (image.width - box_width) / 2), max(0.0, (image.height - box_height) / 2)
    right, bottom = min(image.width, left + box_width), min(image.height, top + box_height)
    return image.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, right, bottom))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (B x 3 x H x W, any device) -> floats in [0, 1], ImageNet mean/std normalised."""
    floats = pixels.float().div_(255)
    return (floats - _MEAN.to(floats.device)) / _STD.to(floats.device)


def pixels_to_uint8(images: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised pixels (B x 3 x H x W) back to the uint8 images they came from (B x H x W x 3): the
    inverse of `normalise`, with the same constants."""
    floats = images.detach().float()
    restored = ((floats * _STD.to(floats.device) + _MEAN.to(floats.device)) * 255).round().clamp(0, 255)
    restored = restored.to(torch.uint8)
    return restored.permute(0, 2, 3, 1).cpu().numpy()


def image_tensor(image: Image.Image, size: int | Size | None = None) -> torch.Tensor:
    """One PIL image as a model-ready 3 x H x W tensor (the same preprocessing as training and evaluation)."""
    pixels = torch.from_numpy(np.asarray(fit_image(image, size)).copy()).permute(2, 0, 1)
    return normalise(pixels[None])[0]
