"""The logit lens against its matmul floor, float32 and bf16 (issue #16 item 3), CPU.

The exact lens must compute L+1 full unembeddings; those matmuls alone are its floor. Measured
in one run, repeats interleaved (A, B, C, A, B, C, …), on a GPT-2-small-shaped random model
(12 layers, d_model 768, vocab 50257), every position of a batch × pos batch:

* ``floor``: the L+1 unembeddings ``norm(x_l) @ W_U`` alone, in the matmul dtype, each layer's
  full ``[batch · pos, vocab]`` product (the inputs are prepared outside the timing);
* ``floor, chunked``: the same products in the lens's own vocabulary chunks (the matmul
  part of the lens alone: a contiguous copy of each ``W_U`` block, then one product of all
  layers' rows with it), which is the faster way to do the same arithmetic on a CPU;
* ``lens before``: ``logit_lens`` as committed before this change (read from git ``HEAD``
  unless ``--before`` names another revision);
* ``lens, eager``: ``logit_lens(fused=False)``: the per-chunk sums as eager PyTorch passes;
* ``lens``: ``logit_lens`` now (at this size its sums run as one compiled kernel), with the
  prediction given (``target=predicted(logits)``), and with the default target (the final
  layer's argmax, one extra final-layer pass). ``first_call_seconds`` is the warm-up call,
  which builds the compiled kernel (the other columns exclude it).

Writes ``experiments/results/lens_floor.csv``: seconds (median) and each lens's ratio to both
floors. Usage::

    python experiments/bench_lens.py [--batch 8] [--pos 128] [--repeats 3] [--before HEAD] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import mechnorm  # noqa: E402
from bench_core import gpt2_small_shaped  # noqa: E402
from benchutil import write_table  # noqa: E402
from mechnorm.methods import registry  # noqa: E402
from mechnorm.methods.lens_stream import default_chunk  # noqa: E402
from mechnorm.residual import resid_hook  # noqa: E402


def _module_at(revision: str, name: str, source: str) -> types.ModuleType:
    """Run ``source`` (a file of ``mechnorm.methods`` at ``revision``) as module ``name``."""
    module = types.ModuleType(f"mechnorm.methods.{name}")
    module.__package__ = "mechnorm.methods"
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:{name}.py", "exec"), module.__dict__)
    return module


def lens_at(revision: str):
    """``logit_lens`` as ``mechnorm/methods/lens.py`` (and its ``lens_stream.py``, where it had
    one) was at git ``revision`` (None if unreadable)."""
    root = Path(__file__).resolve().parents[1]

    def show(path: str) -> str | None:
        try:
            return subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, check=True, capture_output=True,
                                  text=True).stdout
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None

    source, stream_source = show("mechnorm/methods/lens.py"), show("mechnorm/methods/lens_stream.py")
    if source is None:
        return None
    if stream_source is not None:  # the old lens reads the old engine, not today's
        _module_at(revision, "_lens_stream_before", stream_source)
        source = source.replace("from .lens_stream import", "from ._lens_stream_before import")
    saved = registry._REGISTRY.pop("logit_lens")  # the old file registers the same name
    try:
        return _module_at(revision, "_lens_before", source).logit_lens
    finally:
        registry._REGISTRY["logit_lens"] = saved


def interleaved(candidates: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each callable, repeats interleaved, after one warm-up call each; and
    the warm-up calls' seconds (the fused lens builds its kernel there)."""
    first = {}
    for name, fn in candidates.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, first


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated matmul dtypes to measure")
    parser.add_argument("--before", default="HEAD", help="git revision of the 'before' lens ('' to skip)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lens_floor.csv"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = gpt2_small_shaped()
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.pos))
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("logit_lens"))
    head = mechnorm.UnembedHead(model)
    target = mechnorm.predicted(logits)
    layers = model.cfg.n_layers + 1
    with torch.inference_mode():
        inputs = torch.cat([head.normalise(cache[resid_hook(layer)]).flatten(0, 1) for layer in range(layers)])
    weight = head.weight_out.contiguous()
    before = lens_at(args.before) if args.before else None
    rows = []
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        x, w = inputs.to(dtype), weight.to(dtype)
        per_layer = x.chunk(layers)
        chunk = default_chunk(len(x), x.device)

        @torch.inference_mode()
        def floor():
            for part in per_layer:
                part @ w

        @torch.inference_mode()
        def floor_chunked():
            for start in range(0, w.shape[1], chunk):
                x @ head.weight_out[:, start:start + chunk].to(dtype).contiguous()

        candidates = {"floor": floor, "floor, chunked": floor_chunked}
        if before is not None:
            candidates["lens before, prediction given"] = lambda: before(cache, head, target, positions="all", dtype=dtype)
        candidates["lens, eager, prediction given"] = lambda: mechnorm.logit_lens(cache, head, target, positions="all",
                                                                                 dtype=dtype, fused=False)
        candidates["lens, prediction given"] = lambda: mechnorm.logit_lens(cache, head, target, positions="all", dtype=dtype)
        candidates["lens, default target"] = lambda: mechnorm.logit_lens(cache, head, positions="all", dtype=dtype)
        seconds, first = interleaved(candidates, args.repeats)
        for name, value in seconds.items():
            rows.append({"dtype": str(dtype).removeprefix("torch."), "what": name, "seconds": round(value, 3),
                         "vs_floor": round(value / seconds["floor"], 3),
                         "vs_floor_chunked": round(value / seconds["floor, chunked"], 3),
                         "first_call_seconds": round(first[name], 3)})
        print(pd.DataFrame(rows[-len(seconds):]).to_string(index=False), flush=True)
    frame = pd.DataFrame(rows).assign(batch=args.batch, pos=args.pos, threads=torch.get_num_threads(),
                                      torch=torch.__version__)
    return write_table(frame, args.out)


if __name__ == "__main__":
    main()
