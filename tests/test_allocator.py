"""`ternqc.allocator`: with glibc's thresholds fixed, freed memory is reused instead of faulted in afresh.

Each case runs in a fresh interpreter (the setting is for the whole process, and sticks). The reference is the
same allocation pattern in a process left to glibc's defaults, page faults counted by the kernel.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PATTERN = """
import resource, sys
from ternqc.allocator import keep_freed_memory
made = keep_freed_memory()
import numpy as np
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):  # a layer's temporaries: two 24 MiB blocks live together, then both freed
    a = np.ones(6 * 2**20, dtype=np.float32)
    b = np.ones(6 * 2**20, dtype=np.float32)
    del a, b
print(made, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(env_value: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PATTERN], capture_output=True, text=True, check=True,
        env={"TERNQC_MALLOC": env_value, "PATH": "", "PYTHONPATH": ":".join(sys.path)},
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    made, kept = run("1")
    left, default = run("0")
    assert made and not left  # TERNQC_MALLOC=0 leaves glibc alone
    # glibc's defaults trim the freed blocks back to the system every cycle (measured: ~1000 pages faulted in
    # again each time); kept, only the first cycle faults
    assert default > 19 * 500
    assert kept * 5 < default
