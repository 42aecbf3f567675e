"""Speed and memory of the baselines against one plain forward pass (CPU).

Measured: logit lens (top-5, all positions; exact float32 and with the bf16 matmul), attention rollout, raw attention weights,
saliency, gradient × input and integrated gradients (50 steps). The cache-reading methods
(lens, rollout, attention) are timed on a cache that already exists, as a researcher runs
them after ``run_with_cache``; the gradient methods include every pass they run.

Time and peak memory come from ``benchutil.measure_once``, as in bench_core: wall time, and
the largest rise of the process's resident set size (sampled every millisecond) above its
level when the call starts. torch's CPU allocations are invisible to ``tracemalloc``; large
tensors are mapped straight into RSS, so the rise captures them. The forward pass the ratios
refer to must be measured the same way. RSS misses memory that the allocator reuses from
earlier frees (a rise of 0 is common for small calls), so a second figure, ``live_peak_MB``,
is the peak of live torch CPU allocations recorded by ``torch.profiler`` (profile_memory)
in a separate run, against the forward pass's own live peak.

Goals (issue 3): logit lens ≤ 3× the forward time and ≤ 1.5× its peak memory (the naive
``accumulated_resid @ W_U`` route materialises ``[layer, batch, pos, vocab]``, ~2.6 GB at
GPT-2-small 8 × 128); rollout < 0.2× the forward time; NormXLogit (forward + cache + scores)
≥ 20× faster than IG at 50 steps.

Run through ``python experiments/bench_core.py`` (or ``mechnorm bench``), which measures the
forward pass these ratios refer to and calls :func:`bench_baselines`.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import mechnorm  # noqa: E402
from benchutil import live_peak_bytes, measure_once  # noqa: E402


def bench_baselines(
    model,
    batch,
    forward_seconds: float,
    forward_peak_bytes: int,
    normxlogit_seconds: float | None = None,
    ig_steps: int = 50,
    repeats: int = 1,
    live_peak: bool = True,
) -> list[dict]:
    """Time and peak memory of each baseline, as ratios to one plain forward pass.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        batch: a :class:`mechnorm.Batch`, or ``[batch, pos]`` token ids (no padding).
        forward_seconds, forward_peak_bytes: one plain forward pass over ``batch``, measured
            with ``benchutil.measure_once``.
        normxlogit_seconds: forward + cache + NormXLogit over ``batch``, when measured, to
            check the "NormXLogit ≥ 20× faster than IG" goal.
        ig_steps: integrated-gradients steps.
        repeats: runs per method (median time, largest peak).
        live_peak: also run each method once under ``torch.profiler`` for its peak of live
            tensor bytes (doubles the run time; IG is the long one).

    Returns:
        One dict per method: what, seconds, peak_MB, time_vs_forward, peak_vs_forward,
        live_peak_MB and live_peak_vs_forward (when ``live_peak``), goal, meets_goal (None
        where the issue sets no goal; the memory goal is judged on the live peak when measured).

    Example:
        >>> rows = bench_baselines(model, tokens, forward_seconds=1.2, forward_peak_bytes=300e6)  # doctest: +SKIP
    """
    if not isinstance(batch, mechnorm.Batch):
        tokens = torch.as_tensor(batch)
        batch = mechnorm.Batch(tokens, torch.ones_like(tokens, dtype=torch.bool))
    small = mechnorm.Batch(batch.tokens[:1, :8], batch.attention_mask[:1, :8])
    for run, _ in _cases(model, small, ig_steps=2).values():  # one-time costs (imports, first backward)
        run()
    cases = _cases(model, batch, ig_steps)
    if live_peak:

        @torch.inference_mode()
        def forward():
            return model(batch.tokens, attention_mask=batch.attention_mask.long())

        forward_live = live_peak_bytes(forward)
    rows = []
    for name, (run, goal) in cases.items():
        measured = [measure_once(run) for _ in range(repeats)]
        seconds = statistics.median(s for s, _ in measured)
        peak = max(p for _, p in measured)
        time_ratio, peak_ratio = seconds / forward_seconds, peak / max(forward_peak_bytes, 1)
        live_ratio = live_peak_bytes(run) / max(forward_live, 1) if live_peak else None
        meets = None
        if name.startswith("logit_lens"):  # memory judged on the live peak when measured (RSS misses reuse)
            meets = time_ratio <= 3 and (peak_ratio if live_ratio is None else live_ratio) <= 1.5
        elif name == "rollout":
            meets = time_ratio < 0.2
        elif name.startswith("integrated_gradients") and normxlogit_seconds:
            goal = f"{goal} (measured {seconds / normxlogit_seconds:.1f}x)"
            meets = seconds >= 20 * normxlogit_seconds
        row = {
            "what": name,
            "seconds": round(seconds, 4),
            "peak_MB": round(peak / 2**20, 1),
            "time_vs_forward": round(time_ratio, 3),
            "peak_vs_forward": round(peak_ratio, 3),
        }
        if live_ratio is not None:
            row.update(live_peak_MB=round(live_ratio * forward_live / 2**20, 1), live_peak_vs_forward=round(live_ratio, 3))
        rows.append({**row, "goal": goal, "meets_goal": meets})
    return rows


def _cases(model, batch, ig_steps: int) -> dict[str, tuple[Callable[[], object], str]]:
    """name -> (call, goal) for every baseline on ``batch``; the cache is made here, untimed."""
    mask = batch.attention_mask
    head = mechnorm.UnembedHead(model)
    _, cache = mechnorm.run_with_cache(model, batch, names_filter=mechnorm.hooks_for("logit_lens", "rollout"))

    def lens(dtype=torch.float32):
        return lambda: mechnorm.logit_lens(cache, head, positions="all", top_k=5, attention_mask=mask, dtype=dtype)

    return {
        "logit_lens top-5 all positions": (lens(), "time ≤ 3x, peak ≤ 1.5x"),
        "logit_lens top-5 all positions, bf16 matmul": (lens(torch.bfloat16), "time ≤ 3x, peak ≤ 1.5x"),
        "rollout": (lambda: mechnorm.attention_rollout(cache, attention_mask=mask), "time < 0.2x"),
        "attention weights": (lambda: mechnorm.attention_weights(cache, attention_mask=mask), ""),
        "saliency": (lambda: mechnorm.saliency(model, batch), ""),
        "grad_x_input": (lambda: mechnorm.grad_x_input(model, batch), ""),
        f"integrated_gradients {ig_steps} steps": (
            lambda: mechnorm.integrated_gradients(model, batch, n_steps=ig_steps),
            "normxlogit ≥ 20x faster",
        ),
    }
