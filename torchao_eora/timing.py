"""Wall-clock time per phase and peak memory, for progress reports, summary tables and benchmarks."""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = ["Timer", "peak_memory_gib"]


def peak_memory_gib() -> float:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA), in GiB.

    On Linux, ``VmHWM`` of this process's own address space: ``ru_maxrss`` also counts the peak of the parent it was
    forked from (a benchmark that built a model before starting the CLI would be charged for it)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass
class Timer:
    """Wall-clock seconds per named phase: ``with timer("solve"): ...`` adds to ``timer.seconds["solve"]``."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
