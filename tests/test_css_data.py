"""CSS: the exact TIRG renderer, the generator's invariants, the on-disk format and the safe reader."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from cirlab.data.css import (
    COLOURS,
    DATA_FILE,
    GRID_CELLS,
    SHAPES,
    SIZES,
    CSSSplit,
    generate_css,
    load_css,
    object_mask,
    render_scene,
)
from cirlab.data.errors import DataFormatError
from cirlab.data.regions import mask_box, read_edit_regions
from cirlab.images import load_image

CENTRE = (0.5, 0.5)  # pixel (32, 32) at 64 px


def _obj(shape: str, size: str = "small", color: str = "red", pos: tuple[float, float] = CENTRE) -> dict:
    return {"color": color, "shape": shape, "size": size, "pos": pos}


# ---------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------

def test_colours_are_tirgs_exact_rgb() -> None:
    assert COLOURS == {"gray": (87, 87, 87), "red": (244, 35, 35), "blue": (42, 75, 215),
                       "green": (29, 205, 20), "brown": (129, 74, 25), "purple": (129, 38, 192),
                       "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
    assert GRID_CELLS[0] == "top-left" and GRID_CELLS[4] == "middle-center" and GRID_CELLS[8] == "bottom-right"


@pytest.mark.parametrize("shape, size, at64, at128", [
    ("rectangle", "small", 64, 256), ("rectangle", "large", 256, 1024),
    ("circle", "small", 32, 128), ("circle", "large", 128, 512),
    ("triangle", "small", 28, 120), ("triangle", "large", 120, 496),
])
def test_pixel_counts_at_the_centre(shape: str, size: str, at64: int, at128: int) -> None:
    for image_size, count in ((64, at64), (128, at128)):
        image = render_scene([_obj(shape, size, "blue")], image_size)
        painted = ~np.all(image == 1.0, axis=2)
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.float64
        assert painted.sum() == count
        assert np.array_equal(image[painted], np.tile(np.array(COLOURS["blue"]) / 255, (count, 1)))
        assert np.array_equal(object_mask(_obj(shape, size), image_size), painted)


ASCII = {
    "rectangle": (28, ["########"] * 8),
    "circle": (29, ["...##...", "..####..", ".######.", "########", ".######.", "..####..", "...##..."]),
    "triangle": (29, ["...#....", "...##...", "..###...", "..####..", ".#####..", ".######.", "#######."]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_small_shapes_match_the_reference_drawing(shape: str) -> None:
    top, rows = ASCII[shape]
    mask = object_mask(_obj(shape))
    window = ["".join("#" if v else "." for v in row) for row in mask[top:top + len(rows), 28:36]]
    assert window == rows
    assert mask.sum() == sum(row.count("#") for row in rows)  # nothing outside the window


def test_truncation_off_centre_and_drawing_order() -> None:
    # Centre (10.67, 10.67): rows/cols int(2.67)=2 .. int(18.67)-1=17.
    assert mask_box(object_mask(_obj("rectangle", "large", pos=(1 / 6, 1 / 6)))) == [2, 2, 18, 18]
    image = render_scene([_obj("rectangle", "large", "red"), _obj("rectangle", "small", "green")])
    assert np.array_equal(image[32, 32], np.array(COLOURS["green"]) / 255)  # later objects overwrite
    assert np.array_equal(image[25, 25], np.array(COLOURS["red"]) / 255)
    assert np.all(image[0, 0] == 1.0)


def test_objects_running_off_the_bottom_are_refused() -> None:
    with pytest.raises(ValueError, match="bottom"):
        render_scene([_obj("circle", "large", pos=(0.95, 0.5))])


# ---------------------------------------------------------------------------------------------
# A generated demo dataset
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_css(tmp_path_factory.mktemp("css") / "demo", preset="demo", seed=0, progress=False)


def _cell(obj: dict) -> str:
    return GRID_CELLS[3 * int(obj["pos"][0] * 3) + int(obj["pos"][1] * 3)]


def _values(obj: dict) -> dict[str, str]:
    return {"cell": _cell(obj), "size": obj["size"], "color": obj["color"], "shape": obj["shape"]}


def _key(scene: list[dict]) -> tuple:
    return tuple(sorted((_cell(o), o["shape"], o["color"], o["size"]) for o in scene))


def _refers_to(obj: dict, words: list[str]) -> bool:
    values = set(_values(obj).values())
    return all(word == "object" or word in values for word in words)


def _resolve(scene: list[dict], words: list[str]) -> int:
    """The one object a referring expression picks out; checks uniqueness, order and minimality."""
    matches = [i for i, obj in enumerate(scene) if _refers_to(obj, words)]
    assert len(matches) == 1, (words, scene)
    obj = scene[matches[0]]
    order = [("cell", GRID_CELLS), ("size", SIZES), ("color", COLOURS), ("shape", SHAPES)]
    used = [name for name, vocab in order if any(w in vocab for w in words)]
    assert words == [_values(obj)[name] for name in used] + ([] if "shape" in used else ["object"])
    shorter = [subset for n in range(len(used)) for subset in combinations(("cell", "size", "color", "shape"), n)
               if sum(all(_values(o)[f] == _values(obj)[f] for f in subset) for o in scene) == 1]
    assert not shorter, f"{words} is not minimal in {scene}"
    return matches[0]


def _check_edit(source: list[dict], text: str, target: list[dict]) -> None:
    """The target is the source with exactly the edit the text describes."""
    words = text.split()
    verb = words[0]
    if verb == "add":
        size, color, shape, to, cell = words[1:]
        assert to == "to" and cell not in {_cell(o) for o in source}
        added = [o for o in target if o not in source]
        assert len(added) == 1 and len(target) == len(source) + 1
        assert _values(added[0]) == {"cell": cell, "size": size, "color": color, "shape": shape}
    elif verb == "remove":
        index = _resolve(source, words[1:])
        assert sorted(map(str, target)) == sorted(map(str, source[:index] + source[index + 1:]))
    else:
        assert verb == "make"
        index = _resolve(source, words[1:-1])
        value = words[-1]
        attribute = next(name for name, vocab in (("color", COLOURS), ("size", SIZES), ("shape", SHAPES))
                         if value in vocab)
        assert source[index][attribute] != value
        edited = dict(source[index], **{attribute: value})
        assert sorted(map(str, target)) == sorted(map(str, source[:index] + [edited] + source[index + 1:]))


def test_counts_match_generation_json_and_preset(demo: Path) -> None:
    meta = json.loads((demo / "generation.json").read_text())
    data = load_css(demo)
    assert (meta["preset"], meta["seed"], meta["image_size"], meta["generator_version"]) == ("demo", 0, 64, 1)
    for name, queries in (("train", 1505), ("test", 805)):
        split: CSSSplit = getattr(data, name)
        counts = meta["counts"][name]
        assert len(split.queries()) == counts["queries"] == queries
        assert len(split.scenes) == len(split.image_paths) == counts["images"]
        assert len(split.mods) == counts["mods"] == len({m["to_str"] for m in split.mods})
        assert len(np.unique(split.labels)) == counts["labels"]
        assert split.image_paths[7] == demo / "images" / f"css_{name}_000007.png"


def test_every_edit_is_exactly_what_its_text_says(demo: Path) -> None:
    data = load_css(demo)
    for split in (data.train, data.test):
        for source, text, target in split.queries():
            _check_edit(split.scenes[source], text, split.scenes[target])
        edits = split.edits_by_source()
        assert {len(e) for e in edits.values()} == {5}  # TIRG draws a second text from the same source
        assert all(len({text for text, _ in e}) == 5 for e in edits.values())
        targets = {target for pairs in edits.values() for _, target in pairs}
        assert len(set(edits) & targets) == len(edits) * 6 // 7  # chains: all but each family's root
        assert {len(scene) for scene in split.scenes} <= set(range(6))


def test_held_out_combinations_only_in_test(demo: Path) -> None:
    held_out = {(c["color"], c["shape"]) for c in json.loads((demo / "generation.json").read_text())
                ["held_out_combinations"]}
    assert len(held_out) == 3
    data = load_css(demo)

    def combos(split: CSSSplit) -> set[tuple[str, str]]:
        return {(o["color"], o["shape"]) for scene in split.scenes for o in scene}

    assert not combos(data.train) & held_out
    assert combos(data.test) >= held_out


def test_labels_equal_exactly_for_equal_scenes(demo: Path) -> None:
    for split in (load_css(demo).train, load_css(demo).test):
        by_key: dict[tuple, int] = {}
        for scene, label in zip(split.scenes, split.labels):
            assert by_key.setdefault(_key(scene), int(label)) == label
        assert len(set(by_key.values())) == len(by_key)  # different scenes never share a label
        assert len(by_key) < len(split.scenes)  # duplicates do occur


def test_pngs_are_the_rendered_scenes(demo: Path) -> None:
    split = load_css(demo).test
    for index in range(0, len(split.scenes), 37):
        pixels = np.asarray(load_image(split.image_paths[index]))
        assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 3)
        assert np.array_equal(pixels, np.round(render_scene(split.scenes[index]) * 255).astype(np.uint8))


def test_edit_regions_cover_exactly_the_edited_object(demo: Path) -> None:
    data = load_css(demo)
    regions = read_edit_regions(demo / "edit_regions.jsonl")
    queries = [("train", q) for q in data.train.queries()] + [("test", q) for q in data.test.queries()]
    assert len(regions) == len(queries)
    for region, (name, (source, text, target)) in zip(regions, queries):
        split = getattr(data, name)
        assert (region.split, region.reference, region.target, region.text) == (name, source, target, text)
        assert region.edit == text.split()[0]
        assert np.array_equal(region.reference_mask, region.target_mask)
        assert region.reference_box == region.target_box == mask_box(region.reference_mask)
        before = {str(o) for o in split.scenes[source]}
        after = {str(o) for o in split.scenes[target]}
        edited = [o for o in split.scenes[source] if str(o) not in after]
        edited += [o for o in split.scenes[target] if str(o) not in before]
        footprint = np.logical_or.reduce([object_mask(o) for o in edited])
        assert np.array_equal(region.reference_mask, footprint)
        changed = np.any(render_scene(split.scenes[source]) != render_scene(split.scenes[target]), axis=2)
        if region.attribute in ("size", "shape"):  # only the symmetric difference changes colour
            assert changed.any() and not np.any(changed & ~region.reference_mask)
        else:  # add, remove and colour changes repaint every pixel of the object
            assert region.attribute in (None, "color")
            assert region.reference_mask.sum() == object_mask(edited[0]).sum() == changed.sum()
            assert np.array_equal(changed, region.reference_mask)


def _pixel_recall_at_1(split: CSSSplit) -> float:
    """Image-only proxy: cosine of raw pixels, own image excluded, label-based hit."""
    pixels = np.stack([np.asarray(load_image(p), dtype=np.float64).ravel() for p in split.image_paths])
    pixels /= np.linalg.norm(pixels, axis=1, keepdims=True)
    queries = split.queries()
    sources = np.array([s for s, _, _ in queries])
    similarity = pixels[sources] @ pixels.T
    similarity[np.arange(len(sources)), sources] = -np.inf
    retrieved = split.labels[similarity.argmax(axis=1)]
    return float(np.mean(retrieved == split.labels[[t for _, _, t in queries]]))


def test_image_only_retrieval_stays_weak(demo: Path) -> None:
    recall = _pixel_recall_at_1(load_css(demo).test)
    assert 0.05 < recall < 0.2  # above chance (targets are near) but far from solved


def test_reader_round_trip_matches_the_written_file(demo: Path) -> None:
    raw = np.load(demo / DATA_FILE, allow_pickle=True).item()  # our own file, so trusted here
    for via in (demo, demo / DATA_FILE):
        data = load_css(via)
        assert data.root == demo
        for name in ("train", "test"):
            split = getattr(data, name)
            assert split.scenes == [[dict(o, pos=tuple(o["pos"])) for o in scene] for scene in raw[name]["objects_img"]]
            assert np.array_equal(split.labels, raw[name]["labels"]) and split.labels.dtype == np.int64
            assert split.mods == raw[name]["mods"]


# ---------------------------------------------------------------------------------------------
# Determinism and sizes
# ---------------------------------------------------------------------------------------------

def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = _files(generate_css(tmp_path / "a", seed=3, progress=False, families=1))
    second = _files(generate_css(tmp_path / "b", seed=3, progress=False, families=1))
    other = _files(generate_css(tmp_path / "c", seed=4, progress=False, families=1))
    assert len(first) == 3 + 2 * 43  # npy, json, jsonl, images/ + 43 images per split
    assert first == second
    assert first[DATA_FILE] != other[DATA_FILE]
    generate_css(tmp_path / "a", seed=4, progress=False, families=1)  # regenerating in place replaces all
    assert _files(tmp_path / "a") == other


def test_image_size_scales_the_drawing(tmp_path: Path) -> None:
    out = generate_css(tmp_path / "big", seed=0, image_size=128, progress=False, families=1)
    split = load_css(out).train
    pixels = np.asarray(load_image(split.image_paths[0]))
    assert pixels.shape == (128, 128, 3)
    assert np.array_equal(pixels, np.round(render_scene(split.scenes[0], 128) * 255).astype(np.uint8))
    assert read_edit_regions(out / "edit_regions.jsonl")[0].reference_mask.shape == (128, 128)


def test_generator_refuses_a_foreign_folder_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        generate_css(tmp_path, progress=False, families=1)
    with pytest.raises(ValueError, match="preset"):
        generate_css(tmp_path / "x", preset="huge")
    with pytest.raises(ValueError, match="image_size"):
        generate_css(tmp_path / "x", image_size=16)
    with pytest.raises(ValueError, match="families"):
        generate_css(tmp_path / "x", families=0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_css(tmp_path_factory.mktemp("css") / "tiny", seed=1, progress=False, families=1)


def _copy_with(tiny: Path, tmp_path: Path, mutate) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(tiny, root)
    data = np.load(root / DATA_FILE, allow_pickle=True).item()
    mutate(data)
    np.save(root / DATA_FILE, data, allow_pickle=True)
    return root


@pytest.mark.parametrize("mutate, fault", [
    (lambda d: d.pop("test"), "expected a dict with 'train' and 'test'"),
    (lambda d: d["train"].update(objects_img=5), "'objects_img' must be a list"),
    (lambda d: d["train"]["objects_img"][2].append({"color": "pink", "shape": "circle", "size": "small",
                                                    "pos": (0.5, 0.5)}), "unknown color 'pink'"),
    (lambda d: d["test"].update(labels=np.zeros(3, dtype=np.int64)), "'labels' must be 43 integers"),
    (lambda d: d["test"].update(labels=np.zeros(43)), "'labels' must be 43 integers"),
    (lambda d: d["train"]["mods"][0]["to"].append(0), r"'from' has (\d+) entries but 'to' has \d+"),
    (lambda d: d["test"]["mods"][1]["to"].__setitem__(0, 43), "image index 43 out of range"),
    (lambda d: d["test"]["mods"][1].pop("to_str"), r"mods\[1\]: expected a dict"),
])
def test_malformed_content_is_reported_with_the_file(tiny: Path, tmp_path: Path, mutate, fault: str) -> None:
    root = _copy_with(tiny, tmp_path, mutate)
    with pytest.raises(DataFormatError, match=fault) as info:
        load_css(root)
    assert str(info.value).startswith(str(root / DATA_FILE)) and "\n" not in str(info.value)


def test_missing_folder_file_and_image(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=f"{tmp_path / 'nowhere'}: no such CSS folder"):
        load_css(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=f"{tmp_path / 'empty' / DATA_FILE}: missing CSS data file"):
        load_css(tmp_path / "empty")
    root = _copy_with(tiny, tmp_path, lambda d: None)
    (root / "images" / "css_test_000012.png").unlink()
    with pytest.raises(DataFormatError, match=f"{root / 'images' / 'css_test_000012.png'}: missing image"):
        load_css(root)


def _npy_with_payload(path: Path, payload: bytes, header: dict | None = None) -> Path:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(buffer, header or {"descr": "|O", "fortran_order": False, "shape": ()})
    path.write_bytes(buffer.getvalue() + payload)
    return path


def test_non_dict_npy_files_are_refused(tmp_path: Path) -> None:
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros((3, 2)))
    with pytest.raises(DataFormatError, match=f"{floats}: expected a pickled dict .* float64 array of shape"):
        load_css(floats)
    listed = tmp_path / "list.npy"
    np.save(listed, np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match=f"{listed}: expected a pickled dict"):
        load_css(listed)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not a numpy file at all")
    with pytest.raises(DataFormatError, match=f"{garbage}: not a readable CSS .npy file"):
        load_css(garbage)
    truncated = _npy_with_payload(tmp_path / "truncated.npy", pickle.dumps(np.array({"a": 1}))[:20])
    with pytest.raises(DataFormatError, match=f"{truncated}: not a readable"):
        load_css(truncated)


def test_the_unpickler_refuses_anything_but_numpy(tmp_path: Path) -> None:
    # GLOBAL 'os system' then STOP: names os.system without ever calling it.
    evil = _npy_with_payload(tmp_path / "evil.npy", b"\x80\x02cos\nsystem\n.")
    with pytest.raises(DataFormatError, match=f"{evil}: refusing to unpickle os.system"):
        load_css(evil)
    builtin = _npy_with_payload(tmp_path / "eval.npy", b"\x80\x02cbuiltins\neval\n.")
    with pytest.raises(DataFormatError, match="refusing to unpickle builtins.eval"):
        load_css(builtin)


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2 wrote its byte strings, as in TIRG's original file."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def _save_py2_string(self, value: str | bytes) -> None:
        raw = value.encode("latin1") if isinstance(value, str) else value
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(value)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def test_reads_a_python2_pickle_with_numpy1_names(tmp_path: Path) -> None:
    scene = [{"color": "red", "shape": "circle", "size": "small", "pos": (0.5, 0.25)}]
    data = {"train": {"objects_img": [scene, []], "labels": np.array([7, 8]),
                      "mods": [{"to_str": "remove object", "from": [0], "to": [1]}]},
            "test": {"objects_img": [[], scene], "mods": [{"to_str": "add small red circle to middle-left",
                                                          "from": [0], "to": [1]}]}}
    array = np.empty((), dtype=object)
    array[()] = data
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(array)
    payload = buffer.getvalue()
    assert b"cnumpy._core.multiarray\n" in payload and b"X\x06\x00\x00\x00labels" not in payload
    root = tmp_path / "py2"
    (root / "images").mkdir(parents=True)
    for name in ("css_train_000000.png", "css_train_000001.png", "css_test_000000.png", "css_test_000001.png"):
        (root / "images" / name).write_bytes(b"")
    _npy_with_payload(root / DATA_FILE, payload.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    loaded = load_css(root)
    assert loaded.train.scenes == [scene, []] and loaded.train.labels.tolist() == [7, 8]
    assert loaded.test.labels.tolist() == [0, 1]  # no labels in the file: identity = image index
    assert loaded.test.queries() == [(0, "add small red circle to middle-left", 1)]
    assert loaded.train.edits_by_source() == {0: [("remove object", 1)]}


def test_corrupt_png_is_reported_at_load_time(tiny: Path, tmp_path: Path) -> None:
    root = _copy_with(tiny, tmp_path, lambda d: None)
    path = root / "images" / "css_train_000003.png"
    path.write_bytes(path.read_bytes()[:60])
    split = load_css(root).train  # loading the index does not decode images
    with pytest.raises(DataFormatError, match=f"{path}: corrupt or unreadable image"):
        load_image(split.image_paths[3])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataFormatError, match=f"{path}: corrupt or unreadable image"):
        load_image(path)
    with pytest.raises(DataFormatError, match="missing image"):
        load_image(root / "images" / "absent.png")
