"""Cost with length: seconds and peak memory per instance at 32, 128 and 512 tokens, every method.

The NormXLogit paper reports NormXLogit flat at ≈0.36 s per instance from 40 to 512 tokens
while DecompX grows 0.39 → 2.36 s and integrated gradients 0.82 → 1.79 s (one GPU). This
measures the same on this machine's CPU, one thread, one sequence at a time: each call is
``mechnorm.attribute(model, ids, methods=[method])``, i.e. the cached forward pass with the
method's hooks plus the method (gradient methods and Value Zeroing run the model again).
Peak memory is the rise of the process's RSS during the call (``mechnorm.evaluate.cost.measure``).

Lengths run in increasing order; a method whose projected time at the next length (its last
time × (length ratio)², a lower bound for the cubic DecompX) exceeds ``--max-seconds`` is
recorded as skipped with that projection rather than run. One measurement per cell after one
warm-up at the shortest length: the machine is shared and noisy, so read ratios and growth,
not absolute seconds.

Usage::

    python experiments/cost_length.py                          # SmolLM2-135M
    python experiments/cost_length.py --model random-gpt2-small  # a GPT-2-small-shaped random model

Writes ``experiments/results/cost_length.csv``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

import mechnorm
from mechnorm.evaluate.cost import measure

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("normxlogit", "logat", "rollout", "saliency", "grad_x_input", "integrated_gradients",
           "globenc", "alti", "value_zeroing", "decompx", "alti_logit")
LENGTHS = (32, 128, 512)


def load(name: str):
    """SmolLM2-135M (``smollm2-135m``), or a randomly initialised GPT-2-small-shaped HookedTransformer/bridge."""
    if name != "random-gpt2-small":
        return mechnorm.load_model(name)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = Path("/tmp/mechnorm-gpt2-small-random")
    if not (folder / "config.json").exists():
        GPT2LMHeadModel(GPT2Config(n_positions=1024)).save_pretrained(folder)  # no tokenizer: ids are random
    return mechnorm.load_model(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--max-seconds", type=float, default=240.0, help="skip a cell projected to take longer")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "cost_length.csv")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load(args.model)
    registered = set(mechnorm.list_methods()["name"])
    methods = [m for m in args.methods if m in registered]
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.cfg.d_vocab)
    options = {"integrated_gradients": {"n_steps": args.ig_steps}}
    if "llama" in str(getattr(model.cfg, "original_architecture", "")).lower():
        options["integrated_gradients"]["baseline"] = "mean"  # RMSNorm: a zero baseline sits on its singularity

    def call(method: str, length: int):
        ids = torch.randint(10, vocab, (1, length), generator=torch.Generator().manual_seed(length))
        opts = {method: options[method]} if method in options else None
        return lambda: mechnorm.attribute(model, ids, methods=[method], batch_size=1, options=opts, progress=False)

    rows, last = [], {}
    for method in methods:  # warm-up: first calls pay for lazy imports and allocator growth
        call(method, min(min(args.lengths), 32))()
    start = time.perf_counter()
    for length in tqdm(sorted(args.lengths), desc="lengths"):
        for method in methods:
            if method in last:
                prev_len, prev_s = last[method]
                projected = prev_s * (length / prev_len) ** 2
                if projected > args.max_seconds:
                    rows.append({"method": method, "length": length, "seconds": float("nan"), "peak_mb": float("nan"),
                                 "status": f"skipped: projected ≥ {projected:.0f} s"})
                    continue
            _, seconds, peak = measure(call(method, length))
            last[method] = (length, seconds)
            rows.append({"method": method, "length": length, "seconds": seconds, "peak_mb": peak / 2**20, "status": "ok"})
            print(f"{method:>22} @ {length:>4}: {seconds:8.3f} s  {peak / 2**20:9.1f} MB", flush=True)
    frame = pd.DataFrame(rows).assign(model=args.model, threads=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    print(frame.pivot_table(index="method", columns="length", values="seconds").round(3).to_string())
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
