"""`cirlab index build|info` and `cirlab search` on a tiny trained checkpoint."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cirlab.checkpoint import CheckpointError, load_checkpoint
from cirlab.cli import main
from cirlab.config import load_config
from cirlab.train import train

TINY = ["model.image_backbone=resnet18", "model.image_weights=null", "model.backbone_upto=layer2",
        "model.embed_dim=16", "train.batch_size=4", "train.iterations=2", "train.eval_every=2", "data.val_fraction=0.2"]


@pytest.fixture(scope="module")
def checkpoints(tiny_css, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        train(load_config(None, [f"data.root={tiny_css}", f"train.seed={seed}", *TINY]), runs / f"s{seed}",
              progress=False)
    return runs / "s0" / "best", runs / "s1" / "best"


def test_build_info_search_and_refuse_another_model(tiny_css, checkpoints, tmp_path, capsys):
    images = sorted(p.name for p in (tiny_css / "images").glob("*.png"))
    index = tmp_path / "index"
    assert main(["index", "build", str(checkpoints[0]), str(tiny_css / "images"), "--out", str(index)]) == 0
    assert f"{len(images)} images indexed" in capsys.readouterr().out
    assert main(["index", "info", str(index)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == len(images) and info["checkpoint"] == str(checkpoints[0].resolve())

    reference = "css_test_000001.png"
    assert main(["search", str(index), "--checkpoint", str(checkpoints[0]), "--id", reference,
                 "--text", "remove object", "-k", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 5 and reference not in [r["id"] for r in results]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert all(r["path"] == str((tiny_css / "images" / r["id"]).resolve()) for r in results)

    heatmap = tmp_path / "why.png"
    assert main(["search", str(index), "--id", reference, "--text", "remove object", "--explain", str(heatmap)]) == 0
    assert f"wrote {heatmap}" in capsys.readouterr().out
    with Image.open(heatmap) as overlay:
        assert overlay.format == "PNG" and overlay.size == (256, 256)  # 64 px reference, enlarged 4 times
    # without --checkpoint, the one recorded in the index at build time is used
    assert main(["search", str(index), "--id", reference, "--text", "remove object", "-k", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == results

    assert main(["search", str(index), "--checkpoint", str(checkpoints[1]), "--id", reference,
                 "--text", "remove object"]) == 2
    assert "cirlab: error:" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--id", "nope.png", "--text", "make it red"], "nope.png"),
    (["--id", "css_test_000001.png", "--text", "   "], "text is empty"),
])
def test_search_bad_input(tiny_css, checkpoints, tmp_path, capsys, extra, message):
    index = tmp_path / "index"
    main(["index", "build", str(checkpoints[0]), str(tiny_css / "images"), "--out", str(index)])
    capsys.readouterr()
    assert main(["search", str(index), "--checkpoint", str(checkpoints[0]), *extra]) == 2
    assert message in capsys.readouterr().err


def test_index_add_embeds_new_gallery_images_and_remove_takes_them_out(tiny_css, checkpoints, tmp_path, capsys):
    import shutil

    gallery = tmp_path / "gallery"
    names = sorted(p.name for p in (tiny_css / "images").glob("*.png"))
    gallery.mkdir()
    for name in names[:10]:
        shutil.copy(tiny_css / "images" / name, gallery / name)
    index = tmp_path / "index"
    assert main(["index", "build", str(checkpoints[0]), str(gallery), "--out", str(index)]) == 0
    for name in names[10:13]:
        shutil.copy(tiny_css / "images" / name, gallery / name)
    capsys.readouterr()
    assert main(["index", "add", str(index)]) == 0
    assert "3 new images added" in capsys.readouterr().out
    assert main(["index", "remove", str(index), names[0], names[11]]) == 0
    assert "removed 2 images, 11 left" in capsys.readouterr().out
    assert main(["search", str(index), "--id", names[1], "--text", "remove object", "-k", "20", "--json"]) == 0
    found = {r["id"] for r in json.loads(capsys.readouterr().out)}
    assert found == set(names[2:13]) - {names[11]}
    assert main(["index", "remove", str(index), "nope.png"]) == 2
    assert "nope.png" in capsys.readouterr().err


def _photo(path, size, fmt, mode="RGB", frames=1):
    rng = np.random.default_rng(size[0] * 7 + size[1])
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
              for _ in range(frames)]
    images[0].save(path, fmt, save_all=frames > 1, append_images=images[1:])
    return path


def test_the_checkpoint_records_the_native_size(checkpoints):
    recorded = json.loads((checkpoints[0] / "preprocessing.json").read_text())
    assert recorded["size"] == [64, 64]  # data.image_size is null: the CSS images' own size
    assert load_checkpoint(checkpoints[0]).model.image_size == (64, 64)


def test_an_older_checkpoint_without_a_recorded_size_is_refused_by_name(checkpoints, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(checkpoints[0], older)
    (older / "preprocessing.json").unlink()
    with pytest.raises(CheckpointError, match="native size.*preprocessing.json"):
        load_checkpoint(older)
    assert load_checkpoint(older, ["data.image_size=64"]).model.image_size == (64, 64)


def test_search_with_photos_of_any_size_mode_and_frame_count(tiny_css, checkpoints, tmp_path, capsys):
    index = tmp_path / "index"
    assert main(["index", "build", str(checkpoints[0]), str(tiny_css / "images"), "--out", str(index)]) == 0
    capsys.readouterr()
    reference = "css_test_000001.png"
    copy = tmp_path / "copy.png"
    shutil.copy(tiny_css / "images" / reference, copy)
    photos = [copy, _photo(tmp_path / "photo.jpg", (200, 150), "JPEG"), _photo(tmp_path / "dot.png", (1, 1), "PNG"),
              _photo(tmp_path / "anim.gif", (32, 32), "GIF", "P", frames=2),
              _photo(tmp_path / "grey.png", (40, 90), "PNG", "L")]
    for photo in photos:
        assert main(["search", str(index), "--image", str(photo), "--text", "remove object", "-k", "4", "--json"]) == 0
        results = json.loads(capsys.readouterr().out)
        assert len(results) == 4, photo
        assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
        if photo == copy:  # a file copy of a gallery image is preprocessed exactly as `--id` is
            from_copy = [r for r in results if r["id"] != reference][:3]
    assert main(["search", str(index), "--id", reference, "--text", "remove object", "-k", "3", "--json"]) == 0
    by_id = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in from_copy] == [r["id"] for r in by_id]
    np.testing.assert_allclose([r["score"] for r in from_copy], [r["score"] for r in by_id], atol=1e-5)


def test_index_build_and_add_over_a_gallery_of_mixed_sizes_and_modes(checkpoints, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    shapes = [((200, 150), "JPEG", "RGB"), ((1, 1), "PNG", "RGB"), ((64, 300), "PNG", "RGBA"),
              ((33, 33), "GIF", "P"), ((90, 40), "PNG", "L")]
    for number, (size, fmt, mode) in enumerate(shapes):
        _photo(gallery / f"g{number}.{fmt.lower()}", size, fmt, mode)
    index = tmp_path / "index"
    assert main(["index", "build", str(checkpoints[0]), str(gallery), "--out", str(index)]) == 0
    assert f"{len(shapes)} images indexed" in capsys.readouterr().out
    _photo(gallery / "late.webp", (500, 20), "WEBP")
    assert main(["index", "add", str(index)]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "--id", "g0.jpeg", "--text", "make it red", "-k", "10", "--json"]) == 0
    found = {hit["id"] for hit in json.loads(capsys.readouterr().out)}
    assert found == {"g1.png", "g2.png", "g3.gif", "g4.png", "late.webp"}  # all but the reference itself
