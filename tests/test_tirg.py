import math

import pytest
import torch
from torch import nn

from cirlab.models.baselines import Concat
from cirlab.models.tirg import TIRG


def _set_linear(layer: nn.Linear, weight: list[list[float]]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.zero_()


def test_tirg_compose_on_hand_set_weights():
    model = TIRG(nn.Identity(), nn.Identity(), embed_dim=2).eval()
    _set_linear(model.gate[2], [[1, 0, 0, 0], [0, 0, 0, 1]])
    _set_linear(model.residual[2], torch.eye(4).tolist())
    _set_linear(model.residual[4], [[0, 0, 1, 0], [0, 1, 0, 0]])
    x = torch.tensor([[1.0, -2.0]])
    t = torch.tensor([[0.5, 3.0]])
    out = model.compose(x, t)
    c = math.sqrt(1 + 1e-5)  # eval-mode BN with mean 0, var 1
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # joint = [1, -2, .5, 3] -> BN -> ReLU = [1, 0, .5, 3] / c ; gate = [1, 3] / c ; residual = [.5, 0] / c
    expected = [1.0 * sigmoid(1 / c) * 1.0 + 10.0 * 0.5 / c, sigmoid(3 / c) * -2.0 + 0.0]
    assert out[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert model.a.tolist() == [1.0, 10.0, 1.0, 1.0]


def test_tirg_paper_gate_has_two_layers():
    code = TIRG(nn.Identity(), nn.Identity(), embed_dim=4)
    paper = TIRG(nn.Identity(), nn.Identity(), embed_dim=4, gate_layers=2)
    assert sum(isinstance(m, nn.Linear) for m in code.gate) == 1
    assert sum(isinstance(m, nn.Linear) for m in paper.gate) == 2
    with pytest.raises(ValueError, match="gate_layers"):
        TIRG(nn.Identity(), nn.Identity(), embed_dim=4, gate_layers=3)


def test_concat_shapes_and_uses_both_inputs():
    model = Concat(nn.Identity(), nn.Identity(), embed_dim=3).eval()
    x, t = torch.randn(5, 3), torch.randn(5, 3)
    out = model.compose(x, t)
    assert out.shape == (5, 3)
    assert not torch.allclose(out, model.compose(x, t + 1))
    assert not torch.allclose(out, model.compose(x + 1, t))


def test_tirg_lastconv_composes_on_the_map_and_pools_with_the_encoder():
    from cirlab.encoders.image import Backbone, ImageEncoder
    from cirlab.models.tirg import TIRGLastConv

    class FixedText(nn.Module):
        def forward(self, texts):
            return torch.ones(len(texts), 4)

    encoder = ImageEncoder(Backbone(nn.Identity(), out_channels=6), out_dim=4, pooling="gap").eval()
    model = TIRGLastConv(encoder, FixedText(), embed_dim=4).eval()
    with torch.no_grad():  # gate logits 0 -> sigmoid 1/2; residual 0: the composed map is half the input map
        for branch in (model.gate, model.residual):
            branch[3].weight.zero_()
            branch[3].bias.zero_()
    feature_map = torch.randn(2, 6, 3, 3)
    out = model.encode_queries(feature_map, ["a", "b"])
    assert out.shape == (2, 4)
    assert torch.allclose(out, encoder.pool(0.5 * feature_map), atol=1e-6)
    assert torch.allclose(model.encode_targets(feature_map), encoder(feature_map))
