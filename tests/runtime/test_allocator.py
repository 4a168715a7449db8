"""keep_freed_memory: freed tensor memory is reused, not faulted in again from the kernel."""

import subprocess
import sys

import pytest

from runtime.allocator import keep_freed_memory

# A worker thread allocates and frees tensors of 4 to 28 MB, some living a while, and every
# third one of 48 MB (beyond the size glibc always maps afresh), as the encoder and decoding
# do; prints the page faults of the second of two rounds.
WORKLOAD = """
import resource, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from runtime.allocator import keep_freed_memory
assert sys.argv[1] == "default" or keep_freed_memory()
torch.set_num_threads(1)

def work():
    kept = []
    for i in range(60):
        x = torch.ones((12 if i % 3 == 0 else i % 7 + 1) * 1024 * 1024)
        if i % 5 == 0:
            kept.append(x)
        if len(kept) > 3:
            kept.pop(0)

def faults(pool):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for done in [pool.submit(work) for _ in range(4)]:
        done.result()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with ThreadPoolExecutor(1) as pool:
    faults(pool)
    print(faults(pool))
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc's malloc")


def page_faults(setting: str) -> int:
    run = subprocess.run([sys.executable, "-c", WORKLOAD, setting], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


@glibc
def test_it_applies_on_glibc_and_can_be_applied_again():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True


@glibc
@pytest.mark.slow  # about 15 s
def test_freed_tensor_memory_is_reused_instead_of_faulting_in_again():
    default, kept = page_faults("default"), page_faults("kept")
    assert default > 20_000  # 4 KiB pages: the workload really does fault with glibc's defaults
    assert kept < default / 10
