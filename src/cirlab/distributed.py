"""Several processes, one run: DDP under torchrun, for training and for building an index.

`torchrun --nproc_per_node N -m cirlab ...` starts N copies of a command with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; `process_group` joins them (NCCL on CUDA, gloo on the
CPU; process k uses GPU LOCAL_RANK) and yields a `DistContext`. Without those variables it yields a
one-process context whose helpers are identities, so one code path serves both. Under torchrun the group
is joined even for one process: `--nproc_per_node 1` then runs DDP and the collectives of a larger run,
which is how a machine with one GPU checks the NCCL path.

Why N processes of batch B train exactly like one process of batch N*B:
- every rank draws the same *global* batch of N*B queries (same sampler, same seed) and keeps its own
  contiguous slice (`DistContext.shard`), so the slices' union is the one-process batch;
- every rank gathers all ranks' query and target features with their gradients (`gather_with_grad`)
  and computes the loss of the whole global batch, so in-batch negatives and sampled triplets are the
  one-process ones and the loss value is the same on every rank;
- the gather's backward sums each slice's gradient over the ranks (N identical losses give N x dL/dslice)
  and DDP averages parameter gradients over the ranks (1/N), which leaves exactly dL/dparameters.
BatchNorm layers still see only their rank's slice unless `sync_batchnorm` converts them (CUDA only).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cirlab.devices import resolve_device

T = TypeVar("T")
_SEPARATOR = "\0"  # cannot occur in a file path, so it joins image ids unambiguously


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' equal-shaped tensors concatenated in rank order; the gradient of this rank's slice is
    the sum over ranks of the gradients that reached it (every rank's loss depends on every slice)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)  # never reduce into autograd's own buffer
        dist.all_reduce(total)
        rows = total.shape[0] // dist.get_world_size()
        return total[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in its group: rank, number of processes, the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    joined: bool = False  # in a process group started by torchrun, possibly of one process

    @property
    def distributed(self) -> bool:
        """Whether work goes through DDP and collectives: several processes, or a one-process group."""
        return self.joined or self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, evaluates and writes checkpoints and indexes."""
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's contiguous part of `count` work items (sizes differ by at most one, may be empty)."""
        return range(count * self.rank // self.world_size, count * (self.rank + 1) // self.world_size)

    def shard(self, batch: Sequence[T]) -> list[T]:
        """This rank's slice of a global batch; equal slices, so features can be gathered across ranks."""
        if len(batch) % self.world_size:
            raise ValueError(f"a global batch of {len(batch)} does not split evenly over {self.world_size} "
                             "processes")
        return [batch[i] for i in self.share(len(batch))]

    def wrap(self, module: nn.Module, sync_batchnorm: bool = False) -> nn.Module:
        """`module` under DDP when there are several processes (itself otherwise).

        `static_graph`: every step uses the same parameters, so DDP learns once which ones a model
        leaves unused (the text tower of image_only, say) instead of searching the graph every step;
        their gradients stay None, as in one process.
        """
        if not self.distributed:
            return module
        if sync_batchnorm:
            if self.device.type != "cuda":
                raise ValueError("train.sync_batchnorm needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU")
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, static_graph=True)

    def gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `tensor` (equal shapes) in rank order, differentiable (see the module doc)."""
        return _GatherWithGrad.apply(tensor) if self.distributed else tensor

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's equal-shaped `tensor`, on the CPU (collectives run on this rank's device: NCCL needs CUDA)."""
        local = tensor.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return [part.cpu() for part in parts]

    def gather_states(self, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's `states` (e.g. RNG states), keyed by `rank_key`: what an exact resume needs."""
        if not self.distributed:
            return dict(states)
        return {rank_key(name, rank): part for name, tensor in states.items()
                for rank, part in enumerate(self._all_gather(tensor))}

    def key(self, name: str) -> str:
        """This rank's key for `name` in what `gather_states` returned."""
        return rank_key(name, self.rank)

    def gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's rows (any number, zero included) stacked in rank order, on every rank.

        An empty part may be given as shape (0, 0): ranks left without work cannot know the width."""
        if not self.distributed:
            return rows
        local = torch.from_numpy(np.ascontiguousarray(rows))
        shapes = [tuple(shape.tolist()) for shape in self._all_gather(torch.tensor(local.shape, dtype=torch.int64))]
        height, width = max(shape[0] for shape in shapes), max(shape[1] for shape in shapes)
        padded = torch.zeros(height, width, dtype=local.dtype)  # all_gather moves equal shapes only
        padded[:local.shape[0], :local.shape[1]] = local
        parts = self._all_gather(padded)
        return torch.cat([part[:shape[0]] for part, shape in zip(parts, shapes, strict=True)]).numpy()

    def broadcast_strings(self, strings: list[str]) -> list[str]:
        """Rank 0's `strings` (e.g. image ids) on every rank; what other ranks pass is ignored."""
        if not self.distributed:
            return strings
        payload = _SEPARATOR.join(strings).encode() if self.is_main else b""
        header = torch.tensor([len(strings), len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        count, size = header.tolist()
        if not count:
            return []
        data = torch.empty(size, dtype=torch.uint8, device=self.device)
        if self.is_main:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(data, src=0)
        return bytes(data.cpu().numpy()).decode().split(_SEPARATOR)

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (a decision only rank 0 can make, such as early stopping)."""
        if not self.distributed:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def rank_key(name: str, rank: int) -> str:
    """Rank 0 keeps the plain name, so one-process checkpoints read the same way."""
    return name if rank == 0 else f"{name}.rank{rank}"


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: launch with torchrun")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


@contextmanager
def process_group(device: str = "auto") -> Iterator[DistContext]:
    """Join the process group torchrun describes in the environment, and leave it afterwards.

    Without torchrun (no WORLD_SIZE) this is one process on `device` and nothing is set up.
    """
    resolved = resolve_device(device)
    if "WORLD_SIZE" not in os.environ:
        yield DistContext(device=resolved)
        return
    world_size = _env_int("WORLD_SIZE")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
        backend = "nccl"
    elif resolved.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed runs need a CUDA or CPU device, got {resolved}")
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        context = DistContext(rank, world_size, resolved, joined=True)
        yield context
        context.barrier()  # no process leaves while rank 0 still writes what the others wait for
    finally:
        dist.destroy_process_group()
