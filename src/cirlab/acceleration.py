"""Speed switches for accelerators: mixed precision, channels-last, torch.compile (pinned host-to-device copies
are `cirlab.devices.to_device`).

Mixed precision and channels-last apply on CUDA only (on the CPU they would slow training down or
change its numbers for nothing); `train.compile` applies wherever it is set.
"""

from __future__ import annotations

import torch

from cirlab.config import TrainConfig
from cirlab.models.base import CIRModel

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run (None: float32 throughout): `train.amp_dtype` with `train.amp` on CUDA."""
    if train.amp_dtype not in AMP_DTYPES:
        raise ValueError(f"train.amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {train.amp_dtype!r}")
    return AMP_DTYPES[train.amp_dtype] if train.amp and device.type == "cuda" else None


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler for float16, whose narrow exponent range underflows small gradients; for any other
    dtype a disabled scaler, whose scale/step/update are plain backward and optimizer steps."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def prepare_model(model: CIRModel, train: TrainConfig, device: torch.device) -> None:
    """In place: channels-last weights on CUDA (`train.channels_last`) and a compiled image encoder
    (`train.compile`; `Module.compile` keeps the state-dict keys, so checkpoints do not change)."""
    if train.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if train.compile:
        model.image_encoder.compile()


def to_channels_last(batch: torch.Tensor) -> torch.Tensor:
    """A 4-D CUDA batch in NHWC layout, which cuDNN convolutions with tensor cores run fastest on."""
    if batch.dim() == 4 and batch.device.type == "cuda":
        return batch.contiguous(memory_format=torch.channels_last)
    return batch
