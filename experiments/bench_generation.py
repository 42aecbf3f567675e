"""Explaining a generation: one forward pass over prompt + generation against one pass per step.

SmolLM2-135M, a ~20-token prompt, 16 and 64 greedily generated tokens. Timed (medians over
interleaved repeats, one run, so the ratios share the machine's load):

* ``generate_s``: the greedy loop of :func:`mechnorm.generation.greedy_generate` (a full
  forward per token, no key-value cache); ``kv_generate_s``: TransformerLens's own
  ``model.generate`` with its key-value cache, for reference;
* ``one_pass_s``: one cached forward pass over all tokens + NormXLogit of every step;
* ``step_by_step_s``: per step, a cached forward pass over the prefix + NormXLogit (inseq-style);
* totals: generation + attribution for both; ``fused_step_s`` is the step-by-step loop that
  also decodes (each step's pass gives the next token, so no separate generation).

The largest |difference| between the two ways' scores is recorded too (they are equal up to
float rounding), and whether TransformerLens's cached generate gives the same tokens. Results: ``experiments/results/bench_generation.csv``.

Usage: ``python experiments/bench_generation.py [--steps 16 64] [--repeats 3] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

import mechnorm
from mechnorm.generation import explain_generation, greedy_generate

PROMPT = "The old wooden cabinet in the hall held the keys to every room of the house, and the key to the"
OUT = Path(__file__).parent / "results" / "bench_generation.csv"


def step_by_step(model, ids: torch.Tensor, prompt_length: int, n: int, decode: bool = False):
    """NormXLogit of each of ``n`` steps from its own cached pass over the prefix; with ``decode``
    the next token is the pass's argmax (the loop generates), else it is read from ``ids``."""
    head = mechnorm.UnembedHead(model)
    hooks = mechnorm.hooks_for("normxlogit")
    ids = ids[:prompt_length].clone() if decode else ids
    rows = []
    for t in range(n):
        prefix = ids[: prompt_length + t][None]
        logits, cache = mechnorm.run_with_cache(model, mechnorm.Batch(prefix, torch.ones_like(prefix, dtype=torch.bool)), hooks)
        if decode:
            target = mechnorm.predicted(logits)
            ids = torch.cat([ids, target.ids.cpu()])
        else:
            target = mechnorm.token_target(int(ids[prompt_length + t]))
        rows.append(mechnorm.normxlogit(cache, head, target).scores[:, 0])
    return rows


def one_pass(model, ids: torch.Tensor, prompt_length: int):
    """The one-pass attribution of an already generated sequence (explain_generation without decoding)."""
    from mechnorm.generation import _scores, _step_positions

    tokens = ids[None]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    logits, cache = mechnorm.run_with_cache(model, mechnorm.Batch(tokens, mask), mechnorm.hooks_for("normxlogit"))
    steps = _step_positions(tokens.shape[1], len(ids) - prompt_length)
    with torch.inference_mode():
        scores, _ = _scores("normxlogit", cache, mechnorm.UnembedHead(model), tokens[:, steps], mask, steps, None, {})
    return scores[0]


def timed(fn):
    clock = time.perf_counter()
    out = fn()
    return time.perf_counter() - clock, out


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kind", choices=("hooked", "bridge"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = mechnorm.load_model("smollm2-135m", kind=args.kind)
    import transformer_lens

    version = getattr(transformer_lens, "__version__", None) or __import__("importlib.metadata").metadata.version("transformer-lens")
    prompt = mechnorm.tokenize(model, PROMPT).tokens
    P = prompt.shape[1]
    rows = []
    explain_generation(model, PROMPT, 2, progress=False)  # warm-up
    for n in args.steps:
        times = {k: [] for k in ("generate", "kv_generate", "one_pass", "step_by_step", "fused_step")}
        ids = exact = None
        for _ in tqdm(range(args.repeats), desc=f"timing {n} tokens", unit="repeat"):
            seconds, (tokens, _) = timed(lambda: greedy_generate(model, prompt, None, n, progress=True))
            assert ids is None or tokens[0].cpu().tolist() == ids.tolist()  # greedy: the same every time
            ids = tokens[0].cpu()
            times["generate"].append(seconds)
            seconds, kv_tokens = timed(lambda: model.generate(
                prompt, max_new_tokens=n, do_sample=False, stop_at_eos=False, use_past_kv_cache=True, verbose=False))
            times["kv_generate"].append(seconds)
            kv_match = torch.as_tensor(kv_tokens)[0].cpu().tolist() == ids.tolist()
            seconds, scores = timed(lambda: one_pass(model, ids, P))
            times["one_pass"].append(seconds)
            seconds, reference = timed(lambda: step_by_step(model, ids, P, n))
            times["step_by_step"].append(seconds)
            exact = max(float((scores[t, :, : P + t].cpu() - ref).abs().max()) for t, ref in enumerate(reference))
            times["fused_step"].append(timed(lambda: step_by_step(model, ids, P, n, decode=True))[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({
            "transformer_lens": version, "kind": type(model).__name__, "threads": args.threads, "prompt_tokens": P,
            "generated": n, "generate_s": med["generate"], "kv_generate_s": med["kv_generate"],
            "one_pass_s": med["one_pass"], "step_by_step_s": med["step_by_step"],
            "normxlogit_speedup": med["step_by_step"] / med["one_pass"],
            "one_pass_total_s": med["generate"] + med["one_pass"],
            "step_by_step_total_s": med["generate"] + med["step_by_step"],
            "total_speedup": (med["generate"] + med["step_by_step"]) / (med["generate"] + med["one_pass"]),
            "fused_step_s": med["fused_step"],
            "fused_speedup": med["fused_step"] / (med["generate"] + med["one_pass"]),
            "kv_total_speedup": (med["kv_generate"] + med["step_by_step"]) / (med["kv_generate"] + med["one_pass"]),
            "kv_tokens_match": kv_match, "max_abs_diff": exact, "max_abs_score": float(scores.abs().max()),
        })
        print(pd.DataFrame(rows[-1:]).T.to_string(header=False))
    frame = pd.DataFrame(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    header = not OUT.exists()
    frame.to_csv(OUT, mode="a", header=header, index=False)
    print(f"appended to {OUT}")
    return frame


if __name__ == "__main__":
    main(sys.argv[1:])
