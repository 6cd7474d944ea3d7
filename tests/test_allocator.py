"""`ternqc.allocator`: with glibc's settings fixed, freed memory is reused instead of faulted in afresh.

Each case runs in a fresh interpreter (the setting is for the whole process, and sticks). The reference is the
same allocation pattern in a process left to glibc's defaults, page faults counted by the kernel.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

#: a layer's temporaries, 20 times: two blocks of `size` bytes live together, written, then both freed
PATTERN = """
import ctypes, resource, sys
from ternqc.allocator import keep_freed_memory
made = keep_freed_memory()
size, how = int(sys.argv[1]), sys.argv[2]
libc = ctypes.CDLL(None)
libc.memset.argtypes, libc.memset.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
def block():
    if how == "numpy":
        import numpy as np
        return np.ones(size // 4, dtype=np.float32)
    p = ctypes.c_void_p()  # as torch's CPU allocator asks (c10::alloc_cpu: posix_memalign, 64-byte aligned)
    assert libc.posix_memalign(ctypes.byref(p), 64, size) == 0
    libc.memset(p, 1, size)
    return p
def release(b):
    if how != "numpy":
        libc.free(b)
faults = []
for i in range(20):
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    a, b = block(), block()
    release(a), release(b)
    del a, b
print(made, faults[10] - faults[0], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults[10])
"""


glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")


def fresh_python(code: str, env_value: str, *args: object) -> list[str]:
    """What `code` prints, run in a fresh interpreter with `TERNQC_MALLOC=env_value`, split into words."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True,
        env={"TERNQC_MALLOC": env_value, "PATH": "", "PYTHONPATH": ":".join(sys.path)},
    ).stdout.split()


def run(env_value: str, size: int, how: str) -> tuple[bool, int, int]:
    """(whether the settings were made, page faults in the first 10 cycles, in the last 10)"""
    out = fresh_python(PATTERN, env_value, size, how)
    return out[0] == "True", int(out[1]), int(out[2])


@glibc_only
@pytest.mark.parametrize(
    "size, how",
    [
        (24 * 2**20, "numpy"),  # below glibc's largest mmap threshold
        (32 * 2**20, "posix_memalign"),  # the transformer's feed-forward tensors (32 x 128 x 2048 floats): above it
        (96 * 2**20, "posix_memalign"),
    ],
)
def test_freed_memory_is_reused_instead_of_faulted_in_again(size, how):
    made, _, kept = run("1", size, how)
    left, _, default = run("0", size, how)
    assert made and not left  # TERNQC_MALLOC=0 leaves glibc alone
    pages = size // 4096
    # glibc's defaults map such blocks afresh (or trim them back) every cycle, so every cycle faults (numpy
    # asks for huge pages: ~500 faults a cycle for 24 MiB, not 6k); kept, only the first few cycles fault
    # (measured: 2-4 blocks' pages in all), the last ten not one block's pages
    assert default > 9 * min(pages, 500)
    assert kept < pages and kept * 20 < default


THREADS = """
import ctypes, sys, threading
from ternqc.allocator import keep_freed_memory
made = keep_freed_memory()
libc = ctypes.CDLL(None)
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
got = []
def work():
    for size in (8 * 2**20, 100 * 2**20, 2**30):  # a thread's arena holds at most 64 MiB: beyond, glibc maps
        p = ctypes.c_void_p()
        got.append(libc.posix_memalign(ctypes.byref(p), 64, size) == 0 and p.value is not None)
        libc.free(p)
threads = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(made, all(got), len(got))
"""


@glibc_only
def test_threads_still_get_blocks_larger_than_their_arena():
    # with mappings off in the main arena, a thread's arena (at most 64 MiB) must still map what it cannot hold
    assert fresh_python(THREADS, "1") == ["True", "True", "6"]
