"""The registry of benchmark readers: a data config in, train and test splits out."""

from __future__ import annotations

from pathlib import Path

from cirlab.config import DataConfig
from cirlab.data.css import CSSSplit, load_css
from cirlab.data.records import Query, RetrievalSplit


def _css_split(name: str, split: CSSSplit) -> RetrievalSplit:
    queries = [Query(source, text, target) for source, text, target in split.queries()]
    return RetrievalSplit(name, list(split.image_paths), split.labels, queries)


def load_splits(config: DataConfig) -> tuple[RetrievalSplit, RetrievalSplit]:
    """Read the benchmark `config.format` from `config.root`; returns (train, test)."""
    if config.format == "css":
        dataset = load_css(Path(config.root))
        return _css_split("train", dataset.train), _css_split("test", dataset.test)
    raise ValueError(f"unknown data format '{config.format}' (known: css)")
