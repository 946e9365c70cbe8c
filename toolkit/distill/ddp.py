"""torchrun / DistributedDataParallel glue: one process group from the environment, rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# --- distributed ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> float:
        if self.world > 1:
            value = value.detach().clone()
            torch.distributed.all_reduce(value)
            value /= self.world
        return float(value.detach())


def init_distributed(device: str | None) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", local_rank) if cuda else torch.device("cpu"))
    if world <= 1:
        return DistContext(0, 1, dev, False)
    import torch.distributed as dist

    if cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns)
