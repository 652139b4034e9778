"""Wall-clock timing of GPU work, shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def cuda_times(step: Callable[[int], T], calls: int, warmup: int) -> tuple[list[float], T]:
    """Run `step(i)` for i < warmup + calls, synchronising around each; return the sorted
    times of the last `calls` runs and the last result."""
    times = []
    result = None
    for i in range(warmup + calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = step(i)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times), result
