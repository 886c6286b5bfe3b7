"""The `cirlab` command: help for every subcommand, and one-line errors for bad input."""

import shutil

import numpy as np
import pytest

from cirlab.cli import build_parser, main

SUBCOMMANDS = [["data", "make-css"], ["data", "make-cirr"], ["data", "make-garments"], ["data", "check"],
               ["data", "masks"],
               ["index", "build"], ["index", "add"],
               ["index", "remove"], ["index", "info"], ["search"],
               ["explain"], ["serve"], ["train"], ["eval"], ["demo"], ["models"]]


@pytest.mark.parametrize("words", SUBCOMMANDS)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: cirlab " + " ".join(words) in capsys.readouterr().out


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.split() == ["cmap", "combiner", "concat", "image_only", "lbf", "offset",
                                                "text_only", "tirg", "tirg_lastconv"]


def _train(root, out):
    return main(["train", "--set", f"data.root={root}", "--set", "model.image_backbone=resnet18",
                 "--set", "model.image_weights=null", "--set", "train.iterations=1", "--out", str(out)])


def _one_error_line(capsys) -> str:
    # progress bars share stderr; exactly one error line, and it names what is wrong
    errors = [line[line.index("cirlab: error: "):] for line in capsys.readouterr().err.splitlines()
              if "cirlab: error: " in line]
    assert len(errors) == 1
    return errors[0]


def test_missing_data_folder(tmp_path, capsys):
    assert _train(tmp_path / "absent", tmp_path / "run") == 2
    assert str(tmp_path / "absent") in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_corrupt_png_is_named(tiny_css, tmp_path, capsys):
    root = tmp_path / "css"
    shutil.copytree(tiny_css, root)
    broken = root / "images" / "css_train_000003.png"
    broken.write_bytes(broken.read_bytes()[:40])
    assert _train(root, tmp_path / "run") == 2
    assert "css_train_000003.png" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_npy_of_the_wrong_shape_is_named(tiny_css, tmp_path, capsys):
    root = tmp_path / "css"
    shutil.copytree(tiny_css, root)
    npy = next(root.glob("*.npy"))
    np.save(npy, np.zeros((3, 3)))
    assert _train(root, tmp_path / "run") == 2
    assert npy.name in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_eval_of_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a cirlab checkpoint" in _one_error_line(capsys)


def test_data_check_lists_every_problem(tiny_css, tmp_path, capsys):
    assert main(["data", "check", str(tiny_css), "--format", "css"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    root = tmp_path / "css"
    shutil.copytree(tiny_css, root)
    (root / "images" / "css_test_000001.png").write_bytes(b"not a png")
    (root / "images" / "css_train_000002.png").write_bytes(b"")
    assert main(["data", "check", str(root), "--format", "css"]) == 1
    out = capsys.readouterr().out
    assert "css_test_000001.png" in out and "css_train_000002.png" in out and "2 problem(s)" in out
