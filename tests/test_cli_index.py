"""`cirlab index build|info` and `cirlab search` on a tiny trained checkpoint."""

import json

import pytest
from PIL import Image

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
