"""Wall-clock timing shared by the benchmarks."""
from __future__ import annotations

import time


def best_time(fn, args: tuple, repeats: int) -> float:
    """Best of `repeats` calls of fn(*args), each waited on until its results are ready. Warm or compile fn first."""
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)
