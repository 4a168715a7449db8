"""glibc's malloc, told to keep freed memory for the next tensor instead of returning it.

By default glibc gives each thread its own arena, serves large blocks from
fresh pages, and hands freed memory back to the kernel. Tensor code frees and
reallocates blocks of megabytes many times a second (every decoding step,
every encoder layer), so their pages would fault in again and again, and the
kernel's handling of those faults would take a large share of the CPU time
(docs/performance.md, "What makes `captioner caption` fast"). One arena that
serves every block from its heap and keeps what it frees trades a resident
size near the peak for that time: the folder command, training and evaluation
take the trade; the server does not, so that it gives memory back.
"""

import ctypes
import sys

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for tensor work; False where the C library is not glibc (nothing changes).

    Call it before starting threads: arenas that exist already stay.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # no block gets pages of its own (however large), and the heap never shrinks
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
