"""Speed switches: mixed precision, channels-last, torch.compile (pinned host-to-device copies are
`cirlab.devices.to_device`).

On CUDA, `train.amp` autocasts to `train.amp_dtype` and `train.channels_last` puts weights and batches in NHWC.
On the CPU, `train.cpu_amp` autocasts to bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or
AMX-BF16, read at run time): there the bfloat16 matrix rate is a multiple of the float32 one, while elsewhere
bfloat16 is emulated and slower, so other CPUs stay in float32. Channels-last stays a CUDA switch: on the CPU it
gave no steady gain in float32 and slowed bfloat16 down. `train.compile` applies wherever it is set.
"""

from __future__ import annotations

import torch

from cirlab.config import TrainConfig
from cirlab.models.base import CIRModel

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (`torch.cpu.get_capabilities`, read from cpuinfo)."""
    capabilities = torch.cpu.get_capabilities()
    return any(capabilities.get(flag) for flag in NATIVE_BF16_FLAGS)


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run (None: float32 throughout): `train.amp_dtype` with `train.amp` on CUDA,
    bfloat16 with `train.cpu_amp` on a CPU with native bfloat16."""
    if train.amp_dtype not in AMP_DTYPES:
        raise ValueError(f"train.amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {train.amp_dtype!r}")
    if device.type == "cuda":
        return AMP_DTYPES[train.amp_dtype] if train.amp else None
    return torch.bfloat16 if device.type == "cpu" and train.cpu_amp and cpu_has_native_bfloat16() else None


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler for float16, whose narrow exponent range underflows small gradients; for any other
    dtype a disabled scaler, whose scale/step/update are plain backward and optimizer steps."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def uses_channels_last(train: TrainConfig, device: torch.device) -> bool:
    """NHWC for this run: `train.channels_last` on CUDA."""
    return train.channels_last and device.type == "cuda"


def prepare_model(model: CIRModel, train: TrainConfig, device: torch.device) -> None:
    """In place: channels-last weights (`uses_channels_last`) and a compiled image encoder (`train.compile`;
    `Module.compile` keeps the state-dict keys, so checkpoints do not change)."""
    if uses_channels_last(train, device):
        model.to(memory_format=torch.channels_last)
    if train.compile:
        model.image_encoder.compile()


def to_channels_last(batch: torch.Tensor) -> torch.Tensor:
    """A 4-D CUDA batch in NHWC layout, which cuDNN convolutions with tensor cores run fastest on."""
    if batch.dim() == 4 and batch.device.type == "cuda":
        return batch.contiguous(memory_format=torch.channels_last)
    return batch
