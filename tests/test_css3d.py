"""CSS 3D renders: the ray caster's geometry, occlusion and shadows, the generated 3D layout and its
edit regions, and 2D-to-3D loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.cli import main
from cirlab.config import load_config
from cirlab.data.benchmarks import load_benchmark
from cirlab.data.css import generate_css, load_css
from cirlab.data.css3d import Camera, Light, floor_position, material, object_radius, render_scene_3d
from cirlab.data.errors import DataFormatError
from cirlab.data.regions import read_edit_regions

SIZE = 48  # the generator's smallest image size keeps these tests fast


def _obj(shape: str, pos: tuple[float, float], size: str = "large", color: str = "red") -> dict:
    return {"color": color, "shape": shape, "size": size, "pos": pos}


def _sphere_area(pos: tuple[float, float], size: str, camera: Camera, image_size: int) -> float:
    """Area in pixels of a sphere's perspective image: the ellipse x^T M x = 0 of the cone of rays
    tangent to it, area = pi |det M| / det(M_2x2)^(3/2)."""
    radius = object_radius(size)
    forward, right, up = camera.basis()
    relative = np.array([*floor_position(pos), radius]) - camera.eye
    c = np.array([relative @ right, -(relative @ up), relative @ forward])  # x right, y down, z forward
    cone = np.outer(c, c) - (c @ c - radius ** 2) * np.eye(3)  # (d.c)^2 = |d|^2 (|c|^2 - r^2) on the rim
    scale = np.diag([1.0, 1.0, camera.focal(image_size)])  # the ray through pixel offset (x, y) is (x, y, f)
    conic = scale @ cone @ scale
    return math.pi * abs(np.linalg.det(conic)) / np.linalg.det(conic[:2, :2]) ** 1.5


@pytest.mark.parametrize("pos", [(0.5, 0.5), (1 / 6, 1 / 6), (5 / 6, 5 / 6)])
def test_a_sphere_covers_its_analytic_projected_area(pos: tuple[float, float]) -> None:
    # Centre at 128 px: 471.4 px analytic; 470 pixels are at least half covered, coverage sums to 471.1.
    expected = _sphere_area(pos, "large", Camera(), 128)
    render = render_scene_3d([_obj("circle", pos)], 128)
    assert abs(render.instance_mask(0).sum() - expected) <= 0.02 * expected    # boundary pixels round
    assert abs(render.coverage[0].sum() - expected) <= 0.005 * expected        # 9 samples a pixel
    assert (render.instances >= 0).sum() == render.instance_mask(0).sum()      # nothing else is an object
    if pos == (0.5, 0.5):
        assert round(expected, 1) == 471.4 and render.instance_mask(0).sum() == 470


def test_an_object_behind_another_is_partly_hidden_and_masks_never_overlap() -> None:
    back, front = _obj("circle", (0.3, 0.5)), _obj("triangle", (0.57, 0.5), color="blue")
    alone, both, front_alone = (render_scene_3d(scene, 64) for scene in ([back], [front, back], [front]))
    assert alone.instance_mask(0).sum() == 104 and both.instance_mask(1).sum() == 78  # 26 pixels hidden
    assert np.array_equal(both.instance_mask(0), front_alone.instance_mask(0))       # the front one is whole
    assert not (both.instance_mask(0) & both.instance_mask(1)).any()
    assert both.coverage.sum(0).max() <= 1.0  # every sample sees one thing only


def test_floor_in_the_shadow_is_darker_than_lit_floor() -> None:
    light = Light((-3.0, 0.0, 2.0), radius=0.0)  # low on the left: the shadow falls to the right
    cube = _obj("rectangle", (0.5, 0.5), color="gray")
    scene, empty = render_scene_3d([cube], 64, light=light), render_scene_3d([], 64, light=light)
    (shade_row, shade_col), (lit_row, lit_col) = Camera().project(np.array([(1.0, 0, 0), (-1.0, 0, 0)]), 64).astype(int)
    assert scene.instances[shade_row, shade_col] == -1 and scene.instances[lit_row, lit_col] == -1  # both floor
    assert scene.shadow[0, shade_row, shade_col] == 1.0 and scene.shadow[0, lit_row, lit_col] == 0.0
    assert scene.image[shade_row, shade_col].tolist() == [71, 71, 69]          # ambient light only
    assert empty.image[shade_row, shade_col].tolist() == [106, 106, 101]       # the same floor, lit
    assert np.array_equal(scene.image[lit_row, lit_col], empty.image[lit_row, lit_col])


def test_rendering_is_deterministic_and_the_material_rule_holds() -> None:
    scene = [_obj("circle", (0.5, 0.5)), _obj("rectangle", (1 / 6, 1 / 6), "small", "cyan")]
    first, second = render_scene_3d(scene, SIZE), render_scene_3d(scene, SIZE)
    assert first.image.tobytes() == second.image.tobytes() and first.image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(first.coverage, second.coverage) and np.array_equal(first.shadow, second.shadow)
    # cell 4 + circle (1) is odd: metal; cell 0 + rectangle (0) is even: rubber; colour and size do not matter
    assert [material(o) for o in scene] == ["metal", "rubber"]
    assert material(_obj("circle", (0.5, 0.5), "small", "gray")) == "metal"
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        render_scene_3d([_obj("star", (0.5, 0.5))])


# ---------------------------------------------------------------------------------------------
# A generated dataset with 3D renders
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def css3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("css3d") / "tiny"
    args = ["data", "make-css", str(out), "--preset", "demo", "--families", "1", "--image-size", str(SIZE), "--with-3d"]
    assert main(args) == 0
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generated_3d_images_mirror_the_2d_ones_and_pass_the_check(css3d: Path) -> None:
    flat, solid = load_css(css3d), load_css(css3d, images="images_3d")
    assert [p.name for p in solid.test.image_paths] == [p.name for p in flat.test.image_paths]
    assert len(solid.train.image_paths) == 43 and solid.train.image_paths[0].parent.name == "images_3d"
    scene = flat.train.scenes[0]
    assert np.array_equal(_pixels(solid.train.image_paths[0]), render_scene_3d(scene, SIZE).image)
    assert main(["data", "check", str(css3d), "--format", "css"]) == 0


def test_the_3d_edit_regions_cover_every_changed_pixel(css3d: Path) -> None:
    flat, solid = read_edit_regions(css3d / "edit_regions.jsonl"), read_edit_regions(css3d / "edit_regions_3d.jsonl")
    assert [(r.split, r.reference, r.target, r.text, r.edit) for r in solid] == \
        [(r.split, r.reference, r.target, r.text, r.edit) for r in flat]
    changed = covered = 0
    for region in solid:
        folder = css3d / "images_3d"
        reference = _pixels(folder / f"css_{region.split}_{region.reference:06d}.png")
        target = _pixels(folder / f"css_{region.split}_{region.target:06d}.png")
        differs = (reference != target).any(-1)
        assert (differs & region.reference_mask).sum() >= 0.9 * differs.sum(), region.text
        changed, covered = changed + differs.sum(), covered + (differs & region.reference_mask).sum()
        assert np.array_equal(region.reference_mask, region.target_mask)
    assert changed > 0 and covered == changed  # the object and its shadow account for every change


def test_a_broken_3d_image_fails_the_check_and_a_2d_rerun_drops_stale_3d_files(css3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    generate_css(out, seed=0, image_size=SIZE, progress=False, families=1, with_3d=True)
    assert (out / "images_3d" / "css_test_000001.png").read_bytes() == \
        (css3d / "images_3d" / "css_test_000001.png").read_bytes()  # byte-identical reruns
    broken = out / "images_3d" / "css_test_000001.png"
    broken.write_bytes(broken.read_bytes()[:50])
    assert main(["data", "check", str(out), "--format", "css"]) == 1
    generate_css(out, seed=0, image_size=SIZE, progress=False, families=1)
    assert not (out / "images_3d").exists() and not (out / "edit_regions_3d.jsonl").exists()
    with pytest.raises(DataFormatError, match="generated without 3D images"):
        load_benchmark(load_config(None, [f"data.root={out}", "data.render=3d"]))


def test_2d_to_3d_pairs_a_2d_reference_with_a_3d_target(css3d: Path) -> None:
    config = load_config(None, [f"data.root={css3d}", "data.query_render=2d", "data.target_render=3d"])
    benchmark = load_benchmark(config)
    train, (test,) = benchmark.train, benchmark.evalsets
    assert train.gallery_size == 43 and len(train.image_paths) == 86 and len(train.queries) == 35
    for query in train.queries:
        reference, target = train.image_paths[query.reference], train.image_paths[query.target]
        assert reference.parent.name == "images" and target.parent.name == "images_3d"
        assert train.labels[query.reference] == -1 and train.labels[query.target] >= 0
    first = load_css(css3d).train.queries()[0]
    assert train.image_paths[train.queries[0].reference].name == f"css_train_{first[0]:06d}.png"
    assert all(test.image_paths[image].parent.name == "images_3d" for image in test.gallery)
    query = test.queries[0]
    source = query.reference.removeprefix("images/")
    assert query.reference.startswith("images/") and query.excluded == frozenset([source])  # its scene's 3D image
    assert test.protocol["images"] == "references 2d, gallery and targets 3d"
    three_d = load_benchmark(load_config(None, [f"data.root={css3d}", "data.render=3d"])).train
    assert three_d.gallery_size is None and {p.parent.name for p in three_d.image_paths} == {"images_3d"}


def test_a_folder_that_is_not_generated_has_no_2d_render(tmp_path: Path, css3d: Path) -> None:
    original = tmp_path / "original"  # TIRG's release: a .npy and images/ (3D renders), nothing else
    original.mkdir()
    (original / "css_toy_dataset_novel2_small.dup.npy").write_bytes((css3d / "css_toy_dataset_novel2_small.dup.npy")
                                                                     .read_bytes())
    (original / "images").symlink_to(css3d / "images_3d")
    with pytest.raises(DataFormatError, match="set data.render=3d"):
        load_benchmark(load_config(None, [f"data.root={original}"]))
    train = load_benchmark(load_config(None, [f"data.root={original}", "data.render=3d"])).train
    assert train.image_paths[0] == original / "images" / "css_train_000000.png"
