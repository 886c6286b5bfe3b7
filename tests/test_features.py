"""Target features kept beside an index for the exact stage: durable at commit, never half-written."""

import numpy as np
import pytest

from cirlab.index.base import IndexStoreError, UnknownImageError
from cirlab.index.faiss_index import FaissIndex
from cirlab.index.features import FEATURES_FILE


def _rows(count: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)


def test_features_round_trip_through_commit_and_reopen(tmp_path):
    vectors, features = _rows(5, 4, 0), _rows(5, 6, 1)
    with FaissIndex.create(tmp_path / "index", 4, "m", feature_dim=6) as index:
        index.add([f"i{n}" for n in range(5)], vectors, features)
        index.commit()
    with FaissIndex.open(tmp_path / "index") as index:
        assert (index.feature_dim, index.info()["feature_bytes"]) == (6, 5 * 6 * 4)
        np.testing.assert_array_equal(index.features_of(["i3", "i0"]), features[[3, 0]])
        index.remove(["i1"])
        np.testing.assert_array_equal(index.features_of(["i4"]), features[[4]])
        with pytest.raises(UnknownImageError, match="i1"):
            index.features_of(["i1"])


def test_uncommitted_features_are_overwritten_by_the_next_writer(tmp_path):
    """A writer that never commits (a crash) leaves bytes past the committed rows; they are never read."""
    with FaissIndex.create(tmp_path / "index", 4, "m", feature_dim=3) as index:
        index.add(["a", "b"], _rows(2, 4, 0), _rows(2, 3, 1))
        index.commit()
        index.add(["lost"], _rows(1, 4, 2), np.full((1, 3), 99, dtype=np.float32))  # closed uncommitted
    with FaissIndex.open(tmp_path / "index") as index:
        assert index.ids() == ["a", "b"] and (tmp_path / "index" / FEATURES_FILE).stat().st_size == 3 * 3 * 4
        fresh = _rows(1, 3, 3)
        index.add(["c"], _rows(1, 4, 4), fresh)
        index.commit()
    with FaissIndex.open(tmp_path / "index") as index:
        np.testing.assert_array_equal(index.features_of(["c"]), fresh)
        np.testing.assert_array_equal(index.features_of(["a", "b"]), _rows(2, 3, 1))


def test_features_are_refused_where_they_do_not_fit(tmp_path):
    with FaissIndex.create(tmp_path / "kept", 4, "m", feature_dim=3) as index:
        with pytest.raises(ValueError, match="keeps target features: give them"):
            index.add(["a"], _rows(1, 4, 0))
        with pytest.raises(ValueError, match=r"target features: expected an N x 3 array, got shape \(1, 2\)"):
            index.add(["a"], _rows(1, 4, 0), _rows(1, 2, 0))
        with pytest.raises(ValueError, match="2 ids for 1 rows of target features"):
            index.add(["a", "b"], _rows(2, 4, 0), _rows(1, 3, 0))
        assert len(index) == 0 and index.info()["feature_bytes"] == 0
    with FaissIndex.create(tmp_path / "plain", 4, "m") as index:
        with pytest.raises(ValueError, match="keeps no target features"):
            index.add(["a"], _rows(1, 4, 0), _rows(1, 3, 0))
        index.add(["a"], _rows(1, 4, 0))
        with pytest.raises(IndexStoreError, match="keeps no target features for exact rescoring.*rebuild it"):
            index.features_of(["a"])


def test_search_parameters_reach_faiss_and_bad_ones_are_refused(tmp_path):
    with FaissIndex.create(tmp_path / "ivf", 4, "m", factory="IVF2,Flat") as index:
        index.add([f"i{n}" for n in range(40)], _rows(40, 4, 0))
        before = index.search(_rows(1, 4, 1), 40)[1][0]
        index.set_search_parameters("nprobe=2")  # both lists: the whole index, where nprobe 1 sees one list
        assert len(index.search(_rows(1, 4, 1), 40)[1][0]) == 40 > len(before)
        with pytest.raises(ValueError, match="efSearch=8.*do not apply to this IVF2,Flat index"):
            index.set_search_parameters("efSearch=8")


def test_open_index_applies_faiss_parameters_and_refuses_what_does_not_fit(tmp_path):
    from cirlab.index.build import open_index

    with FaissIndex.create(tmp_path / "ivf", 4, "m", factory="IVF2,Flat") as index:
        index.add([f"i{n}" for n in range(40)], _rows(40, 4, 0))
        index.commit()
    with open_index(tmp_path / "ivf", faiss_params="nprobe=2") as index:
        assert len(index.search(_rows(1, 4, 1), 40)[1][0]) == 40  # both lists visited
    with pytest.raises(ValueError, match="efSearch=8.*do not apply to this IVF2,Flat index"):
        open_index(tmp_path / "ivf", faiss_params="efSearch=8")


def test_opening_an_index_to_search_writes_no_features_file(tmp_path):
    with FaissIndex.create(tmp_path / "index", 4, "m", feature_dim=3):
        pass  # committed empty: no row was ever written
    files = sorted(path.name for path in (tmp_path / "index").iterdir())
    with FaissIndex.open(tmp_path / "index") as index:
        assert index.info()["feature_bytes"] == 0 and len(index.search(_rows(1, 4, 0), 3)[1][0]) == 0
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == files
    assert FEATURES_FILE not in files
