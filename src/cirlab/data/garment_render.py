"""Product-photo renderer for the synthetic garments: silhouettes, textures and background clutter.

A `Garment` is the attribute record a caption talks about; a `Photo` is everything about one picture
that no caption mentions (placement, background texture, clutter behind, occluders in front, light).
Garments are drawn in canonical units (x, y in [0, 1], centred at x = 0.5), mapped into the image by
the photo's placement, which frames each category at a fixed zoom and centre whatever the garment's
lengths (so a hem change moves nothing else). Polygons are rasterised with ImageDraw at twice the
resolution and box-reduced, so masks are soft at the edges; textures are NumPy fields over the
canonical coordinates, so an unchanged garment part keeps its exact pixels when another part changes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cirlab.data.fashioniq import CATEGORIES

RGB = tuple[int, int, int]
Point = tuple[float, float]
Placement = tuple[float, float, float]  # (x0, y0, k): canonical (x, y) -> image fractions (x0 + k x, y0 + k y)
Shape = tuple[Sequence[Point], int]  # a polygon in canonical units and its fill (255 draws, 0 erases)

ATTRIBUTES = ("color", "pattern", "sleeves", "hem", "neckline", "print")
COLORS: dict[str, RGB] = {
    "black": (28, 28, 32), "white": (242, 242, 238), "grey": (135, 135, 138), "red": (196, 32, 42),
    "pink": (238, 150, 178), "orange": (236, 128, 36), "yellow": (238, 206, 60), "green": (46, 132, 66),
    "blue": (46, 96, 200), "navy": (28, 38, 84), "purple": (116, 52, 146), "brown": (116, 74, 44),
    "beige": (214, 194, 160), "teal": (30, 130, 130), "maroon": (112, 28, 44), "olive": (112, 112, 44),
}
PATTERNS = ("plain", "stripes", "dots", "checks", "floral")
SLEEVES = ("sleeveless", "short", "elbow", "long")     # ordered by length
PRINTS = ("none", "star", "heart", "logo", "text", "moon")
HEMS = {"dress": ("mini", "knee", "midi", "maxi"), "shirt": ("cropped", "hip", "tunic"),
        "toptee": ("cropped", "hip", "tunic")}        # ordered by length
NECKLINES = {"dress": ("crew", "v-neck", "square", "scoop"), "shirt": ("collar", "crew", "v-neck", "scoop"),
             "toptee": ("crew", "v-neck", "scoop", "square")}


def attribute_values(category: str) -> dict[str, tuple[str, ...]]:
    """The values each attribute of a `category` garment can take."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown garment category {category!r} (known: {', '.join(CATEGORIES)})")
    return {"color": tuple(COLORS), "pattern": PATTERNS, "sleeves": SLEEVES, "hem": HEMS[category],
            "neckline": NECKLINES[category], "print": PRINTS}


@dataclass(frozen=True)
class Garment:
    category: str
    color: str
    pattern: str
    sleeves: str
    hem: str
    neckline: str
    print: str

    def __post_init__(self) -> None:
        for name, known in attribute_values(self.category).items():
            if getattr(self, name) not in known:
                raise ValueError(f"unknown {self.category} {name} {getattr(self, name)!r} (known: {', '.join(known)})")

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def changed(self, other: Garment) -> tuple[str, ...]:
        """The attributes in which `other` differs, in ATTRIBUTES order."""
        return tuple(name for name in ATTRIBUTES if getattr(self, name) != getattr(other, name))


def luminance(color: str) -> float:
    """Relative luminance in [0, 1] of a named colour (it decides "darker", "lighter" and ink colours)."""
    r, g, b = COLORS[color]
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


# ---------------------------------------------------------------------------------------------
# Photos: everything about a picture that captions never mention
# ---------------------------------------------------------------------------------------------

BACKGROUNDS = ("studio", "wood", "linen", "tiles", "marble", "blotches")
_FRAMING = {"dress": (1.0, 0.52), "shirt": (1.15, 0.40), "toptee": (1.15, 0.40)}  # zoom, canonical y centred
PROP_KINDS = ("bag", "box", "bottle", "plant", "ball")


@dataclass(frozen=True)
class Prop:
    """A clutter object: centre (x, y) and size as fractions of the image side."""

    kind: str
    x: float
    y: float
    size: float
    color: RGB


@dataclass(frozen=True)
class Photo:
    scale: float = 0.86            # garment's canonical unit box (before the category's zoom) / image side
    dx: float = 0.0                # placement jitter, fractions of the image side
    dy: float = 0.0
    background: str = "studio"
    background_colors: tuple[RGB, RGB] = ((250, 250, 250), (236, 236, 236))
    texture_seed: int = 0
    light: float = 1.0             # brightness of the garment
    fold_phase: float = 0.0        # where the vertical folds of the fabric fall
    shadow: bool = False
    props: tuple[Prop, ...] = ()       # behind the garment
    occluders: tuple[Prop, ...] = ()   # in front of it

    def placement(self, category: str) -> Placement:
        """(x0, y0, k): canonical (x, y) lands at image fractions (x0 + k x, y0 + k y). Each category
        is framed like a product photo: tops are zoomed in, and every garment is centred."""
        zoom, centre = _FRAMING[category]
        k = self.scale * zoom
        return 0.5 - 0.5 * k + self.dx, 0.5 - centre * k + self.dy, k


STUDIO = Photo()  # plain light background, no clutter, canonical placement: the clutter-free setting

# Garment silhouettes, canonical units: half-widths from the centre line x = 0.5 and heights y.
_SHAPES = {
    "dress": {"neck": 0.065, "top": 0.10, "shoulder": (0.155, 0.125), "armpit": (0.14, 0.25),
              "waist": (0.115, 0.40), "flare": 0.55, "dip": 0.015, "cuff": 0.075},
    "shirt": {"neck": 0.06, "top": 0.09, "shoulder": (0.20, 0.12), "armpit": (0.19, 0.27),
              "waist": (0.195, 0.42), "flare": 0.0, "dip": 0.03, "cuff": 0.085},
    "toptee": {"neck": 0.065, "top": 0.10, "shoulder": (0.17, 0.125), "armpit": (0.16, 0.25),
               "waist": (0.145, 0.40), "flare": 0.15, "dip": 0.0, "cuff": 0.08},
}
HEM_Y = {"mini": 0.58, "knee": 0.70, "midi": 0.82, "maxi": 0.95, "cropped": 0.47, "hip": 0.60, "tunic": 0.74}
_SLEEVE = {"short": (0.11, 55.0), "elbow": (0.24, 42.0), "long": (0.40, 30.0)}  # length, angle from vertical
_HEM_BAND = 0.06       # the hem region reaches this far above the shorter hem
_PRINT_AT = {"dress": (0.5, 0.32, 0.055), "shirt": (0.41, 0.27, 0.04), "toptee": (0.5, 0.32, 0.055)}
_BUTTON_ROWS = np.arange(0.26, 0.95, 0.07)  # shirts: fixed rows, so only the hem moves buttons
_SUPERSAMPLE = 2
_DARK_INK, _LIGHT_INK = (38, 38, 44), (240, 238, 230)
_FLOWER_HEART = (238, 196, 64)
_SHADOW_LUT = [int(level * 0.7) for level in range(256)] * 3  # a shadow darkens the backdrop by 30%


def _circle(cx: float, cy: float, r: float, n: int = 24) -> list[Point]:
    return [(cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _body(garment: Garment) -> list[Point]:
    s = _SHAPES[garment.category]
    neck, top = s["neck"], s["top"]
    (sx, sy), (ax, ay), (wx, wy) = s["shoulder"], s["armpit"], s["waist"]
    hem = HEM_Y[garment.hem]
    right = [(0.5 + neck, top)]
    if garment.sleeves == "sleeveless":  # narrow straps and a curved armhole
        right += [(0.5 + neck + 0.04, top + 0.01), (0.5 + ax - 0.035, (top + ay) / 2 + 0.03)]
    else:
        right.append((0.5 + sx, sy))
    # A vertex at every shorter hem level: the side edge above a hem is then drawn from the same
    # segments whatever the length, so a hem change repaints nothing above the shorter hem.
    levels = sorted(HEM_Y[h] for h in HEMS[garment.category] if HEM_Y[h] <= hem)
    right += [(0.5 + ax, ay), (0.5 + wx, wy)] + [(0.5 + wx + (y - wy) * s["flare"], y) for y in levels]
    return right + [(0.5, hem + s["dip"])] + [(1.0 - x, y) for x, y in reversed(right)]


def _neck_cutout(garment: Garment) -> list[Point]:
    s = _SHAPES[garment.category]
    neck, top = s["neck"], s["top"]
    above = top - 0.03  # starts above the body so it cuts cleanly through the top edge
    if garment.neckline == "v-neck":
        return [(0.5 - neck, above), (0.5 + neck, above), (0.5, top + 0.13)]
    if garment.neckline == "square":
        return [(0.5 - neck + 0.005, above), (0.5 + neck - 0.005, above), (0.5 + neck - 0.005, top + 0.075),
                (0.5 - neck + 0.005, top + 0.075)]
    if garment.neckline == "collar":
        return [(0.5 - neck, above), (0.5 + neck, above), (0.5, top + 0.06)]
    width, depth = (neck + 0.015, 0.09) if garment.neckline == "scoop" else (neck, 0.045)
    arc = [(0.5 + width * math.cos(math.pi * k / 12), top + depth * math.sin(math.pi * k / 12)) for k in range(13)]
    return [(0.5 + width, above)] + arc + [(0.5 - width, above)]


def _collar(garment: Garment) -> list[Shape]:
    if garment.neckline != "collar":
        return []
    s = _SHAPES[garment.category]
    neck, top = s["neck"], s["top"]
    flap = [(0.5 + 0.004, top + 0.065), (0.5 + neck - 0.012, top - 0.012), (0.5 + neck + 0.03, top + 0.004),
            (0.5 + neck + 0.012, top + 0.07)]
    return [(flap, 255), ([(1.0 - x, y) for x, y in flap], 255)]


def _sleeves(garment: Garment) -> list[Shape]:
    if garment.sleeves == "sleeveless":
        return []
    s = _SHAPES[garment.category]
    (sx, sy), (ax, ay) = s["shoulder"], s["armpit"]
    length, angle = _SLEEVE[garment.sleeves]
    dx, dy = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    end = (0.5 + sx + length * dx, sy + length * dy)
    cuff = (end[0] - s["cuff"] * dy, end[1] + s["cuff"] * dx)
    right = [(0.5 + sx, sy), end, cuff, (0.5 + ax, ay)]
    return [(right, 255), ([(1.0 - x, y) for x, y in right], 255)]


def _print(garment: Garment) -> list[Shape]:
    cx, cy, h = _PRINT_AT[garment.category]
    if garment.print == "star":
        return [([(cx + (h if k % 2 == 0 else 0.42 * h) * math.cos(math.pi * (k / 5 - 0.5)),
                   cy + (h if k % 2 == 0 else 0.42 * h) * math.sin(math.pi * (k / 5 - 0.5))) for k in range(10)], 255)]
    if garment.print == "heart":
        t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        xs, ys = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return [([(cx + h * x / 17, cy - h * (y + 2) / 17) for x, y in zip(xs, ys)], 255)]
    if garment.print == "logo":
        return [(_circle(cx, cy, h), 255), (_circle(cx, cy, 0.6 * h), 0), (_circle(cx, cy, 0.3 * h, 12), 255)]
    if garment.print == "moon":  # a crescent: a disc with an offset disc erased
        return [(_circle(cx, cy, h), 255), (_circle(cx + 0.45 * h, cy - 0.2 * h, 0.8 * h), 0)]
    if garment.print == "text":
        bars = [(-0.9, -0.55, 0.9, -0.25), (-0.9, -0.12, 0.6, 0.18), (-0.9, 0.31, 0.75, 0.61)]
        return [([(cx + h * x0, cy + h * y0), (cx + h * x1, cy + h * y0), (cx + h * x1, cy + h * y1),
                  (cx + h * x0, cy + h * y1)], 255) for x0, y0, x1, y1 in bars]
    return []


def _buttons(garment: Garment) -> list[Shape]:
    if garment.category != "shirt":
        return []
    return [(_circle(0.5, float(y), 0.009, 10), 255) for y in _BUTTON_ROWS if y < HEM_Y[garment.hem] - 0.03]


def _raster(shapes: Sequence[Shape], placement: Placement, size: int) -> np.ndarray:
    """Soft coverage (float32 in [0, 1], size x size) of shapes drawn in order at `placement`.
    Only the shapes' bounding box is drawn (supersampled, then box-reduced): most parts are small."""
    coverage = np.zeros((size, size), dtype=np.float32)
    if not shapes:
        return coverage
    x0, y0, k = placement
    polygons = [([((x0 + x * k) * size, (y0 + y * k) * size) for x, y in points], fill) for points, fill in shapes]
    xs = [x for points, _ in polygons for x, _ in points]
    ys = [y for points, _ in polygons for _, y in points]
    left, top = max(0, math.floor(min(xs)) - 1), max(0, math.floor(min(ys)) - 1)
    right, bottom = min(size, math.ceil(max(xs)) + 1), min(size, math.ceil(max(ys)) + 1)
    if right <= left or bottom <= top:
        return coverage
    canvas = Image.new("L", ((right - left) * _SUPERSAMPLE, (bottom - top) * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in polygons:
        draw.polygon([((x - left) * _SUPERSAMPLE, (y - top) * _SUPERSAMPLE) for x, y in points], fill=fill)
    coverage[top:bottom, left:right] = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32) * np.float32(1 / 255)
    return coverage


class Parts:
    """Soft masks (float32 in [0, 1]) of one garment's parts drawn at one photo's placement, each
    rasterised on first use (an edit region needs only the parts that changed)."""

    def __init__(self, garment: Garment, photo: Photo, size: int) -> None:
        self._garment, self._size = garment, size
        self.placement = photo.placement(garment.category)

    def _draw(self, shapes: Sequence[Shape]) -> np.ndarray:
        return _raster(shapes, self.placement, self._size)

    @cached_property
    def outline(self) -> np.ndarray:
        """The torso (and skirt) without the neck cut-out."""
        return self._draw([(_body(self._garment), 255)])

    @cached_property
    def neck(self) -> np.ndarray:
        """The neck cut-out shape; it reaches above the garment."""
        return self._draw([(_neck_cutout(self._garment), 255)])

    @cached_property
    def body(self) -> np.ndarray:
        return self.outline * (1 - self.neck)

    @cached_property
    def sleeves(self) -> np.ndarray:
        return self._draw(_sleeves(self._garment))

    @cached_property
    def collar(self) -> np.ndarray:
        return self._draw(_collar(self._garment))

    @cached_property
    def print(self) -> np.ndarray:
        return self._draw(_print(self._garment))

    @cached_property
    def buttons(self) -> np.ndarray:
        return self._draw(_buttons(self._garment))

    @cached_property
    def garment(self) -> np.ndarray:
        return np.maximum(np.maximum(self.body, self.sleeves), self.collar)


def _row_of(y: float, placement: Placement, size: int) -> int:
    return max(0, math.floor((placement[1] + y * placement[2]) * size))


def edit_region(reference: Garment, target: Garment, photo: Photo, size: int) -> np.ndarray:
    """Bool mask, in the picture taken with `photo`, of the garment parts that differ between the two
    garments: both garments' versions of each changed part, drawn at this photo's placement, minus the
    pixels this photo's occluders hide."""
    a, b = Parts(reference, photo, size), Parts(target, photo, size)
    region = np.zeros((size, size), dtype=bool)
    for attribute in reference.changed(target):
        if attribute in ("color", "pattern"):
            region |= (a.garment > 0) | (b.garment > 0)
        elif attribute == "sleeves":  # the sleeves, and the shoulders that become straps when sleeveless
            region |= (a.sleeves > 0) | (b.sleeves > 0) | (a.outline != b.outline)
        elif attribute == "hem":
            band = np.zeros_like(region)
            band[_row_of(min(HEM_Y[reference.hem], HEM_Y[target.hem]) - _HEM_BAND, a.placement, size):] = True
            region |= band & ((a.outline > 0) | (b.outline > 0))
        elif attribute == "neckline":
            cut = ((a.neck > 0) | (b.neck > 0)) & ((a.outline > 0) | (b.outline > 0))
            region |= cut | (a.collar > 0) | (b.collar > 0)
        else:
            region |= (a.print > 0) | (b.print > 0)
    return region & ~occluder_mask(photo, size)


# ---------------------------------------------------------------------------------------------
# Textures. Colour fields are channel-first (3 x H x W), where NumPy broadcasting is fast.
# ---------------------------------------------------------------------------------------------

def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)  # np.mod is several times slower for floats


def _coverage(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage of a shape from a signed distance (positive inside), in canonical units."""
    return np.clip(distance * np.float32(1 / pixel) + np.float32(0.5), 0.0, 1.0)


def _stripes(coordinate: np.ndarray, period: float, pixel: float) -> np.ndarray:
    offset = np.abs(_frac(coordinate * np.float32(1 / period)) - np.float32(0.5)) * np.float32(period)
    return _coverage(np.float32(0.25 * period) - offset, pixel)


def _lattice(u: np.ndarray, v: np.ndarray, period: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets from the nearest centre of a staggered lattice (every other row shifted by half)."""
    rows = v * np.float32(1 / period)
    shift = np.float32(0.5) * (np.floor(rows) % 2)
    du = (_frac(u * np.float32(1 / period) + shift) - np.float32(0.5)) * np.float32(period)
    dv = (_frac(rows) - np.float32(0.5)) * np.float32(period)
    return du, dv


def _flower(du: np.ndarray, dv: np.ndarray, pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """Five-petal flowers and their hearts; |cos(2.5 theta)| = sqrt((1 + cos 5 theta) / 2), and
    cos 5 theta is a polynomial in the unit offset (no arctan2, which is slow)."""
    radius = np.sqrt(du * du + dv * dv) + np.float32(1e-9)
    x, y = du / radius, dv / radius
    x2, y2 = x * x, y * y
    cos5 = x * (x2 * x2 - 10 * x2 * y2 + 5 * y2 * y2)
    petal = np.float32(0.03) * (np.float32(0.55) + np.float32(0.45) * np.sqrt(np.maximum(0, (1 + cos5) / 2)))
    return _coverage(petal - radius, pixel), _coverage(np.float32(0.009) - radius, pixel)


def contrast_ink(color: str) -> RGB:
    """The colour of patterns and prints on a `color` garment: dark on light fabric, light on dark."""
    return _DARK_INK if luminance(color) > 0.55 else _LIGHT_INK


def _column(color: RGB) -> np.ndarray:
    return np.asarray(color, dtype=np.float32)[:, None, None]


def _fabric(garment: Garment, photo: Photo, size: int, parts: Parts, window: tuple[slice, slice]) -> np.ndarray:
    """3 x h x w float32 colours of the garment's fabric, pattern, print and buttons inside `window`
    (rows, columns) of the size x size picture."""
    x0, y0, k = parts.placement
    rows, columns = window
    grid = (np.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size)
    u = ((grid[columns] - np.float32(x0)) / np.float32(k))[None, :]
    v = ((grid[rows] - np.float32(y0)) / np.float32(k))[:, None]
    shape = (v.shape[0], u.shape[1])
    pixel = 1.0 / (k * size)
    # Vertical folds: sin(a + b) from 1-D factors instead of a full-image sine.
    a, b = 2 * np.pi * 5 * u, 2 * np.pi * (0.8 * v + photo.fold_phase)
    folds = 1 + np.float32(0.05) * (np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b))
    shade = (np.float32(photo.light) * (np.float32(1.04) - np.float32(0.12) * v)) * folds
    if garment.sleeves != "sleeveless":
        shade = shade * (1 - np.float32(0.07) * parts.sleeves[window])
    if garment.neckline == "collar":
        shade = shade * (1 + np.float32(0.06) * parts.collar[window])
    hearts = None
    if garment.pattern == "stripes":
        coverage = np.broadcast_to(_stripes(v, 0.055, pixel), shape)
    elif garment.pattern == "checks":
        coverage = np.float32(0.45) * (_stripes(u, 0.06, pixel) + _stripes(v, 0.06, pixel))
    elif garment.pattern == "dots":
        du, dv = _lattice(u, v, 0.07)
        coverage = _coverage(np.float32(0.017) - np.sqrt(du * du + dv * dv), pixel)
    elif garment.pattern == "floral":
        petals, hearts = _flower(*_lattice(u, v, 0.1), pixel)
        coverage = petals * (1 - hearts)
    else:
        coverage = np.zeros(shape, dtype=np.float32)
    if garment.print != "none":
        coverage = np.maximum(coverage, parts.print[window])
    base = _column(COLORS[garment.color])
    fabric = base + (_column(contrast_ink(garment.color)) - base) * coverage
    if hearts is not None:
        fabric = fabric + (_column(_FLOWER_HEART) - fabric) * hearts
    if garment.category == "shirt":
        shade = shade * (1 - np.float32(0.35) * parts.buttons[window])
    return fabric * shade


def _to_image(channels: np.ndarray) -> Image.Image:
    """A 3 x H x W float array (0..255) as an RGB image."""
    planes = np.clip(channels + 0.5, 0, 255).astype(np.uint8)
    return Image.merge("RGB", [Image.fromarray(plane) for plane in planes])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a cells x cells random grid upsampled bicubically."""
    grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))


def _background(photo: Photo, size: int) -> Image.Image:
    """The textured backdrop: a grey-level texture t in [0, 1] mapped between the photo's two colours."""
    rng = np.random.default_rng(photo.texture_seed)
    grid = (np.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size)
    x, y = grid[None, :], grid[:, None]
    if photo.background == "wood":
        grain = np.sin(2 * np.pi * (y * rng.uniform(8, 14) + 1.2 * _smooth_noise(rng, size, 5)))
        planks = _frac(y * rng.integers(3, 6)) < 0.015
        t = 0.5 + 0.4 * grain * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * x)) - 0.4 * planks
    elif photo.background == "linen":
        frequency = rng.uniform(30, 60)
        t = 0.35 + 0.25 * np.sin(2 * np.pi * frequency * x) * np.sin(2 * np.pi * frequency * y)
        t = t + 0.3 * _smooth_noise(rng, size, 9)
    elif photo.background == "tiles":
        count = int(rng.integers(3, 7))
        tone = rng.uniform(0.2, 0.8, (count, count)).astype(np.float32)
        cells = np.minimum((grid * count).astype(int), count - 1)
        t = tone[cells[:, None], cells[None, :]]
        grout = (_frac(x * count) < 0.05) | (_frac(y * count) < 0.05)
        t = np.where(grout, np.float32(1.0), t)
    elif photo.background == "marble":
        turbulence = _smooth_noise(rng, size, 4) + 0.5 * _smooth_noise(rng, size, 8)
        t = np.sqrt(np.abs(np.sin(2 * np.pi * (x * rng.uniform(1, 3) + y * rng.uniform(1, 3) + 1.5 * turbulence))))
    elif photo.background == "blotches":
        t = _smooth_noise(rng, size, int(rng.integers(3, 7)))
    else:  # studio: a soft vertical gradient
        t = y
    level = Image.fromarray((np.clip(np.broadcast_to(t, (size, size)), 0, 1) * 255 + 0.5).astype(np.uint8))
    lut = np.rint(np.linspace(photo.background_colors[0], photo.background_colors[1], 256)).astype(np.uint8)
    return Image.merge("RGB", [level.point(lut[:, channel].tolist()) for channel in range(3)])


def _shade(color: RGB, factor: float) -> RGB:
    r, g, b = (min(255, round(c * factor)) for c in color)
    return r, g, b


def _draw_prop(draw: ImageDraw.ImageDraw, prop: Prop, size: int, mask: bool = False) -> None:
    """One clutter object; with `mask`, every part is drawn in 255 (its footprint)."""
    def fill(color: RGB) -> RGB | int:
        return 255 if mask else color

    x, y, s = prop.x * size, prop.y * size, prop.size * size
    color = prop.color
    if prop.kind == "bag":
        draw.arc([x - 0.3 * s, y - 0.75 * s, x + 0.3 * s, y - 0.05 * s], 180, 360, fill=fill(_shade(color, 0.7)),
                 width=max(1, round(0.06 * s)))
        draw.rounded_rectangle([x - 0.5 * s, y - 0.35 * s, x + 0.5 * s, y + 0.45 * s], radius=0.1 * s,
                               fill=fill(color))
    elif prop.kind == "box":
        draw.polygon([(x - 0.45 * s, y - 0.25 * s), (x - 0.25 * s, y - 0.45 * s), (x + 0.55 * s, y - 0.45 * s),
                      (x + 0.35 * s, y - 0.25 * s)], fill=fill(_shade(color, 1.25)))
        draw.rectangle([x - 0.45 * s, y - 0.25 * s, x + 0.35 * s, y + 0.45 * s], fill=fill(color))
        draw.polygon([(x + 0.35 * s, y - 0.25 * s), (x + 0.55 * s, y - 0.45 * s), (x + 0.55 * s, y + 0.25 * s),
                      (x + 0.35 * s, y + 0.45 * s)], fill=fill(_shade(color, 0.7)))
    elif prop.kind == "bottle":
        draw.rectangle([x - 0.2 * s, y - 0.2 * s, x + 0.2 * s, y + 0.5 * s], fill=fill(color))
        draw.polygon([(x - 0.2 * s, y - 0.2 * s), (x - 0.07 * s, y - 0.4 * s), (x + 0.07 * s, y - 0.4 * s),
                      (x + 0.2 * s, y - 0.2 * s)], fill=fill(color))
        draw.rectangle([x - 0.07 * s, y - 0.5 * s, x + 0.07 * s, y - 0.4 * s], fill=fill(_shade(color, 0.5)))
    elif prop.kind == "plant":
        for angle in (-50, -20, 10, 40):
            tip = (x + 0.45 * s * math.sin(math.radians(angle)), y - 0.1 * s - 0.45 * s * math.cos(math.radians(angle)))
            draw.polygon([(x - 0.06 * s, y), tip, (x + 0.06 * s, y)], fill=fill((52, 128, 60)))
        draw.polygon([(x - 0.3 * s, y), (x + 0.3 * s, y), (x + 0.22 * s, y + 0.5 * s), (x - 0.22 * s, y + 0.5 * s)],
                     fill=fill(color))
    else:  # ball
        draw.ellipse([x - 0.4 * s, y - 0.4 * s, x + 0.4 * s, y + 0.4 * s], fill=fill(color))
        draw.ellipse([x - 0.22 * s, y - 0.25 * s, x - 0.05 * s, y - 0.08 * s], fill=fill(_shade(color, 1.4)))


def occluder_mask(photo: Photo, size: int) -> np.ndarray:
    """Bool mask of the pixels the photo's occluders cover."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for prop in photo.occluders:
        _draw_prop(draw, prop, size, mask=True)
    return np.asarray(canvas) > 0


@dataclass
class Rendered:
    image: Image.Image        # RGB, size x size
    garment_mask: np.ndarray  # size x size uint8: visible garment coverage x 255 (occluders removed)
    visible: float            # visible fraction of the garment's area


def render(garment: Garment, photo: Photo, size: int) -> Rendered:
    """One product photo: background texture, props behind, the garment's shadow, the garment, occluders."""
    parts = Parts(garment, photo, size)
    alpha = Image.fromarray((parts.garment * 255 + 0.5).astype(np.uint8))
    left, top, right, bottom = alpha.getbbox() or (0, 0, 1, 1)
    scene = _background(photo, size)
    draw = ImageDraw.Draw(scene)
    for prop in photo.props:
        _draw_prop(draw, prop, size)
    if photo.shadow:
        shift = max(1, size // 48)
        shadow = alpha.filter(ImageFilter.GaussianBlur(size / 70)).transform(
            alpha.size, Image.Transform.AFFINE, (1, 0, -shift, 0, 1, -shift))
        scene = Image.composite(scene.point(_SHADOW_LUT), scene, shadow)
    fabric = _fabric(garment, photo, size, parts, (slice(top, bottom), slice(left, right)))
    scene.paste(_to_image(fabric), (left, top), alpha.crop((left, top, right, bottom)))
    coverage = parts.garment
    if photo.occluders:
        draw = ImageDraw.Draw(scene)
        for prop in photo.occluders:
            _draw_prop(draw, prop, size)
        coverage = np.where(occluder_mask(photo, size), np.float32(0), coverage)
    total = float(parts.garment.sum())
    mask = (coverage * 255 + 0.5).astype(np.uint8)
    return Rendered(scene, mask, float(coverage.sum()) / total if total else 0.0)


def _random_color(rng: random.Random) -> RGB:
    return rng.randint(40, 230), rng.randint(40, 230), rng.randint(40, 230)


def random_photo(rng: random.Random, garment: Garment) -> Photo:
    """A cluttered product photo: jittered placement, a textured background, props behind the garment,
    and up to two occluders over its sides below the chest (never over the print or the neckline)."""
    scale = rng.uniform(0.8, 0.92)
    dx, dy = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
    x0, y0, k = Photo(scale=scale, dx=dx, dy=dy).placement(garment.category)
    background = rng.choices(BACKGROUNDS, weights=(3, 2, 2, 2, 2, 2))[0]
    if background == "studio":
        light = rng.randint(225, 255)
        colors = ((light, light, light), _shade((light, light, light), rng.uniform(0.85, 0.97)))
    else:
        first = _random_color(rng)
        colors = (first, _shade(first, rng.uniform(0.55, 1.35)))
    palette = list(COLORS.values())  # clutter in garment colours is the distracting kind
    props = tuple(Prop(rng.choice(PROP_KINDS), rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95),
                       rng.uniform(0.12, 0.3), rng.choice(palette + [_random_color(rng)]))
                  for _ in range(rng.randint(1, 4)))
    lowest = max(0.55, HEM_Y[garment.hem])
    sides = rng.sample((-1.0, 1.0), rng.choices((0, 1, 2), weights=(45, 40, 15))[0])
    occluders = tuple(Prop(rng.choice(PROP_KINDS), x0 + (0.5 + side * rng.uniform(0.2, 0.32)) * k,
                           y0 + rng.uniform(0.5, lowest) * k, rng.uniform(0.12, 0.22) * k,
                           rng.choice(palette + [_random_color(rng)]))
                      for side in sides)
    return Photo(scale=scale, dx=dx, dy=dy, background=background, background_colors=colors,
                 texture_seed=rng.getrandbits(32), light=rng.uniform(0.9, 1.08), fold_phase=rng.random(),
                 shadow=rng.random() < 0.7, props=props, occluders=occluders)
