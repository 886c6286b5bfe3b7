"""The trainer's extension points: the optimizer choice and a model's own loss."""

import pytest
import torch

from cirlab.acceleration import grad_scaler
from cirlab.config import load_config
from cirlab.distributed import DistContext
from cirlab.encoders.text import Vocabulary
from cirlab.models.registry import create_model
from cirlab.train import TrainingForward, build_optimizer, train_step

TEXTS = ["make it red", "add a cube", "remove the sphere"]
TINY = ["model.image_backbone=resnet18", "model.image_weights=null", "model.embed_dim=8", "model.backbone_upto=layer1"]


def _tiny_tirg(*settings: str):
    config = load_config(None, [*TINY, *settings])
    torch.manual_seed(0)
    return config, create_model(config.model, Vocabulary.build(TEXTS))


def test_adamw_takes_the_configured_groups_and_decay():
    config, model = _tiny_tirg("train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.05",
                               "train.backbone_lr_mult=0.1")
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.001, 0.0001])
    assert all(group["weight_decay"] == 0.05 for group in optimizer.param_groups)


def test_an_unknown_optimizer_is_named():
    config, model = _tiny_tirg("train.optimizer=lbfgs")
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        build_optimizer(model, config)


def test_a_step_minimises_the_models_own_training_loss():
    """A model that overrides `training_loss` is trained on it, not on the configured retrieval loss."""
    config, model = _tiny_tirg("train.lr=0.1", "train.momentum=0")
    seen = []

    def own_loss(queries, candidates, retrieval_loss):
        seen.append(retrieval_loss)
        return model.normalization.scale ** 2  # d/d scale = 2 * scale

    model.training_loss = own_loss
    optimizer = build_optimizer(model, config)
    images = torch.randn(3, 3, 16, 16)
    before = model.normalization.scale.item()
    loss = train_step(TrainingForward(model.eval()), optimizer, grad_scaler(None, torch.device("cpu")),
                      (images, TEXTS, images.flip(0)), lambda q, c: model.training_loss(q, c, retrieval_loss="given"),
                      DistContext(device=torch.device("cpu")))
    assert loss.item() == pytest.approx(before ** 2)
    assert seen == ["given"]
    # plain SGD, weight decay 1e-6: scale <- scale - lr * (2 scale + 1e-6 scale)
    assert model.normalization.scale.item() == pytest.approx(before - 0.1 * (2 + 1e-6) * before, rel=1e-6)
