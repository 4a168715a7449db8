"""Ranks under torchrun: which process this is, its device, and the process group the ranks share.

torchrun starts one process per device and tells each its place in the environment (RANK,
WORLD_SIZE, LOCAL_RANK); a process started any other way is rank 0 of 1 and joins no group.
Every collective here moves CPU tensors, so it runs on gloo, beside nccl on GPUs.
"""

import os
import time
import uuid
from dataclasses import dataclass

import torch

from runtime.devices import resolve_device


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process, else None."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def torchrun_restarts() -> int:
    """How many times torchrun has restarted this group of workers after a failure (--max-restarts):
    0 on the first start, and without torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def torchrun_run_id() -> str | None:
    """The torchrun job this process belongs to (--rdzv_id; a fresh one with --standalone), or None."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


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
    def is_main(self) -> bool:
        """Whether this is the main process, rank 0: the one that logs, validates and writes."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Broadcast rank 0's `flag` to every rank (torch.distributed.broadcast), so ranks decide alike."""
        if self.world_size == 1:
            return flag
        # A CPU tensor: why a CUDA group has gloo for CPU tensors beside nccl (see init_distributed).
        tensor = torch.tensor([flag], dtype=torch.int32)
        torch.distributed.broadcast(tensor, 0)
        return bool(tensor.item())

    def all_reduce_max(self, value: int) -> int:
        """All-reduce `value` with ReduceOp.MAX: every rank gets the highest (e.g. a signal one caught)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(tensor, torch.distributed.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, obj) -> list | None:
        """Every rank's `obj` (anything picklable), in rank order, on rank 0; None on the others."""
        if self.world_size == 1:
            return [obj]
        objects = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, objects, dst=0)
        return objects

    def broadcast_object(self, obj):
        """Broadcast rank 0's `obj` (anything picklable) to every rank (torch's broadcast_object_list)."""
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
        store, rank, world_size = next(torch.distributed.rendezvous("env://"))  # torchrun's store
        torch.distributed.init_process_group(
            process_group_backend(device), store=fresh_store(store, rank, world_size), rank=rank, world_size=world_size
        )
    return dist, device


def fresh_store(
    store: torch.distributed.Store, rank: int, world_size: int, timeout_s: float = 600.0
) -> torch.distributed.PrefixStore:
    """`store` under a prefix that is this group of processes' alone.

    torchrun's agent keeps one store for the whole job, so a group it restarts after a failure
    (--max-restarts) would find there the addresses the dead group left, and connect to them
    (pytorch/pytorch#135712). Here rank 0 names the group by a new token, and every other rank
    takes a token only once rank 0 has answered a nonce of its own: no rank can take a dead group's.
    """
    deadline = time.monotonic() + timeout_s

    def wait(what: str) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: no {what} within {timeout_s:.0f} s while forming the process group")
        time.sleep(0.01)

    if rank == 0:
        token = uuid.uuid4().hex
        store.set("group/leader", token)
        waiting = set(range(1, world_size))
        while waiting:
            for r in sorted(waiting):
                if store.check([f"group/follower/{r}"]):
                    led, nonce = store.get(f"group/follower/{r}").decode().split()
                    if led == token:  # a follower of this group, not a dead one's
                        store.set(f"group/answer/{nonce}", token)
                        waiting.discard(r)
            if waiting:
                wait(f"word from ranks {sorted(waiting)}")
    else:
        nonce = uuid.uuid4().hex
        while True:
            leader = store.get("group/leader").decode()  # waits for the first; may be a dead group's
            store.set(f"group/follower/{rank}", f"{leader} {nonce}")
            retry = time.monotonic() + 1.0
            while not store.check([f"group/answer/{nonce}"]) and time.monotonic() < retry:
                wait("answer from rank 0")
            if store.check([f"group/answer/{nonce}"]):
                token = store.get(f"group/answer/{nonce}").decode()
                break
    return torch.distributed.PrefixStore(f"group/{token}/", store)
