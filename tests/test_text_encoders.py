import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cirlab.encoders.text import (
    LSTMTextEncoder,
    MiniLMTextEncoder,
    Vocabulary,
    create_text_encoder,
    tokenize,
)


def test_tokenize_deletes_punctuation_inside_words() -> None:
    assert tokenize("Make middle-left large circle green!") == ["make", "middleleft", "large", "circle", "green"]


def test_tokenize_drops_non_ascii() -> None:
    assert tokenize("Café  naïve — ok") == ["caf", "nave", "ok"]


def test_vocabulary_is_alphabetical_with_unk_zero() -> None:
    vocab = Vocabulary.build(["red cube", "add a blue cube"])
    assert vocab.to_list() == ["<UNK>", "a", "add", "blue", "cube", "red"]
    assert len(vocab) == 6
    assert vocab.encode("Red cube, purple!") == [5, 4, 0]


def test_vocabulary_round_trip_through_json() -> None:
    vocab = Vocabulary.build(["make top-left small sphere red"])
    restored = Vocabulary.from_list(json.loads(json.dumps(vocab.to_list())))
    assert restored.to_list() == vocab.to_list()
    assert restored.encode("small topleft sphere") == vocab.encode("small topleft sphere")


def test_vocabulary_rejects_list_without_unk() -> None:
    with pytest.raises(ValueError, match="<UNK>"):
        Vocabulary.from_list(["a", "b"])


def test_lstm_padding_is_harmless() -> None:
    torch.manual_seed(0)
    vocab = Vocabulary.build(["a b c d e f"])
    encoder = LSTMTextEncoder(vocab, word_dim=16, hidden_dim=16, out_dim=8).eval()
    alone = encoder(["a b"])
    batched = encoder(["a b", "c d e f a b"])
    assert batched.shape == (2, 8)
    assert torch.allclose(alone[0], batched[0], atol=1e-6)


def test_lstm_token_outputs_and_mask() -> None:
    vocab = Vocabulary.build(["a b c"])
    encoder = LSTMTextEncoder(vocab, word_dim=4, hidden_dim=6, out_dim=3).eval()
    tokens, mask = encoder.forward_tokens(["a b c", "b", ""])
    assert tokens.shape == (3, 3, 6)
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, False, False]]
    assert encoder([""]).shape == (1, 3)  # empty text = one padding token


@pytest.mark.parametrize("name", ["lstm", "bigru"])
def test_pooled_and_tokens_equal_the_two_separate_calls(name: str) -> None:
    """OFFSET reads both; the LSTM gives both from one pass, other encoders from their two calls."""
    torch.manual_seed(0)
    encoder = create_text_encoder(name, Vocabulary.build(["a b c"]), out_dim=6).eval()
    texts = ["a b c", "b", ""]
    pooled, tokens, mask = encoder.pooled_and_tokens(texts)
    separate_tokens, separate_mask = encoder.forward_tokens(texts)
    assert torch.equal(pooled, encoder(texts))
    assert torch.equal(tokens, separate_tokens) and torch.equal(mask, separate_mask)


def test_lstm_matches_manual_one_step() -> None:
    vocab = Vocabulary.from_list(["<UNK>", "x"])
    encoder = LSTMTextEncoder(vocab, word_dim=1, hidden_dim=2, out_dim=1).eval()
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.tensor([[0.0], [1.0]]))
        # PyTorch gate order: input, forget, cell, output.
        encoder.lstm.weight_ih_l0.copy_(torch.tensor([[0.5], [-0.5], [1.0], [2.0], [0.1], [0.2], [0.3], [0.4]]))
        encoder.lstm.weight_hh_l0.normal_()  # irrelevant: the initial state is zero
        encoder.lstm.bias_ih_l0.fill_(0.1)
        encoder.lstm.bias_hh_l0.zero_()
        linear = encoder.fc[1]
        linear.weight.copy_(torch.tensor([[1.0, -2.0]]))
        linear.bias.fill_(0.5)
    pre = torch.tensor([0.5, -0.5, 1.0, 2.0, 0.1, 0.2, 0.3, 0.4]) + 0.1
    i, f, g, o = pre.view(4, 2)
    c = torch.sigmoid(i) * torch.tanh(g)  # forget gate multiplies the zero initial cell
    h = torch.sigmoid(o) * torch.tanh(c)
    expected = h[0] - 2.0 * h[1] + 0.5
    assert torch.allclose(encoder(["x"]), expected.view(1, 1), atol=1e-6)


def test_create_text_encoder_validates_names() -> None:
    vocab = Vocabulary.build(["a"])
    assert isinstance(create_text_encoder("lstm", vocab, out_dim=7, word_dim=4, hidden_dim=4), LSTMTextEncoder)
    with pytest.raises(ValueError, match="lstm, minilm"):
        create_text_encoder("bert", vocab)
    with pytest.raises(ValueError, match="vocabulary"):
        create_text_encoder("lstm", None)


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(out_dim=16)


def test_minilm_mean_pooling_is_semantic(minilm: MiniLMTextEncoder) -> None:
    with torch.no_grad():
        pooled = minilm.sentence_embedding(["a red dress", "a crimson gown", "a blue truck"])
    assert pooled.shape == (3, 384)
    assert F.cosine_similarity(pooled[0], pooled[1], dim=0) > F.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert minilm(["a red dress"]).shape == (1, 16)


def test_minilm_token_mask(minilm: MiniLMTextEncoder) -> None:
    tokens, mask = minilm.forward_tokens(["a red dress", "make the large sphere on the left blue"])
    assert tokens.shape[0] == 2 and tokens.shape[2] == 384
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [5, 10]  # words + [CLS] + [SEP]


def test_minilm_is_frozen_by_default(minilm: MiniLMTextEncoder) -> None:
    minilm.train()
    assert not minilm.model.training
    trainable = {name for name, p in minilm.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert isinstance(minilm.fc, nn.Linear)
