"""Device selection and host-to-device copies, shared by training, evaluation and search."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when present, else the CPU; any other name is used as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`batch` on `device`; a CPU batch bound for CUDA goes through page-locked memory, so the copy
    runs asynchronously and the GPU does not wait on pageable memory."""
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
