"""Timing and peak-memory measurement for CPU benchmarks (ratios are taken within one run).

Two memory figures: the rise of the process's resident set size (read from /proc every
millisecond by a background thread) above its level when the call starts — torch's CPU
allocations are invisible to ``tracemalloc`` but large tensors are mapped straight into RSS,
though memory the allocator reuses is missed — and :func:`live_peak_bytes`, the peak of live
torch tensor bytes recorded by ``torch.profiler``, which does not depend on allocator reuse.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from mechnorm.evaluate.cost import measure

@dataclass
class Measurement:
    """Median seconds over repeats and the largest RSS rise seen during one call."""

    name: str
    seconds: float
    peak_bytes: int
    live_peak_bytes: int = 0


def measure_once(fn: Callable[[], object]) -> tuple[float, int]:
    """Run ``fn`` once; return (seconds, peak RSS rise in bytes) via ``mechnorm.evaluate.cost.measure``."""
    _, seconds, peak = measure(fn)
    return seconds, peak


def compare(candidates: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> list[Measurement]:
    """Measure several callables with their repeats interleaved (A, B, C, A, B, C, …).

    Interleaving keeps slow drifts of a shared machine from favouring whichever runs first.
    Each callable also runs once under the profiler for its live peak.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in candidates}
    peaks = {name: 0 for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            seconds, peak = measure_once(fn)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    return [
        Measurement(name, statistics.median(times[name]), peaks[name], live_peak_bytes(fn)) for name, fn in candidates.items()
    ]


def table(measurements: list[Measurement], reference: str) -> pd.DataFrame:
    """Seconds, peak MB and both as ratios to the ``reference`` measurement."""
    ref = next(m for m in measurements if m.name == reference)
    rows = [
        {
            "what": m.name,
            "seconds": round(m.seconds, 4),
            "peak_MB": round(m.peak_bytes / 2**20, 1),
            "time_vs_" + reference: round(m.seconds / ref.seconds, 3),
            "peak_vs_" + reference: round(m.peak_bytes / max(ref.peak_bytes, 1), 3),
            "live_peak_MB": round(m.live_peak_bytes / 2**20, 1),
            "live_peak_vs_" + reference: round(m.live_peak_bytes / max(ref.live_peak_bytes, 1), 3),
        }
        for m in measurements
    ]
    return pd.DataFrame(rows)


def live_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live torch CPU tensor bytes while ``fn`` runs (allocations minus frees, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def write_table(frame: pd.DataFrame, path) -> pd.DataFrame:
    """Write a benchmark's rows to ``path`` (CSV, folders made as needed), say so, return them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    print(f"wrote {path}")
    return frame
