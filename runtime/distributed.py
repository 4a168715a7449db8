"""Ranks under torchrun: which process this is, its device, and the process group the ranks share.

torchrun starts one process per device and tells each its place in the environment (RANK,
WORLD_SIZE, LOCAL_RANK); a process started any other way is rank 0 of 1 and joins no group.
Every collective here moves CPU tensors, so it runs on gloo, beside nccl on GPUs.
"""

import os
from dataclasses import dataclass

import torch

from runtime.devices import resolve_device


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process, else None."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks. Its collectives do nothing for one process, so code
    that runs alone and under torchrun is the same code."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the rank among this machine's processes: its GPU

    @classmethod
    def from_environment(cls) -> "Distributed":
        """What torchrun set; rank 0 of 1 without it."""
        ranks = torchrun_rank()
        if ranks is None:
            return cls()
        return cls(*ranks, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, validates and writes."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank: ranks that decide alike stop alike. The tensor is a CPU
        one, which is why a CUDA group has gloo for CPU tensors beside nccl (see init_distributed)."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([flag], dtype=torch.int32)
        torch.distributed.broadcast(tensor, 0)
        return bool(tensor.item())

    def highest(self, value: int) -> int:
        """The highest of every rank's `value`: what one rank raises (a signal it caught) reaches all."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(tensor, torch.distributed.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, obj) -> list | None:
        """Every rank's `obj` (anything picklable), in rank order, on rank 0; None on the others."""
        if self.world_size == 1:
            return [obj]
        objects = [None] * self.world_size if self.main else None
        torch.distributed.gather_object(obj, objects, dst=0)
        return objects

    def share(self, obj):
        """Rank 0's `obj` (anything picklable), on every rank: what one rank found out, told to all."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, 0)  # pickled into a CPU tensor: gloo's
        return box[0]

    def close(self) -> None:
        """Leave the process group, if this process joined one."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def process_group_backend(device: torch.device) -> str:
    """gloo for CPU tensors always; nccl for CUDA tensors, beside gloo, on GPUs."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """This process's rank and device, joined to the ranks' process group under torchrun.

    A bare `cuda` is the local rank's own GPU. A device the machine lacks raises ValueError
    (from `resolve_device`), saying what is missing, before any group is joined.
    """
    dist = Distributed.from_environment()
    device = resolve_device(device_name, dist.local_rank)
    if dist.world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(process_group_backend(device))
    return dist, device
