"""Speed of activation and attribution patching on a GPT-2-small-shaped model (random weights), CPU.

(a) activation patching of ``resid_pre`` per (layer, position), every pair at once:
    ``mechnorm.activation_patching`` (patch runs batched, forward stopped before the
    unembedding) against ``transformer_lens.patching.get_act_patch_resid_pre`` on the same
    inputs (one forward pass per (layer, position), all pairs in it). Both include the clean run
    that supplies the activations. Goal: faster, through batching.
(b) ``mechnorm.attribution_patching`` over every head (``where="head_out"``), against one plain
    forward pass of the clean batch. Goal: at most 3x.

The metric is the mean over pairs of the logit difference target − foil at the last position,
so TransformerLens's scalar per (layer, position) equals the mean of mechnorm's per-pair raw
values; the two are checked to agree before timing. Every figure comes from one run, repeats
interleaved (median of --repeats rounds; one round by default, as the reference takes minutes); the machine is shared, so absolute seconds are noisy. Usage:

    python experiments/bench_patching.py [--batch 2] [--pos 32] [--repeats 1] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import mechnorm  # noqa: E402
from bench_core import gpt2_small_shaped  # noqa: E402


def interleaved(candidates: dict, repeats: int) -> dict:
    """Median seconds of each callable over ``repeats`` rounds (A, B, A, B, …), plus the first round's outputs."""
    times = {name: [] for name in candidates}
    outputs = []
    for round_ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            value = fn()
            times[name].append(time.perf_counter() - start)
            if round_ == 0:
                outputs.append(value)
    return {**{name: statistics.median(t) for name, t in times.items()}, "_outputs": outputs}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pos", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    from transformer_lens import patching

    torch.set_num_threads(1)  # a shared machine: one thread keeps the ratio stable
    torch.manual_seed(0)
    model = gpt2_small_shaped()
    clean = torch.randint(0, model.cfg.d_vocab, (args.batch, args.pos))
    corrupted = clean.clone()
    corrupted[:, args.pos // 2] = torch.randint(0, model.cfg.d_vocab, (args.batch,))  # one token changed per pair
    ids, foils = torch.randint(0, model.cfg.d_vocab, (2, args.batch))
    target = mechnorm.Target(ids=ids, foil=foils)
    rows = torch.arange(args.batch)

    def metric(logits):
        return (logits[rows, -1, ids] - logits[rows, -1, foils]).mean()

    def transformer_lens_route():
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
            return patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)  # [layer, pos]

    def mechnorm_route():
        return mechnorm.activation_patching(model, clean, corrupted, target, where="resid_pre",
                                            layers=range(model.cfg.n_layers), progress=False)

    def attribution_heads():
        return mechnorm.attribution_patching(model, clean, corrupted, target, where="head_out")

    @torch.inference_mode()
    def plain_forward():
        return model(clean)

    print(f"GPT-2-small-shaped model, {args.batch} pairs x {args.pos} tokens, {torch.get_num_threads()} thread(s); "
          f"{model.cfg.n_layers * args.pos} (layer, position) patches per pair")
    part_a = interleaved({"TL get_act_patch_resid_pre": transformer_lens_route, "mechnorm.activation_patching": mechnorm_route},
                         args.repeats)
    theirs, ours = part_a.pop("_outputs")
    torch.testing.assert_close(ours.raw.mean(1), theirs.float(), atol=1e-3, rtol=1e-4)  # the same numbers
    part_b = interleaved({"forward": plain_forward, "attribution_patching(head_out)": attribution_heads}, max(args.repeats, 3))
    part_b.pop("_outputs")
    records = [{"part": part, "what": name, "seconds": seconds, "ratio": seconds / reference, "reference": ref_name,
             "batch": args.batch, "pos": args.pos, "repeats": args.repeats}
            for part, result, ref_name in (("a", part_a, "TL get_act_patch_resid_pre"), ("b", part_b, "forward"))
            for reference in [result[ref_name]] for name, seconds in result.items()]
    frame = pd.DataFrame(records)
    print(frame.round(3).to_string(index=False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "bench_patching.csv", index=False)
    print(f"wrote {out}/bench_patching.csv")


if __name__ == "__main__":
    main()
