"""Keep freed host memory inside the process (glibc malloc settings), for training on the CPU backend.

XLA's CPU runtime allocates each execution's temporary buffer (1.5 GB for the benchmark's d=512, 8-layer step) from
a worker thread and frees it afterwards. glibc serves such a large block from a fresh mapping and unmaps it on free,
so every step faults the whole buffer back in, page by page (measured: 1.43 GB of minor faults and about 1 s of
kernel time per 6 s step; several times more on a VM that returns freed guest memory to its host). With one malloc
arena, no mmap for large blocks and no trimming, the block is reused from the heap: zero faults per step after the
first few. The cost: the process keeps its peak host memory (RSS up to about twice the temporary buffer) and all
threads share one arena, so this suits CPU training, not an accelerator host feeding a large input pipeline.
Must run before the JAX backend starts its threads.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import ml_collections
from absl import logging

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_host_memory() -> bool:
    """Applies the settings; False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 for the trim threshold means never give the top of the heap back.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(option, value) == 1 for option, value in settings)


def apply_runtime_config(runtime: ml_collections.ConfigDict) -> None:
    """Applies config.runtime at process start (`cm3jax` commands and the benchmarks that stand in for them)."""
    if runtime.retain_freed_host_memory and not retain_freed_host_memory():
        logging.warning("runtime.retain_freed_host_memory: not a glibc system, left unchanged")
