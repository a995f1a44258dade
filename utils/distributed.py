"""torch.distributed set-up from the environment that torchrun (or torch.distributed.launch) provides."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process runs: rank, world size and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None, local_rank: int | None = None) -> Context:
    """Read RANK / WORLD_SIZE / LOCAL_RANK, pick the device, and join the process group (nccl on CUDA, gloo on CPU).

    ``local_rank`` is the legacy ``--local_rank`` argument of torch.distributed.launch, used when the
    environment has no LOCAL_RANK. ``device`` 'cpu' or 'cuda'; None picks CUDA when available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine (use --device cpu)")
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    elif kind == "cpu":
        where = torch.device("cpu")
    else:
        raise ValueError(f"unknown device {kind!r}: expected 'cpu' or 'cuda'")
    # a launcher (torchrun, torch.distributed.launch) sets MASTER_ADDR: join its group even with one process,
    # so that a one-GPU torchrun run goes through nccl as a many-GPU one does
    launched = world_size > 1 or "MASTER_ADDR" in os.environ
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Context(rank, world_size, local_rank, where)


def barrier(context: Context) -> None:
    """Wait for every rank (no-op in a single process)."""
    if context.distributed:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.local_rank])
        else:
            dist.barrier()


def all_reduce_mean(value: torch.Tensor, context: Context) -> torch.Tensor:
    """Mean of a tensor over ranks (the tensor itself in a single process)."""
    if not context.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / context.world_size


def broadcast_object(obj, context: Context):
    """rank 0's ``obj`` on every rank."""
    if not context.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def teardown() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()
