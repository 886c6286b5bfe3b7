import os
import stat

import pytest

from cirlab.files import atomic_write_bytes, atomic_write_text


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    with open(tmp_path / "b.json", "w") as handle:
        handle.write("{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode)
    assert (tmp_path / "a.json").read_text() == "{}"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]
