"""What a method costs on CPU: wall time, peak memory, and the largest batch a budget allows.

Peak memory is the rise of the process's resident set size (read from ``/proc`` every
millisecond by a background thread) above its level when the call starts; torch's CPU
allocations are invisible to ``tracemalloc``. glibc keeps freed heap memory mapped for
reuse, which would let a call allocate without raising RSS, so :func:`measure` first hands
free heap pages back to the system (``malloc_trim``): whatever the call then touches shows
up. Adapted from ``experiments/benchutil.py``.
"""

from __future__ import annotations

import ctypes
import gc
import math
import threading
import time
from typing import Callable, Mapping, TypeVar

T = TypeVar("T")
_PAGE = 4096


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def release_free_memory() -> None:
    """Return free heap pages to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], T]) -> tuple[T, float, int]:
    """Run ``fn`` once; return its result, the seconds it took and its peak RSS rise in bytes.

    Example:
        >>> result, seconds, peak = measure(lambda: sum(range(1000)))
        >>> result, seconds >= 0, peak >= 0
        (499500, True, True)
    """
    gc.collect(1)  # young generations only: a full collection takes ~0.3 s with transformers loaded
    release_free_memory()
    start_rss = rss_bytes()
    peak = start_rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        peak = max(peak, rss_bytes())
        done.set()
        sampler.join()
    return result, seconds, max(peak - start_rss, 0)


def max_batch(peaks: Mapping[int, int], budget_bytes: float) -> dict[str, float]:
    """Extrapolate the largest batch whose peak memory fits ``budget_bytes``.

    From peaks measured at two (or more) batch sizes, a least-squares line
    ``peak(b) = fixed + per_instance · b`` is fitted; the largest batch is
    ``floor((budget − fixed) / per_instance)`` (infinite when the peak does not grow).

    Returns:
        ``{"mb_per_instance", "fixed_mb", "max_batch"}``.

    Example:
        >>> max_batch({4: 500 * 2**20, 16: 1100 * 2**20}, 8 * 2**30)["max_batch"]
        157
    """
    if len(peaks) < 2:
        raise ValueError("max_batch needs peaks at two or more batch sizes, e.g. {4: peak4, 16: peak16}.")
    sizes = sorted(peaks)
    mean_b = sum(sizes) / len(sizes)
    mean_p = sum(peaks[b] for b in sizes) / len(sizes)
    slope = sum((b - mean_b) * (peaks[b] - mean_p) for b in sizes) / sum((b - mean_b) ** 2 for b in sizes)
    fixed = mean_p - slope * mean_b
    if slope <= 0:
        return {"mb_per_instance": 0.0, "fixed_mb": fixed / 2**20, "max_batch": math.inf}
    return {"mb_per_instance": slope / 2**20, "fixed_mb": fixed / 2**20,
            "max_batch": max(0, math.floor((budget_bytes - fixed) / slope))}
