"""CLEVR-like 3D renders of CSS scenes: a ray caster in pure NumPy (no Blender, no GPU).

TIRG's CSS release pairs every scene with a Blender render of it. This module draws the same scenes
as shaded solids, so one generated dataset holds a 2D and a 3D image of every scene
(`generate_css(..., with_3d=True)`, `cirlab data make-css --with-3d`).

- **Objects.** rectangle -> cube, circle -> sphere, triangle -> cylinder (the 3D shapes of the
  release; the data keeps the 2D names). World units: the floor is z = 0 and the 3x3 grid covers
  x, y in [-1.5, 1.5], one unit per cell. An object at pos = (py, px) stands at x = 3 px - 1.5,
  y = 1.5 - 3 py, so the 2D image's top row is the far row and left stays left. Its radius r is the
  2D half-size in grid units (0.1875 small, 0.375 large): a sphere of radius r, a cylinder of radius
  r and height 2r, a cube of half-side r / sqrt(2) turned 30 degrees about the vertical. Every
  footprint lies within radius r of the centre, so the generator's objects never intersect.
- **Camera.** A perspective pinhole at (0, -3.5, 5.3) looking at (0, 0.2, 0), 55 degrees down, with a
  36 degree field of view, rendering square images the size of the 2D ones (so 2D and 3D images can
  share a batch): the whole grid is in view, nearer rows look larger and can hide parts of the row
  behind them.
- **Light.** One point light at (-3, -1.5, 6) with a radius of 0.5. Each of a pixel's S x S samples
  casts its shadow ray to a different point of the light's disc (a fixed pattern), which softens
  shadow edges; a point whose light is blocked gets only ambient light.
- **Shading.** In linear light (the palette is sRGB, gamma 2.2): ambient + Lambert diffuse +
  Blinn-Phong specular. Rubber: matte, a faint highlight. Metal: weaker diffuse, a sharp highlight
  tinted by its colour, and a faint reflection of the floor below and the sky above (no object is
  reflected).
- **Materials.** Chosen from the object itself: metal when (cell index + shape index) is odd (cells
  row-major 0..8, shapes as in `SHAPES`), rubber otherwise. A colour or size edit keeps an object's
  cell and shape, so it keeps its material; an edit never changes the material of another object;
  and scenes with equal labels render with equal materials.
- **Anti-aliasing and masks.** S x S regular samples per pixel (S = 3 by default), averaged in
  linear light. `coverage[k]` is the fraction of a pixel's samples that see object k first;
  `instances` names the most-covered object where it covers at least half of the pixel (lowest
  index on a tie), else -1, so instance masks never overlap; `shadow[k]` is the fraction of the
  pixel's shadow rays that object k blocks.
- **Speed.** Rays are NumPy arrays; each object is tried only by the rays inside its projected
  bounding box (primary rays) or its shadow's (shadow rays). CPU time per image with 5 objects at
  S = 3, on the shared 2-core build machine: 0.012 s at 64 px, 0.039 s at 128 px (8 objects: 0.017 s
  and 0.049 s), so `--preset full` (39,560 images) adds about 8 minutes at 64 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cirlab.data.css_vocabulary import BASE_SIZE, COLOURS, HALF_SIZE, IMAGES_3D_DIR, IMAGES_DIR, SHAPES, SIZES
from cirlab.data.errors import DataFormatError
from cirlab.data.generation import GENERATION_FILE

RENDERS = ("2d", "3d")
RENDERER_VERSION = 1
GRID = 3.0                 # world units across the 3x3 grid
CUBE_YAW_DEGREES = 30.0
SAMPLES = 3                # S: S x S samples per pixel
_GAMMA = 2.2
_EPS = 1e-3                # shadow-ray offset along the normal, against self-shadowing acne
_FLOOR = np.array([0.50, 0.50, 0.48])   # sRGB
_SKY = np.array([0.80, 0.82, 0.85])     # sRGB; seen only in metal reflections and above the horizon
_AMBIENT = 0.28
_FLOOR_DIFFUSE = 0.85
SHAPES_3D = {"rectangle": "cube", "circle": "sphere", "triangle": "cylinder"}


@dataclass(frozen=True)
class Camera:
    eye: tuple[float, float, float] = (0.0, -3.5, 5.3)
    target: tuple[float, float, float] = (0.0, 0.2, 0.0)
    fov_degrees: float = 36.0

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit (forward, right, up) vectors of the image plane."""
        return _camera_basis(self)

    def focal(self, image_size: int) -> float:
        """Focal length in pixels."""
        return image_size / 2 / math.tan(math.radians(self.fov_degrees) / 2)

    def project(self, points: np.ndarray, image_size: int) -> np.ndarray:
        """World points (..., 3) in front of the camera -> (..., 2) image (row, column) coordinates,
        where pixel (i, j) spans [i, i + 1) x [j, j + 1)."""
        forward, right, up = self.basis()
        relative = np.asarray(points, dtype=float) - self.eye
        scale = self.focal(image_size) / (relative * forward).sum(-1)
        return np.stack([image_size / 2 - scale * (relative * up).sum(-1),
                         image_size / 2 + scale * (relative * right).sum(-1)], -1)


@lru_cache(maxsize=8)
def _camera_basis(camera: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    forward = np.subtract(camera.target, camera.eye)
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, (0.0, 0.0, 1.0))
    right = right / np.linalg.norm(right)
    return forward, right, np.cross(right, forward)


@dataclass(frozen=True)
class Light:
    position: tuple[float, float, float] = (-3.0, -1.5, 6.0)
    radius: float = 0.5     # 0 gives hard shadows


@dataclass(frozen=True)
class _Material:
    diffuse: float
    specular: float
    shininess: float
    reflection: float


RUBBER = _Material(diffuse=0.85, specular=0.08, shininess=12.0, reflection=0.0)
METAL = _Material(diffuse=0.35, specular=1.2, shininess=40.0, reflection=0.6)

# Vectors are stored as 3 x N arrays (one contiguous row per coordinate), which keeps every
# operation a fast elementwise pass; nothing goes through BLAS, so results are bit-identical.


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


# ---------------------------------------------------------------------------------------------
# Solids: `hit(origins, dirs)` gives each ray's nearest parameter t > 0 (inf on a miss) for unit
# directions; `normal(points)` the outward unit normals; `top` the height, `reach` the horizontal
# radius of a vertical cylinder around `centre` that holds the solid (for culling).
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Sphere:
    centre: np.ndarray      # 3 x 1
    radius: float

    @property
    def top(self) -> float:
        return 2 * self.radius

    def hit(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        oc = origins - self.centre
        b = _dot(oc, dirs)
        disc = b * b - (_dot(oc, oc) - self.radius ** 2)
        root = np.sqrt(np.maximum(disc, 0.0))
        t = np.where(-b - root > 0, -b - root, -b + root)
        return np.where((disc >= 0) & (t > 0), t, np.inf)

    def normal(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre) / self.radius


@dataclass(frozen=True)
class _Cube:
    centre: np.ndarray      # 3 x 1, half a side above the floor
    half: float
    yaw: float              # radians about the vertical

    @property
    def top(self) -> float:
        return 2 * self.half

    def _local(self, v: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.stack([c * v[0] + s * v[1], c * v[1] - s * v[0], v[2]])

    def hit(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        start, step = self._local(origins - self.centre), self._local(dirs)
        step = np.where(step == 0, 1e-30, step)  # an axis-parallel ray: that slab's bounds become +-huge
        t1, t2 = (-self.half - start) / step, (self.half - start) / step
        low, high = np.minimum(t1, t2), np.maximum(t1, t2)
        near = np.maximum(np.maximum(low[0], low[1]), low[2])
        far = np.minimum(np.minimum(high[0], high[1]), high[2])
        t = np.where(near > 0, near, far)
        return np.where((far >= near) & (t > 0), t, np.inf)

    def normal(self, points: np.ndarray) -> np.ndarray:
        local = self._local(points - self.centre)
        face = np.abs(local).argmax(0)  # the face a point is on: its largest local coordinate
        normal = np.where(np.arange(3)[:, None] == face, np.sign(local), 0.0)
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.stack([c * normal[0] - s * normal[1], s * normal[0] + c * normal[1], normal[2]])


@dataclass(frozen=True)
class _Cylinder:
    centre: np.ndarray      # 3 x 1, the centre of the bottom disc, on the floor
    radius: float
    height: float

    @property
    def top(self) -> float:
        return self.height

    def hit(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        o = origins - self.centre
        a = dirs[0] ** 2 + dirs[1] ** 2
        b = o[0] * dirs[0] + o[1] * dirs[1]
        disc = b * b - a * (o[0] ** 2 + o[1] ** 2 - self.radius ** 2)
        root = np.sqrt(np.maximum(disc, 0.0))
        safe_a = np.where(a > 0, a, 1.0)
        best = np.full(np.broadcast_shapes(o[0].shape, dirs[0].shape), np.inf)
        for t in ((-b - root) / safe_a, (-b + root) / safe_a):  # the side wall, nearer root first
            z = o[2] + t * dirs[2]
            ok = (a > 0) & (disc >= 0) & (t > 0) & (z >= 0) & (z <= self.height)
            best = np.where(ok & (t < best), t, best)
        dz = np.where(dirs[2] != 0, dirs[2], 1e-30)
        t = (self.height - o[2]) / dz  # the top cap; the bottom one rests on the floor, never seen
        x, y = o[0] + t * dirs[0], o[1] + t * dirs[1]
        ok = (t > 0) & (x * x + y * y <= self.radius ** 2)
        return np.where(ok & (t < best), t, best)

    def normal(self, points: np.ndarray) -> np.ndarray:
        p = points - self.centre
        radial = np.sqrt(p[0] ** 2 + p[1] ** 2)
        on_cap = self.height - p[2] < self.radius - radial  # nearer the cap plane than the wall
        scale = 1 / np.maximum(radial, 1e-12)
        return np.stack([np.where(on_cap, 0.0, p[0] * scale), np.where(on_cap, 0.0, p[1] * scale),
                         np.where(on_cap, 1.0, 0.0)])


_Solid = _Sphere | _Cube | _Cylinder


def object_radius(size: str) -> float:
    """An object's radius in world units: the 2D half-size (4 or 8 px of 64) in grid units."""
    if size not in HALF_SIZE:
        raise ValueError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    return HALF_SIZE[size] / BASE_SIZE * GRID


def floor_position(pos: Sequence[float]) -> tuple[float, float]:
    """World (x, y) of a CSS pos = (py, px)."""
    return GRID * float(pos[1]) - GRID / 2, GRID / 2 - GRID * float(pos[0])


def material(obj: dict) -> str:
    """"metal" when (cell index + shape index) is odd, else "rubber" (see the module docstring)."""
    py, px = obj["pos"]
    cell = 3 * min(int(3 * py), 2) + min(int(3 * px), 2)
    return "metal" if (cell + SHAPES.index(obj["shape"])) % 2 else "rubber"


def _solid(obj: dict) -> _Solid:
    if obj["color"] not in COLOURS:
        raise ValueError(f"unknown colour {obj['color']!r} (known: {', '.join(COLOURS)})")
    r = object_radius(obj["size"])
    x, y = floor_position(obj["pos"])
    if obj["shape"] == "circle":
        return _Sphere(np.array([[x], [y], [r]]), r)
    if obj["shape"] == "rectangle":
        half = r / math.sqrt(2)
        return _Cube(np.array([[x], [y], [half]]), half, math.radians(CUBE_YAW_DEGREES))
    if obj["shape"] == "triangle":
        return _Cylinder(np.array([[x], [y], [0.0]]), r, 2 * r)
    raise ValueError(f"unknown shape {obj['shape']!r} (known: {', '.join(SHAPES)})")


def _reach(solid: _Solid) -> float:
    return solid.radius if not isinstance(solid, _Cube) else solid.half * math.sqrt(2)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _View:
    """Everything about the rays that does not depend on the objects, computed once per setting.

    Rays are the samples of a (size*S)^2 grid, row-major; the `floor_*` arrays describe what each
    primary ray sees when no object is in its way.
    """

    dirs: np.ndarray            # 3 x N unit primary directions
    pixel: np.ndarray           # N: the flat index of the pixel each sample belongs to
    lamp: np.ndarray            # 3 x N: the point of the light each sample's shadow ray aims at
    floor_t: np.ndarray         # N: distance to the floor (inf: the ray passes above the horizon)
    floor_points: np.ndarray    # 3 x N
    floor_towards: np.ndarray   # 3 x N: unit vectors to the light point
    floor_distance: np.ndarray  # N: distance to the light point


def _light_offsets(count: int, radius: float) -> np.ndarray:
    """`count` fixed points spread evenly over a horizontal disc (a sunflower pattern), 3 x count."""
    m = np.arange(count)
    rho = radius * np.sqrt((m + 0.5) / count)
    angle = m * math.pi * (3 - math.sqrt(5))
    return np.stack([rho * np.cos(angle), rho * np.sin(angle), np.zeros(count)])


@lru_cache(maxsize=8)
def _view(camera: Camera, light: Light, image_size: int, samples: int) -> _View:
    forward, right, up = camera.basis()
    side = image_size * samples
    offsets = (np.arange(side) + 0.5) / samples - image_size / 2  # sample positions, pixels from the centre
    down, across = np.meshgrid(offsets, offsets, indexing="ij")
    dirs = (camera.focal(image_size) * forward[:, None] + right[:, None] * across.ravel()
            - up[:, None] * down.ravel())
    dirs = dirs / np.sqrt(_dot(dirs, dirs))
    pixel = ((np.arange(side) // samples)[:, None] * image_size + np.arange(side)[None, :] // samples).ravel()
    within = np.arange(side) % samples  # each sample position inside a pixel gets its own light point
    sample = (within[:, None] * samples + within[None, :]).ravel()
    lamp = np.array(light.position)[:, None] + _light_offsets(samples * samples, light.radius)[:, sample]
    below = dirs[2] < 0
    floor_t = np.where(below, -camera.eye[2] / np.where(below, dirs[2], -1.0), np.inf)
    points = np.array(camera.eye)[:, None] + np.where(below, floor_t, 0.0) * dirs
    towards = lamp - points
    distance = np.sqrt(_dot(towards, towards))
    return _View(dirs, pixel, lamp, floor_t, points, towards / distance, distance)


def _image_box(corners: np.ndarray, camera: Camera, image_size: int, samples: int) -> np.ndarray:
    """Flat indices of the samples inside the image-space bounding box of world points (K x 3)."""
    rows, cols = (camera.project(corners, image_size) * samples).T
    side = image_size * samples
    r0, r1 = max(int(np.floor(rows.min())) - 1, 0), min(int(np.ceil(rows.max())) + 1, side)
    c0, c1 = max(int(np.floor(cols.min())) - 1, 0), min(int(np.ceil(cols.max())) + 1, side)
    return (np.arange(r0, r1)[:, None] * side + np.arange(c0, c1)[None, :]).ravel()


def _box_corners(low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    return np.array([(x, y, z) for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])


def _bounds(solid: _Solid) -> np.ndarray:
    """The 8 corners of an axis-aligned box around the solid."""
    x, y, reach = float(solid.centre[0, 0]), float(solid.centre[1, 0]), _reach(solid)
    return _box_corners((x - reach, y - reach, 0.0), (x + reach, y + reach, solid.top))


def _shadow_bounds(solid: _Solid, light: Light) -> np.ndarray | None:
    """Corners of a box holding every point the solid can shade: the solid and its shadow on the floor
    cast from anywhere on the light's disc. None when the light is not above the solid."""
    corners = _bounds(solid)
    lamp = np.array(light.position)
    if lamp[2] <= solid.top:
        return None
    extremes = lamp + np.array([(dx, dy, 0.0) for dx in (-1, 1) for dy in (-1, 1)]) * light.radius
    # Every corner seen from every extreme of the light, carried down to the floor.
    scale = extremes[:, None, 2:] / (extremes[:, None, 2:] - corners[None, :, 2:])
    shadow = (extremes[:, None, :] + (corners[None] - extremes[:, None, :]) * scale).reshape(-1, 3)
    both = np.concatenate([corners, shadow])
    return _box_corners(both.min(0), both.max(0))


def _may_block(solid: _Solid, starts: np.ndarray, towards: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """False where the segment from `starts` to the light surely misses the solid's bounding sphere."""
    half_top = solid.top / 2
    bound = math.sqrt(_reach(solid) ** 2 + half_top ** 2) + _EPS
    w = np.array([[solid.centre[0, 0]], [solid.centre[1, 0]], [half_top]]) - starts
    along = _dot(w, towards)
    closest = np.clip(along, 0.0, distance)  # the segment's point nearest the sphere's centre
    return _dot(w, w) - 2 * closest * along + closest * closest < bound * bound


@dataclass
class Render3D:
    image: np.ndarray       # H x W x 3 uint8
    instances: np.ndarray   # H x W int16: object index (scene order), -1 where no object covers half a pixel
    coverage: np.ndarray    # K x H x W float32: fraction of the pixel's samples that see object k
    shadow: np.ndarray      # K x H x W float32: fraction of the pixel's shadow rays that object k blocks

    def instance_mask(self, k: int) -> np.ndarray:
        return self.instances == k

    def region(self, k: int) -> np.ndarray:
        """Every pixel object k touches: any sample sees it, or it blocks any of the pixel's light."""
        return (self.coverage[k] > 0) | (self.shadow[k] > 0)


def _linear(srgb: Sequence[float]) -> np.ndarray:
    return (np.asarray(srgb, dtype=float) ** _GAMMA)[:, None]


def render_scene_3d(objects: list[dict], image_size: int = 64, *, samples: int = SAMPLES, camera: Camera = Camera(),
                    light: Light = Light()) -> Render3D:
    """Ray-cast a CSS scene (the object dicts of `objects_img`); equal arguments give equal arrays."""
    if image_size < 1 or samples < 1:
        raise ValueError(f"image_size and samples must be positive, got {image_size} and {samples}")
    solids = [_solid(obj) for obj in objects]
    view = _view(camera, light, image_size, samples)
    eye = np.array(camera.eye)[:, None]
    everything = np.arange(len(view.pixel))

    # Primary rays: each object is tried only by the samples inside its projected bounding box.
    nearest, hit = view.floor_t.copy(), np.full(len(view.pixel), -1, dtype=np.int16)  # -1: floor or sky
    for k, solid in enumerate(solids):
        rays = _image_box(_bounds(solid), camera, image_size, samples)
        t = solid.hit(eye, view.dirs[:, rays])
        closer = t < nearest[rays]
        nearest[rays[closer]], hit[rays[closer]] = t[closer], k
    owned = [np.flatnonzero(hit == k) for k in range(len(solids))]

    # Where each sample's surface is, which way it faces and where its light is.
    points, towards, distance = view.floor_points.copy(), view.floor_towards.copy(), view.floor_distance.copy()
    normals = np.zeros_like(points)
    normals[2] = 1.0
    for solid, rays in zip(solids, owned):
        points[:, rays] = eye + nearest[rays] * view.dirs[:, rays]
        normals[:, rays] = solid.normal(points[:, rays])
        towards[:, rays] = view.lamp[:, rays] - points[:, rays]
        distance[rays] = np.sqrt(_dot(towards[:, rays], towards[:, rays]))
        towards[:, rays] /= distance[rays]
    facing = _dot(normals, towards)
    tested = np.isfinite(nearest) & (facing > 0)  # a surface facing away gets no direct light anyway

    # Shadow rays: each object is tried only where it can cast a shadow.
    blocked = []
    for solid in solids:
        box = _shadow_bounds(solid, light)
        rays = everything if box is None else _image_box(box, camera, image_size, samples)
        rays = rays[tested[rays]]
        rays = rays[_may_block(solid, points[:, rays], towards[:, rays], distance[rays])]
        starts = points[:, rays] + _EPS * normals[:, rays]
        blocked.append(rays[solid.hit(starts, towards[:, rays]) < distance[rays]])
    direct = np.maximum(facing, 0.0)
    for rays in blocked:
        direct[rays] = 0.0

    colour = np.where(np.isfinite(nearest), _linear(_FLOOR) * (_AMBIENT + _FLOOR_DIFFUSE * direct), _linear(_SKY))
    for obj, rays in zip(objects, owned):
        mat = METAL if material(obj) == "metal" else RUBBER
        base = _linear(np.array(COLOURS[obj["color"]]) / 255)
        nrm, dirs, lit = normals[:, rays], view.dirs[:, rays], direct[rays]
        half_vector = towards[:, rays] - dirs
        half_vector = half_vector / np.sqrt(_dot(half_vector, half_vector))
        highlight = np.maximum(_dot(nrm, half_vector), 0.0) ** mat.shininess * (lit > 0)
        tint = 0.5 + 0.5 * base if mat is METAL else np.ones((3, 1))
        shade = base * (_AMBIENT + mat.diffuse * lit) + mat.specular * tint * highlight
        if mat.reflection:  # the floor below (unlit) and the sky above, blended around the horizon
            mirror_z = dirs[2] - 2 * _dot(dirs, nrm) * nrm[2]
            sky = np.clip(0.5 + 2 * mirror_z, 0.0, 1.0)
            shade = shade + mat.reflection * base * ((1 - sky) * _linear(_FLOOR) * _AMBIENT + sky * _linear(_SKY))
        colour[:, rays] = shade

    pixels, per_pixel = image_size * image_size, samples * samples

    def pixel_mean(rays: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        total = np.bincount(view.pixel[rays], weights, minlength=pixels) / per_pixel
        return total.reshape(image_size, image_size)

    linear = np.stack([pixel_mean(everything, colour[c]) for c in range(3)], -1)
    image = np.round(np.clip(linear, 0.0, 1.0) ** (1 / _GAMMA) * 255).astype(np.uint8)
    empty = np.zeros((0, image_size, image_size), dtype=np.float32)
    coverage = np.stack([pixel_mean(rays) for rays in owned]).astype(np.float32) if solids else empty
    shadow = np.stack([pixel_mean(rays) for rays in blocked]).astype(np.float32) if solids else empty
    instances = np.full((image_size, image_size), -1, dtype=np.int16)
    if solids:
        covered = coverage.max(0) >= 0.5
        instances[covered] = coverage.argmax(0)[covered]
    return Render3D(image, instances, coverage, shadow)


# ---------------------------------------------------------------------------------------------
# Dataset layout
# ---------------------------------------------------------------------------------------------

def settings() -> dict[str, object]:
    """What `generation.json` records about the 3D renders."""
    return {"renderer": "cirlab.data.css3d", "renderer_version": RENDERER_VERSION, "samples_per_pixel": SAMPLES ** 2,
            "camera": asdict(Camera()), "light": asdict(Light()),
            "shapes": SHAPES_3D,
            "material": "metal when cell index + shape index is odd, else rubber"}


class RegionRecorder:
    """Draws a generated dataset's 3D images and keeps the edit-region masks its sidecar needs.

    `needed` holds (image path, object index) keys; only those masks are kept, bit-packed, so memory
    grows with the number of queries rather than with every object of every image.
    """

    def __init__(self, image_size: int, needed: set[tuple[str, int]]) -> None:
        self.image_size = image_size
        self.needed = needed
        self._masks: dict[tuple[str, int], np.ndarray] = {}

    def draw(self, path: str, objects: list[dict]) -> np.ndarray:
        render = render_scene_3d(objects, self.image_size)
        for k in range(len(objects)):
            if (path, k) in self.needed:
                self._masks[(path, k)] = np.packbits(render.region(k))
        return render.image

    def region(self, path: str, k: int) -> np.ndarray:
        """`Render3D.region(k)` of the image drawn for `path`."""
        bits = np.unpackbits(self._masks[(path, k)], count=self.image_size ** 2)
        return bits.astype(bool).reshape(self.image_size, self.image_size)


def render_folder(root: Path, render: str) -> str:
    """The folder of a CSS dataset that holds its `render` ("2d" or "3d") images.

    A generated dataset (it has generation.json) keeps 2D images in images/ and, when made with
    3D, 3D images in images_3d/. TIRG's original release keeps its 3D renders in images/ and ships
    no 2D images (TIRG draws them in code).
    """
    if render not in RENDERS:
        raise ValueError(f"unknown CSS render {render!r} (known: {', '.join(RENDERS)})")
    root = Path(root)
    if not (root / GENERATION_FILE).is_file():
        if render == "2d":
            raise DataFormatError(f"{root}: no 2D images (not a generated CSS folder, so its images/ are taken "
                                  "to be TIRG's 3D renders): set data.render=3d")
        return IMAGES_DIR
    if render == "3d" and not (root / IMAGES_3D_DIR).is_dir():
        raise DataFormatError(f"{root}: generated without 3D images (no {IMAGES_3D_DIR}/): "
                              "regenerate with `cirlab data make-css --with-3d`")
    return IMAGES_DIR if render == "2d" else IMAGES_3D_DIR
