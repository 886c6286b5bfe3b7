"""The words and sizes of CSS scenes and the file layout of a CSS folder, shared by the 2D renderer and reader
(`css.py`) and the 3D renderer (`css3d.py`)."""

from __future__ import annotations

# The 8 CLEVR colours with the RGB values of TIRG's 2D renderer.
COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87),
    "red": (244, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 205, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SHAPES = ("rectangle", "circle", "triangle")
SIZES = ("small", "large")
# Row-major 3x3 grid: cell index = 3 * row + column.
GRID_CELLS = tuple(f"{row}-{col}" for row in ("top", "middle", "bottom") for col in ("left", "center", "right"))

IMAGES_DIR = "images"
IMAGES_3D_DIR = "images_3d"                     # `with_3d`: the 3D renders (cirlab.data.css3d)
EDIT_REGIONS_3D_FILE = "edit_regions_3d.jsonl"  # `with_3d`: edit regions in the 3D renders

BASE_SIZE = 64                                  # the reference canvas; other sizes scale the drawing
HALF_SIZE = {"small": 4.0, "large": 8.0}        # px at 64
