from pathlib import Path

import pytest

from cirlab.data.css import generate_css


@pytest.fixture(scope="session")
def tiny_css(tmp_path_factory) -> Path:
    """A tiny synthetic CSS dataset (2 edit families per split), generated once per test session."""
    return generate_css(tmp_path_factory.mktemp("css") / "tiny", preset="demo", seed=1, progress=False, families=2)
