"""The CUDA speed switches: mixed precision (bf16, and fp16 with loss scaling), channels-last and
torch.compile must change how a step runs, not what it computes. Skipped without a GPU (CI has none);
on a GPU machine: `pytest tests/test_acceleration.py`.

Comparisons run with TF32 off: cuDNN convolutions use TF32 by default on Ampere and later GPUs, whose
10-bit mantissa would differ between two memory layouts by more than the layouts themselves do.
"""

from collections.abc import Iterator
from functools import partial

import pytest
import torch
from torch import nn

from cirlab.acceleration import grad_scaler, prepare_model
from cirlab.config import load_config
from cirlab.distributed import DistContext
from cirlab.encoders.text import Vocabulary
from cirlab.models.base import CIRModel
from cirlab.models.registry import create_model
from cirlab.train import TrainingForward, build_optimizer, compute_loss, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
TIRG = ["model.name=tirg", "model.image_backbone=resnet18", "model.image_weights=null", "model.backbone_upto=layer2",
        "model.embed_dim=32", "train.lr=0.1"]
TEXTS = ["make it red", "add a cube", "remove the small sphere", "move it left"]


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _tirg(*overrides: str) -> tuple[CIRModel, object]:
    """A tiny TIRG in train mode, as steps run (cuDNN's LSTM has no backward in eval mode), with its dropout
    off so that two forwards of one batch see the same network."""
    torch.manual_seed(0)
    config = load_config(None, [*TIRG, *overrides])
    model = create_model(config.model, Vocabulary.build(TEXTS)).train().to(CUDA)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model, config


def _batch() -> tuple[torch.Tensor, list[str], torch.Tensor]:
    data = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=data).to(CUDA)
    return images, [TEXTS[i % 4] for i in range(8)], images.roll(1, dims=0)


def test_bfloat16_autocast_runs_the_layers_in_bfloat16_and_keeps_float32_weights_and_features():
    model, config = _tirg()
    images, texts, targets = _batch()
    dtypes: list[torch.dtype] = []
    linear = next(module for module in model.modules() if isinstance(module, nn.Linear))
    linear.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))

    queries, candidates = TrainingForward(model, amp_dtype=torch.bfloat16)(images, texts, targets)
    assert dtypes[-1] is torch.bfloat16 and queries.dtype is candidates.dtype is torch.float32
    exact_queries, exact_candidates = TrainingForward(model)(images, texts, targets)
    assert dtypes[-1] is torch.float32
    # bf16 keeps 8 mantissa bits: features agree to about 1%, not to float32 precision.
    torch.testing.assert_close(queries, exact_queries, atol=0.05, rtol=0.05)
    torch.testing.assert_close(candidates, exact_candidates, atol=0.05, rtol=0.05)
    assert not torch.allclose(queries, exact_queries, atol=1e-6, rtol=0)  # autocast did change the arithmetic

    optimizer = build_optimizer(model, config)
    loss_fn = partial(compute_loss, "batch_classification", generator=torch.Generator())
    train_step(TrainingForward(model, amp_dtype=torch.bfloat16), optimizer, grad_scaler(torch.bfloat16, CUDA),
               (images, texts, targets), loss_fn, DistContext(device=CUDA))
    assert all(parameter.dtype is torch.float32 for parameter in model.parameters())


def test_float16_training_scales_the_loss_and_updates_finite_weights():
    model, config = _tirg()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    scaler = grad_scaler(torch.float16, CUDA)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16
    forward = TrainingForward(model, amp_dtype=torch.float16)
    optimizer = build_optimizer(model, config)
    loss_fn = partial(compute_loss, "batch_classification", generator=torch.Generator())
    for _ in range(3):
        loss = train_step(forward, optimizer, scaler, _batch(), loss_fn, DistContext(device=CUDA))
        assert torch.isfinite(loss)
    after = model.state_dict()
    assert all(torch.isfinite(value).all() for value in after.values())
    moved = max((after[name] - before[name]).abs().max().item() for name in before if before[name].is_floating_point())
    assert moved > 1e-3  # at least one of the three steps was applied, not skipped for overflow


def test_channels_last_changes_the_layout_not_the_features():
    reference, _ = _tirg()
    model, config = _tirg("train.channels_last=true")
    prepare_model(model, config.train, CUDA)
    convolutions = [module.weight for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert convolutions and all(weight.is_contiguous(memory_format=torch.channels_last) for weight in convolutions)
    images, texts, targets = _batch()
    queries, candidates = TrainingForward(model, channels_last=True)(images, texts, targets)
    exact_queries, exact_candidates = TrainingForward(reference)(images, texts, targets)
    torch.testing.assert_close(queries, exact_queries, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(candidates, exact_candidates, atol=1e-5, rtol=1e-5)


def test_compiled_image_encoder_keeps_its_checkpoint_keys_and_features():
    reference, _ = _tirg()
    model, config = _tirg("train.compile=true", "train.channels_last=false")
    prepare_model(model, config.train, CUDA)
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints load either way
    images, _, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_targets(images), reference.encode_targets(images), atol=1e-4, rtol=1e-4)
