"""Ranks: torchrun's environment read the same way by every command, one process alone is rank 0 of 1,
and two real processes agree through the process group."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from runtime.distributed import Distributed, init_distributed, process_group_backend, torchrun_rank, torchrun_restarts

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def alone(monkeypatch):
    """A process that torchrun did not start."""
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_a_process_alone_is_rank_0_of_1(alone):
    assert torchrun_rank() is None
    dist = Distributed.from_environment()
    assert (dist.rank, dist.world_size, dist.local_rank, dist.is_main) == (0, 1, 0, True)
    dist.barrier()  # nothing to wait for
    assert dist.broadcast_flag(True) is True and dist.broadcast_flag(False) is False
    assert (dist.all_reduce_max(15), dist.gather("mine"), dist.broadcast_object("mine")) == (15, ["mine"], "mine")
    dist.close()


def test_torchrun_restarts_come_from_its_environment(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert torchrun_restarts() == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert torchrun_restarts() == 2


def test_init_alone_joins_no_group_and_gives_the_device(alone):
    dist, device = init_distributed("cpu")
    assert dist == Distributed() and device == torch.device("cpu")
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_a_gpu_this_machine_lacks_is_refused_before_any_group_is_joined(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="device cuda: no CUDA GPU is available here"):
        init_distributed("cuda")
    assert not torch.distributed.is_initialized()


def test_torchrun_ranks_come_from_its_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_rank() == (3, 4)
    assert Distributed.from_environment() == Distributed(rank=3, world_size=4, local_rank=1)
    assert not Distributed.from_environment().is_main


def test_a_world_of_one_is_a_process_alone(monkeypatch):
    """torchrun --nproc_per_node 1 sets the variables too: no group to join for one process."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_rank() is None
    assert Distributed.from_environment() == Distributed()


def test_a_gpu_group_also_carries_cpu_tensors():
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"


RANK_SCRIPT = """
from runtime.distributed import init_distributed
dist, device = init_distributed("cpu")
dist.barrier()
flags = dist.broadcast_flag(dist.rank == 0), dist.broadcast_flag(dist.rank == 1)
print(dist.rank, dist.world_size, dist.local_rank, *flags)
dist.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, env: dict[str, str] | None = None) -> list[str]:
    """`script` run by two real processes, started as torchrun would (env:// rendezvous): their stdouts."""
    common = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    return [out for out, _ in outputs]


@pytest.mark.slow
def test_two_ranks_agree_on_rank_0s_flag():
    """On gloo, with the CPU tensors the end-of-epoch agreement uses."""
    assert [out.split() for out in run_ranks(RANK_SCRIPT)] == [
        ["0", "2", "0", "True", "False"],
        ["1", "2", "1", "True", "False"],
    ]


COLLECTIVES_SCRIPT = """
from runtime.distributed import init_distributed
dist, device = init_distributed("cpu")
caught = dist.all_reduce_max(15 if dist.rank == 1 else 0)  # a signal one rank caught
print(repr((caught, dist.gather({"rank": dist.rank}), dist.broadcast_object(f"found by rank {dist.rank}"))))
dist.close()
"""


@pytest.mark.slow
def test_what_one_rank_raises_reaches_all_and_rank_0_gathers_and_shares():
    assert run_ranks(COLLECTIVES_SCRIPT) == [
        repr((15, [{"rank": 0}, {"rank": 1}], "found by rank 0")) + "\n",
        repr((15, None, "found by rank 0")) + "\n",
    ]


@pytest.mark.slow
def test_a_group_formed_again_on_the_same_store_does_not_meet_the_dead_one():
    """A restart under torchrun --max-restarts: its agent's store outlives the workers, so the second
    group finds there what the first one left (pytorch/pytorch#135712), and must not connect to it."""
    port = free_port()
    agent_store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True)  # torchrun's
    for restart in ("0", "1", "2"):
        env = {"MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": restart}
        assert [out.split() for out in run_ranks(RANK_SCRIPT, env)] == [
            ["0", "2", "0", "True", "False"],
            ["1", "2", "1", "True", "False"],
        ]
    del agent_store
