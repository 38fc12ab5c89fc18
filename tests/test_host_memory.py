"""runtime.retain_freed_host_memory: a freed large block is reused instead of being faulted in again."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "retain":
    from cm3jax.host_memory import retain_freed_host_memory
    assert retain_freed_host_memory()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 * 2**20 // 4, np.float32)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
print(faults[-1])
"""


def _faults_of_the_third_allocation(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_host_memory_is_reused_without_page_faults():
    huge_pages = 64 * 2**20 // 2**21  # numpy asks for transparent huge pages: at least one fault per 2 MiB
    assert _faults_of_the_third_allocation("default") >= huge_pages  # glibc maps and unmaps the block every time
    assert _faults_of_the_third_allocation("retain") < huge_pages // 4
