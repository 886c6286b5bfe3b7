"""The attention term of MMGrad training: L = L_ret + weight * L_att(MMGrad map, edit mask).

The map is differentiated with `create_graph=True` (double backpropagation), so the loss reaches
the layers above the explained feature map through the Grad-CAM weights, as AMC trains its
Grad-CAM maps; the detached variant treats those weights as constants and reaches the model only
through the feature map itself. The batch is explained in train mode: BatchNorm then couples its
items, which training tolerates (evaluation maps are taken in eval mode). Those extra forward passes
leave BatchNorm's running statistics as they were: F(I_g, t) composes a *target* image with the text, an
input the model never sees at evaluation, and letting two thirds of the running-statistics updates come
from the map passes would shift the statistics evaluation normalises with. The term reaches the model
only through its gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cirlab.config import MMGradConfig
from cirlab.explain.gradcam import MMGRAD_SCALARS, SIDES, mmgrad, upsample_map
from cirlab.losses import ATTENTION_LOSSES, attention_loss
from cirlab.models.base import CIRModel


def check_mmgrad_config(config: MMGradConfig, frozen_backbone: bool) -> None:
    """Refuse settings that cannot train, before any work is done."""
    for name, value, known in (("loss", config.loss, ATTENTION_LOSSES), ("scalar", config.scalar, MMGRAD_SCALARS),
                               ("side", config.side, SIDES)):
        if value not in known:
            raise ValueError(f"unknown train.mmgrad.{name} {value!r} (known: {', '.join(known)})")
    if config.weight < 0:
        raise ValueError(f"train.mmgrad.weight must be >= 0, got {config.weight}")
    if config.start_step < 0:
        raise ValueError(f"train.mmgrad.start_step must be >= 0, got {config.start_step}")
    if config.detached and frozen_backbone:
        raise ValueError("train.mmgrad.detached needs a trainable backbone: with a frozen one the detached "
                         "attention loss has no path to any trained weight (use the default double backprop)")


@contextmanager
def batchnorm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave every BatchNorm's running mean, variance and count unchanged (they
    still normalise with their batch's statistics in train mode). The passes update copies, swapped in
    and out: writing the saved values back in place would break the graphs that hold the buffers."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    originals = [[getattr(m, name) for name in names] for m in norms]
    for module, buffers in zip(norms, originals, strict=True):
        for name, buffer in zip(names, buffers, strict=True):
            setattr(module, name, buffer.clone())
    try:
        yield
    finally:
        for module, buffers in zip(norms, originals, strict=True):
            for name, buffer in zip(names, buffers, strict=True):
                setattr(module, name, buffer)


def double_backward_attention(needed: bool) -> AbstractContextManager:
    """Attention inside runs on PyTorch's math kernel when `needed`: the fused CUDA kernels (flash,
    memory-efficient) have no double backward, the math kernel is made of ops that do."""
    return sdpa_kernel(SDPBackend.MATH) if needed else nullcontext()


def mmgrad_attention_loss(model: CIRModel, references: torch.Tensor, texts: list[str], targets: torch.Tensor,
                          masks: torch.Tensor, config: MMGradConfig) -> torch.Tensor:
    """L_att of one batch: the MMGrad maps of `config.side`, upsampled to the masks' size (B x H x W,
    bool) and min-max normalised, against the masks."""
    with batchnorm_statistics_kept(model), double_backward_attention(not config.detached):
        cams = mmgrad(model, references, texts, targets, scalar=config.scalar, side=config.side,
                      create_graph=not config.detached)
    return attention_loss(upsample_map(cams, tuple(masks.shape[-2:])), masks, config.loss)
