"""The one image pipeline: decode any supported file to upright RGB, then fit it to the model's input.

Every entry point (training, evaluation, indexing, `cirlab search`/`explain`, the REST API) decodes with
`load_image` or `decode_image` and preprocesses with `fit_image`/`image_tensor` under the model's
`Preprocessing` (size, crop or pad, pre-crop size, training augmentation), so a photo is seen the same way
everywhere. This module knows no dataset format and no model: it sits below both.

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

import dataclasses
import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from cirlab.config import ConfigError, DataConfig
from cirlab.data.errors import DataFormatError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

DECODE_STEP = "decode to upright RGB (EXIF orientation, first frame, transparency on white)"
Size = tuple[int, int]  # (height, width) of the model's input
_WHITE = (255, 255, 255)
RESIZE_MODES = ("crop", "pad", "targetpad")
AUGMENTATIONS = ("none", "crop_flip", "resized_crop")
_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # Pillow's filter radii, in source pixels at scale 1
_DEFAULT_FILL = {"pad": 255, "targetpad": 0}  # CMAP pads white, CLIP4Cir black
_RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, which open_clip keeps


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


class PreprocessingError(ValueError):
    """A preprocessing setting that cannot be used; `key` names the setting (the `Preprocessing` field)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"preprocessing '{key}' {reason}")
        self.key, self.reason = key, reason


def _require(condition: bool, key: str, reason: str) -> None:
    if not condition:
        raise PreprocessingError(key, reason)


def _checked_size(size: Any, key: str) -> Size | None:
    try:
        return as_size(size)
    except (TypeError, ValueError, IndexError):
        raise PreprocessingError(key, f"must be a positive side or [height, width], got {size!r}") from None


def _checked_scale(scale: Any) -> tuple[float, float]:
    try:
        low, high = (float(bound) for bound in scale)
    except (TypeError, ValueError):
        raise PreprocessingError("augment_scale", f"must be two numbers [low, high], got {scale!r}") from None
    _require(0 < low <= high <= 1, "augment_scale", f"must satisfy 0 < low <= high <= 1, got {scale!r}")
    return low, high


@dataclass(frozen=True)
class Preprocessing:
    """How every image reaches the model, as data (open_clip's shape: a model config names its preprocessing).

    The deterministic part, used for evaluation, indexing, search, explanations and the images `PixelImages`
    decodes once (`stored_image`, `fit_image`):
    - `resize_mode` "crop" (the default): scale to cover `size`, centre crop (torchvision's Resize + CenterCrop);
    - "pad": pad to a square with grey level `fill` (white by default), the odd pixel going right or
      bottom (CMAP's PadSquare), then as "crop";
    - "targetpad": pad only an image whose long/short side ratio is at least `pad_ratio`, by the same whole
      number of pixels (rounded down) on both sides, to that ratio, then as "crop" (CLIP4Cir's TargetPad, black
      by default): a tall 1:3 photo keeps the central 1/`pad_ratio` of its height, where "crop" keeps a third;
    - `pre_crop_size`: fit to it first, then take the centre `size` window (torchvision's CenterCrop offsets;
      CMAP: 256, then 224); `interpolation` is the resampling, "bicubic" or "bilinear".
    The random training part (`augment`), drawn per image from a caller's generator (`draw_window`) and cut from
    the stored uint8 image (`cut_window`):
    - "crop_flip": a random `size` window of the pre-crop image, mirrored with probability 1/2 (CMAP);
    - "resized_crop": a random window of area fraction in `augment_scale` and aspect ratio in [3/4, 4/3],
      resized to `size` (torchvision's RandomResizedCrop, as open_clip trains OFFSET); no flip.

    Where the references' torchvision pipelines differ: the crop box is resampled in one float step, with no
    whole-pixel intermediate (their Resize rounds the long side down, then crops), which moves samples by under a
    pixel; only the part of a pad the filter reaches is built (a 1 x 100000 strip padded to a square costs
    nothing), equal to padding first up to Pillow's 8-bit rounding (+-1); random windows are cut from the stored
    image, not the photo (for "crop" with a pre-crop size: from its covering square, where torchvision's
    shorter-side Resize keeps the whole long side).
    """

    size: Size | None = None              # (height, width) the model sees; None: the images' own size
    resize_mode: str = "crop"
    pad_ratio: float = 1.25               # targetpad: the long/short side ratio it pads to
    pad_fill: int | None = None           # grey level of the pad; None: the mode's reference (pad 255, targetpad 0)
    pre_crop_size: Size | None = None     # fit to this, then crop `size` out of it
    interpolation: str = "bicubic"
    augment: str = "none"
    augment_scale: tuple[float, float] = (0.9, 1.0)  # resized_crop: the range of the window's area fraction

    def __post_init__(self) -> None:
        set_field = functools.partial(object.__setattr__, self)  # frozen: normalised once, here
        set_field("size", _checked_size(self.size, "size"))
        set_field("pre_crop_size", _checked_size(self.pre_crop_size, "pre_crop_size"))
        set_field("augment_scale", _checked_scale(self.augment_scale))
        for key, choices in (("resize_mode", RESIZE_MODES), ("interpolation", tuple(_RESAMPLING)),
                             ("augment", AUGMENTATIONS)):
            value = getattr(self, key)
            _require(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")
        _require(isinstance(self.pad_ratio, (int, float)) and not isinstance(self.pad_ratio, bool)
                 and self.pad_ratio >= 1, "pad_ratio", f"must be a number of at least 1, got {self.pad_ratio!r}")
        _require(self.pad_fill is None or (isinstance(self.pad_fill, int) and not isinstance(self.pad_fill, bool)
                                           and 0 <= self.pad_fill <= 255),
                 "pad_fill", f"must be a grey level from 0 to 255 or null, got {self.pad_fill!r}")
        _require(self.size is not None or self.resize_mode == "crop", "resize_mode",
                 f"{self.resize_mode!r} needs an image size, and the size is null (the images' own)")
        if self.pre_crop_size is not None:
            _require(self.size is not None, "pre_crop_size", "needs an image size to crop, and the size is null")
            _require(all(outer >= inner for outer, inner in zip(self.pre_crop_size, self.size, strict=True)),
                     "pre_crop_size", f"{list(self.pre_crop_size)} is smaller than the image size {list(self.size)}")

    @property
    def stored_size(self) -> Size | None:
        """What the deterministic resize produces and `PixelImages` keeps: the pre-crop size, else the size."""
        return self.pre_crop_size or self.size

    @property
    def fill(self) -> int:
        return self.pad_fill if self.pad_fill is not None else _DEFAULT_FILL.get(self.resize_mode, 255)

    @property
    def is_random(self) -> bool:
        return self.augment != "none"

    def with_size(self, size: int | Size | None) -> Preprocessing:
        return dataclasses.replace(self, size=size)

    @classmethod
    def from_config(cls, data: DataConfig) -> Preprocessing:
        """The spec a run's data config asks for (`data.image_size`, `data.resize_mode`, ...)."""
        try:
            return cls(size=data.image_size, resize_mode=data.resize_mode, pad_ratio=data.pad_ratio,
                       pad_fill=data.pad_fill, pre_crop_size=data.pre_crop_size, interpolation=data.interpolation,
                       augment=data.augment, augment_scale=data.augment_scale)
        except PreprocessingError as error:
            key = "image_size" if error.key == "size" else error.key
            raise ConfigError(f"config key 'data.{key}' {error.reason}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings plus the steps in words (a checkpoint's preprocessing.json)."""
        settings = dataclasses.asdict(self)
        for key in ("size", "pre_crop_size", "augment_scale"):
            settings[key] = None if settings[key] is None else list(settings[key])
        return {**settings, "steps": self.steps()}

    @classmethod
    def from_dict(cls, recorded: dict[str, Any]) -> Preprocessing:
        """A spec as `to_dict` wrote it. Only 'size' is required: a file that records nothing else (older
        checkpoints) means "crop" with the defaults. KeyError without 'size', PreprocessingError on a bad value."""
        settings = {field.name for field in dataclasses.fields(cls)} - {"size"}
        return cls(size=recorded["size"], **{key: value for key, value in recorded.items() if key in settings})

    def steps(self) -> list[str]:
        """What every image goes through, in words."""
        def words(size: Size | None) -> str:
            return "the image's own size" if size is None else f"{size[0]} x {size[1]}"

        fitted = {"crop": "scale to cover, centre crop",
                  "pad": f"pad to a square (grey {self.fill}), scale to cover, centre crop",
                  "targetpad": f"pad to side ratio {self.pad_ratio} where it is larger (grey {self.fill}), "
                               "scale to cover, centre crop"}[self.resize_mode]
        fitted = f"{self.interpolation} {fitted} to {words(self.stored_size)}"
        if self.pre_crop_size is not None:
            fitted += f", then its centre {words(self.size)}"
        training = {"none": "none", "crop_flip": "random window and horizontal flip",
                    "resized_crop": f"random resized window, area fraction {list(self.augment_scale)}"}[self.augment]
        return [DECODE_STEP, fitted, f"training augmentation: {training}", "ImageNet mean/std normalisation"]


def as_preprocessing(preprocessing: Preprocessing | int | Size | list[int] | None) -> Preprocessing:
    """A spec as given; a bare size (or None) is today's default: "crop" at that size."""
    return preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing(size=preprocessing)


def _padding(width: int, height: int, spec: Preprocessing) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of pad that the spec's mode adds around a width x height image."""
    if spec.resize_mode == "pad":
        wide, tall = max(height - width, 0), max(width - height, 0)
        return wide // 2, tall // 2, wide - wide // 2, tall - tall // 2
    if spec.resize_mode == "targetpad" and max(width, height) / min(width, height) >= spec.pad_ratio:
        side = max(width, height) / spec.pad_ratio
        across, down = max(int((side - width) / 2), 0), max(int((side - height) / 2), 0)
        return across, down, across, down
    return 0, 0, 0, 0


def _resample_width(image: Image.Image, pad_left: int, pad_right: int, out: int, scale: float, box_left: float,
                    spec: Preprocessing) -> Image.Image:
    """`image` with its width resampled to `out` pixels: the window from `box_left` (in padded columns) of the
    image padded by `pad_left` and `pad_right` columns of the fill, scaled by `scale`, as Pillow resizes a box.

    Only a margin of pad as wide as the filter reaches is built (bar pixels beyond it are pure fill in the
    reference too), so a 1 x 100000 strip padded to a square never becomes a 100000 x 100000 image."""
    resample = _RESAMPLING[spec.interpolation]
    if not pad_left and not pad_right:
        left, right = max(0.0, box_left), min(float(image.width), box_left + out / scale)
        return image.resize((out, image.height), resample, box=(left, 0, right, image.height))
    margin = math.ceil(_FILTER_SUPPORT[spec.interpolation] / min(scale, 1.0) + 2 / scale) + 2
    before, after = min(pad_left, margin), min(pad_right, margin)
    partial = Image.new("RGB", (image.width + before + after, image.height), (spec.fill,) * 3)
    partial.paste(image, (before, 0))
    offset = pad_left - before  # the padded column where `partial` starts
    # the output columns that `partial` covers (the tolerance absorbs the float noise of an exact fit)
    first = max(0, math.ceil((offset - box_left) * scale - 1e-9))
    last = min(out, math.floor((offset + partial.width - box_left) * scale + 1e-9))
    left = max(0.0, box_left + first / scale - offset)
    right = min(float(partial.width), box_left + last / scale - offset)
    strip = partial.resize((last - first, image.height), resample, box=(left, 0, right, image.height))
    if strip.width == out:
        return strip
    row = Image.new("RGB", (out, image.height), (spec.fill,) * 3)
    row.paste(strip, (first, 0))
    return row


def _scaled_to_cover(image: Image.Image, padding: tuple[int, int, int, int], target: Size, spec: Preprocessing
                     ) -> Image.Image:
    """`image` padded by `padding` (left, top, right, bottom), scaled to cover `target` and centre-cropped.

    Without padding the crop box is chosen in source pixels and resized in one step (torchvision's Resize +
    CenterCrop, with no huge intermediate for a 1 x 100000 strip). With padding, one axis at a time, the
    unpadded one first, so a long strip shrinks before any pad is built."""
    pad_left, pad_top, pad_right, pad_bottom = padding
    height, width = target
    canvas_width, canvas_height = image.width + pad_left + pad_right, image.height + pad_top + pad_bottom
    scale = max(width / canvas_width, height / canvas_height)  # the smallest scale that covers the target
    box_left, box_top = (canvas_width - width / scale) / 2, (canvas_height - height / scale) / 2
    if not any(padding):
        # clamped: the float box of an exact fit can overshoot the image by 1e-14, which Pillow refuses
        left, top = max(0.0, box_left), max(0.0, box_top)
        right, bottom = min(image.width, left + width / scale), min(image.height, top + height / scale)
        return image.resize((width, height), _RESAMPLING[spec.interpolation], box=(left, top, right, bottom))

    def across(part: Image.Image) -> Image.Image:
        return _resample_width(part, pad_left, pad_right, width, scale, box_left, spec)

    def down(part: Image.Image) -> Image.Image:
        flipped = part.transpose(Image.Transpose.TRANSPOSE)
        return _resample_width(flipped, pad_top, pad_bottom, height, scale, box_top, spec).transpose(
            Image.Transpose.TRANSPOSE)

    return across(down(image)) if pad_left or pad_right else down(across(image))


def stored_image(image: Image.Image, preprocessing: Preprocessing | int | Size | None) -> Image.Image:
    """The deterministic part that `PixelImages` keeps: upright RGB (`to_rgb`) fitted to the spec's stored size
    (its pre-crop size, else its size) by its resize mode; no size: unchanged."""
    image = image if image.mode == "RGB" else to_rgb(image)  # a PIL image from Python gets the same decoding rules
    spec = as_preprocessing(preprocessing)
    target = spec.stored_size
    padding = (0, 0, 0, 0) if target is None else _padding(image.width, image.height, spec)
    if target is None or (not any(padding) and image.size == (target[1], target[0])):
        return image
    return _scaled_to_cover(image, padding, target, spec)


def centre_offsets(outer: Size, inner: Size) -> tuple[int, int]:
    """(top, left) of the centred `inner` window of an `outer` image, rounded as torchvision's CenterCrop does."""
    return int(round((outer[0] - inner[0]) / 2)), int(round((outer[1] - inner[1]) / 2))


def fit_image(image: Image.Image, preprocessing: Preprocessing | int | Size | None) -> Image.Image:
    """Upright RGB as the model sees it outside training: `stored_image`, then the centre window of a pre-crop
    size. A bare size means "crop": scaled to cover and centre-cropped (torchvision's Resize + CenterCrop);
    None: unchanged.

    The crop box is chosen in source pixels and resized in one step, so a 1 x 100000 strip never
    becomes a huge intermediate image."""
    spec = as_preprocessing(preprocessing)
    stored = stored_image(image, spec)
    if spec.pre_crop_size is None:
        return stored
    (top, left), (height, width) = centre_offsets(spec.pre_crop_size, spec.size), spec.size
    return stored.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class CropWindow:
    """One draw of the training augmentation: a window of a stored image, in pixels, mirrored or not."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(high: int, generator: torch.Generator) -> int:
    """0 <= n < high."""
    return int(torch.randint(high, (), generator=generator))


def _resized_crop_window(stored: Size, scale: tuple[float, float], generator: torch.Generator) -> CropWindow:
    """torchvision's RandomResizedCrop draw: up to 10 tries at an area fraction in `scale` and a log-uniform aspect
    ratio in [3/4, 4/3] until one fits, else the largest centred window with an aspect ratio in that range."""
    height, width = stored
    low_ratio, high_ratio = _RESIZED_CROP_RATIO
    for _ in range(10):
        area = height * width * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, math.log(low_ratio), math.log(high_ratio)))
        crop_width, crop_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top, left = _randint(height - crop_height + 1, generator), _randint(width - crop_width + 1, generator)
            return CropWindow(top, left, crop_height, crop_width)
    aspect = min(max(width / height, low_ratio), high_ratio)
    crop_width, crop_height = min(width, round(height * aspect)), min(height, round(width / aspect))
    return CropWindow((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def draw_window(spec: Preprocessing, stored: Size, generator: torch.Generator | None) -> CropWindow:
    """The window of a stored image (`stored` = its height, width) that one training step sees, drawn from
    `generator` alone; without a generator or an augmentation, the evaluation view (the centre `size` window)."""
    if spec.size is None:
        raise ValueError("draw_window needs a spec with a resolved size (PixelImages.preprocessing has one)")
    if generator is None or not spec.is_random:
        return CropWindow(*centre_offsets(stored, spec.size), *spec.size)
    if spec.augment == "crop_flip":
        flip = _uniform(generator) < 0.5  # CMAP flips, then crops: two independent draws
        top = _randint(stored[0] - spec.size[0] + 1, generator)
        left = _randint(stored[1] - spec.size[1] + 1, generator)
        return CropWindow(top, left, *spec.size, flip)
    return _resized_crop_window(stored, spec.augment_scale, generator)


def cut_window(pixels: torch.Tensor, window: CropWindow, size: Size, interpolation: str = "bicubic"
               ) -> torch.Tensor:
    """`window` of one uint8 image (3 x H x W), mirrored if it says so, at `size`: resized (antialiased, with
    `interpolation`) only when the window has another size."""
    crop = pixels[:, window.top:window.top + window.height, window.left:window.left + window.width]
    if tuple(crop.shape[-2:]) != tuple(size):
        resized = F.interpolate(crop[None].float(), size=tuple(size), mode=interpolation, align_corners=False,
                                antialias=True)
        crop = resized[0].round().clamp(0, 255).to(torch.uint8)
    return crop.flip(-1) if window.flip else crop


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


def image_tensor(image: Image.Image, preprocessing: Preprocessing | int | Size | None = None) -> torch.Tensor:
    """One PIL image as a model-ready 3 x H x W tensor (the same preprocessing as evaluation; pass the model's
    `preprocessing`)."""
    pixels = torch.from_numpy(np.asarray(fit_image(image, preprocessing)).copy()).permute(2, 0, 1)
    return normalise(pixels[None])[0]
