"""Tokens per second and peak memory on one GPU, and the largest batch each method fits (issue #16 item 5).

For each model (SmolLM2-135M, Gemma-3-270M), sequence length (128, 512, 2,048 tokens) and
method — NormXLogit (forward + minimal cache + scores), the logit lens (every position),
saliency and integrated gradients (50 steps) — the batch doubles from 1 until the GPU runs
out of memory (``torch.cuda.OutOfMemoryError`` is caught and the cache emptied), a step takes
longer than ``--step-limit`` seconds, or ``--max-batch`` is reached. Each batch is timed once
after a warm-up at batch 1; the row of the largest batch that fitted says why the doubling
stopped (``oom``, ``time`` or ``cap``: only ``oom`` means the memory limit was found). This
is the paper's comparison (NormXLogit fits batch 750 at 512 tokens in 48 GB, integrated
gradients 2), measured.

Writes ``experiments/results/gpu.csv``: model, dtype, method, seq_len, batch, seconds,
tokens_per_s, peak_MB (``torch.cuda.max_memory_allocated``; on a CPU dry run the rise of the
process's resident memory), largest (the largest batch that fitted), stopped.

Usage (the models come from mechnorm's cache: ``mechnorm fetch smollm2-135m gemma3-270m``)::

    python experiments/bench_gpu.py                       # one GPU, < 8 minutes on an H200
    python experiments/bench_gpu.py --dry-run             # tiny sizes on the CPU, a zoo model
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
import mechnorm  # noqa: E402
from benchutil import measure_once, write_table  # noqa: E402

METHODS = ("normxlogit", "logit_lens", "saliency", "integrated_gradients")


def method_call(name: str, model, batch: mechnorm.Batch, ig_steps: int):
    """A no-argument callable running ``name`` on ``batch`` as a researcher would (forward included)."""
    head = mechnorm.UnembedHead(model)

    @torch.inference_mode()
    def cached(method):
        logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for(method))
        target = mechnorm.predicted(logits, batch.attention_mask)
        if method == "logit_lens":
            return mechnorm.logit_lens(cache, head, target, positions="all", attention_mask=batch.attention_mask)
        return mechnorm.normxlogit(cache, head, target, attention_mask=batch.attention_mask)

    if name in ("normxlogit", "logit_lens"):
        return lambda: cached(name)
    if name == "saliency":
        return lambda: mechnorm.saliency(model, batch)
    return lambda: mechnorm.integrated_gradients(model, batch, n_steps=ig_steps)


def timed(fn, device: str) -> tuple[float, float]:
    """(seconds, peak MB) of one call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20
    seconds, peak = measure_once(fn)
    return seconds, peak / 2**20


def largest_batch(model, name: str, seq_len: int, args) -> list[dict]:
    """Rows for batch 1, 2, 4, … until OOM, the step limit or the cap."""
    vocab = model.cfg.d_vocab
    make = lambda b: mechnorm.Batch(torch.randint(0, vocab, (b, seq_len), device=args.device),  # noqa: E731
                                    torch.ones(b, seq_len, dtype=torch.bool, device=args.device))
    method_call(name, model, make(1), args.ig_steps)()  # warm-up: kernels, allocator, imports
    rows, batch, stopped = [], 1, "cap"
    while batch <= args.max_batch:
        try:
            seconds, peak = timed(method_call(name, model, make(batch), args.ig_steps), args.device)
        except torch.cuda.OutOfMemoryError:
            stopped = "oom"
        if stopped == "oom":
            gc.collect()
            torch.cuda.empty_cache()
            break
        rows.append({"method": name, "seq_len": seq_len, "batch": batch, "seconds": round(seconds, 4),
                     "tokens_per_s": round(batch * seq_len / seconds, 1), "peak_MB": round(peak, 1)})
        if seconds > args.step_limit:
            stopped = "time"
            break
        batch *= 2
    for row in rows:
        row["largest"], row["stopped"] = row is rows[-1], stopped if row is rows[-1] else ""
    return rows


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="default: smollm2-135m gemma3-270m (dry run: the zoo GPT-2)")
    parser.add_argument("--lengths", nargs="+", type=int, help="default: 128 512 2048 (dry run: 8 16)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--step-limit", type=float, default=4.0, help="stop doubling after a step this long (s)")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later cases are skipped, and said so")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU with a zoo model")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.csv"))
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.dtype, args.max_batch, args.ig_steps = "cpu", "float32", 2, 4
        args.models = args.models or [str(mechnorm.zoo.path("gpt2-agree-recall"))]
        args.lengths = args.lengths or [8, 16]
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    args.models = args.models or ["smollm2-135m", "gemma3-270m"]
    args.lengths = args.lengths or [128, 512, 2048]
    dtype = getattr(torch, args.dtype)
    rows, began = [], time.perf_counter()
    for name in args.models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mechnorm.load_model(name, dtype=dtype, device=args.device,
                                        **({"kind": "bridge"} if not mechnorm.models.hooked_available() else {}))
        label = Path(name).name
        for seq_len in tqdm(args.lengths, desc=label):
            for method in args.methods:
                if time.perf_counter() - began > args.budget:
                    print(f"budget of {args.budget:.0f} s spent: skipped {label} {method} at {seq_len} tokens", flush=True)
                    continue
                with warnings.catch_warnings():  # IG's convergence warning: speed is measured here
                    warnings.simplefilter("ignore")
                    for row in largest_batch(model, method, seq_len, args):
                        rows.append({"model": label, "dtype": args.dtype, "device": args.device, **row})
                last = rows[-1]
                print(f"{label} {method} {seq_len} tokens: batch {last['batch']} ({last['stopped']}), "
                      f"{last['tokens_per_s']:.0f} tokens/s, {last['peak_MB']:.0f} MB", flush=True)
        del model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    frame = pd.DataFrame(rows)
    return write_table(frame, args.out)


if __name__ == "__main__":
    main()
