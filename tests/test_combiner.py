"""The CLIP4Cir Combiner: its output on fixed weights, its loss scale, its sizes, and any towers."""

import math

import pytest
import torch
from torch import nn

from cirlab.config import load_config
from cirlab.encoders.image import ImageEncoder, create_backbone
from cirlab.encoders.text import LSTMTextEncoder, Vocabulary
from cirlab.losses import batch_classification_loss
from cirlab.models.combiner import Combiner
from cirlab.models.registry import create_model

TEXTS = ["make it red", "add a cube"]


def _encoders(dim: int) -> tuple[ImageEncoder, LSTMTextEncoder]:
    image = ImageEncoder(create_backbone("resnet18", weights=None, upto="layer1"), out_dim=dim)
    return image, LSTMTextEncoder(Vocabulary.build(TEXTS), word_dim=4, hidden_dim=4, out_dim=dim)


def _set(linear: nn.Linear, weight: list, bias: list) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_the_combiner_on_fixed_weights_matches_the_hand_computed_query():
    model = Combiner(*_encoders(2), projection_dim=2, hidden_dim=2).eval()  # eval: no dropout
    _set(model.text_projection[0], [[1, 0], [0, 1]], [0, 0])
    _set(model.image_projection[0], [[1, 0], [0, 1]], [0, 0])
    _set(model.combiner_layer[0], [[1, 0, 0, 0], [0, 0, 0, 1]], [0, 0])
    _set(model.output_layer, [[1, 1], [0, -1]], [0, 0.5])
    _set(model.dynamic_scalar[0][0], [[0, 0, 0, 0], [0, 0, 0, 0]], [0, 0])
    _set(model.dynamic_scalar[1], [[0, 0]], [math.log(3)])  # gate = sigmoid(ln 3) = 0.75
    text, image = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 1.0]])
    # projected = [relu(t); relu(v)] = [1, 0, 3, 1] (text first); combiner layer -> relu([1, 1]) = [1, 1];
    # output layer -> [2, -0.5]; + 0.75 t + 0.25 v = [2 + 0.75 + 0.75, -0.5 - 1.5 + 0.25] = [3.5, -1.75].
    expected = torch.tensor([[2.0, -1.0]]) / math.sqrt(5)
    assert torch.allclose(model.compose(image, text), expected, atol=1e-6)


def test_the_loss_is_cross_entropy_over_100_times_the_cosine():
    model = Combiner(*_encoders(2), projection_dim=2, hidden_dim=2)
    angle = math.acos(0.99)
    targets = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)]])
    queries = 3 * targets  # unnormalised on purpose: the loss sees cosines
    # logits 100 x [[1, 0.99], [0.99, 1]]: each row loses log(1 + e^-1)
    loss = batch_classification_loss(*model.loss_features(queries, targets))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-4)


def test_the_code_sizes_and_dropouts_are_the_defaults():
    model = Combiner(*_encoders(8))
    assert model.text_projection[0].out_features == 32 and model.image_projection[0].out_features == 32
    assert model.combiner_layer[0].in_features == 64 and model.combiner_layer[0].out_features == 64
    assert model.output_layer.out_features == 8
    parts = (model.text_projection, model.image_projection, model.combiner_layer, model.dynamic_scalar)
    assert [m.p for part in parts for m in part.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5, 0.5, 0.5]


def test_sum_fusion_is_the_normalised_sum_and_adds_no_layers():
    model = Combiner(*_encoders(2), fusion="sum")
    image, text = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, -2.0]])
    assert torch.allclose(model.compose(image, text), torch.tensor([[4.0, -1.0]]) / math.sqrt(17))
    encoders = {id(p) for p in [*model.image_encoder.parameters(), *model.text_encoder.parameters()]}
    assert [name for name, p in model.named_parameters() if id(p) not in encoders] == ["normalization.scale"]


def test_mismatched_feature_sizes_and_unknown_fusions_are_refused():
    image, _ = _encoders(6)
    _, text = _encoders(8)
    with pytest.raises(ValueError, match="image encoder gives 6, the text encoder 8"):
        Combiner(image, text)
    with pytest.raises(ValueError, match="unknown Combiner fusion 'max'"):
        Combiner(*_encoders(2), fusion="max")


def test_the_registry_builds_it_on_the_garments_towers():
    """Frozen EfficientNet-Lite0 with flatten pooling and the LSTM, as configs/garments/combiner.yaml."""
    config = load_config("configs/garments/combiner.yaml", ["model.embed_dim=16", "model.map_size=[2,2]"])
    model = create_model(config.model, Vocabulary.build(TEXTS)).eval()
    assert isinstance(model, Combiner) and model.output_layer.out_features == 16
    queries = model.encode_queries(torch.randn(2, 3, 32, 32), TEXTS)
    assert queries.shape == (2, 16)
    assert torch.allclose(queries.norm(dim=1), torch.ones(2))
