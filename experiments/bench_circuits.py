"""Speed and memory of the circuit analyses on a GPT-2-small-shaped model (random weights), CPU.

(a) ``run_with_cache`` with ``hooks_for("dla")`` + per-head DLA at the prediction positions,
    against one plain forward pass (goal: at most 1.3x);
(b) ``run_with_cache`` with ``hooks_for("head_token_attribution")`` + head-token attribution
    for every head, against the same forward pass (goal: at most 1.5x).

Both also run TransformerLens's route for reference: cache everything, ``stack_head_results``
(which builds every head's output at every position) and a per-position read-out.
Every figure comes from one run, with repeats interleaved. Usage:

    python experiments/bench_circuits.py [--batch 8] [--pos 128] [--repeats 5] [--threads 1] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import mechnorm  # noqa: E402
from bench_core import gpt2_small_shaped  # noqa: E402
from benchutil import compare, table  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared 2-core machine)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = gpt2_small_shaped()
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.pos))
    head = mechnorm.UnembedHead(model, ln="frozen")
    dla_hooks, token_hooks = mechnorm.hooks_for("dla"), mechnorm.hooks_for("head_token_attribution")

    @torch.inference_mode()
    def plain_forward():
        return model(tokens)

    @torch.inference_mode()
    def forward_and_dla():
        logits, cache = model.run_with_cache(tokens, names_filter=dla_hooks)
        return mechnorm.direct_logit_attribution(cache, head, mechnorm.predicted(logits), by="head")

    @torch.inference_mode()
    def forward_and_head_tokens():
        logits, cache = model.run_with_cache(tokens, names_filter=token_hooks)
        return mechnorm.head_token_attribution(cache, head, mechnorm.predicted(logits))

    @torch.inference_mode()
    def transformer_lens_route():
        # the usual notebook route: cache everything, every head's output at every position
        logits, cache = model.run_with_cache(tokens)
        target = mechnorm.predicted(logits)
        stack = cache.stack_head_results(layer=-1)  # [layer·head, batch, pos, d_model]
        rows = torch.arange(tokens.shape[0])
        at_pred = stack[:, rows, target.positions]  # [layer·head, batch, d_model]
        centred = at_pred - at_pred.mean(-1, keepdim=True)
        scale = cache["ln_final.hook_scale"][rows, target.positions]
        direction = (model.ln_final.w[:, None] * model.W_U[:, target.ids]).T  # [batch, d_model]
        return (centred * direction).sum(-1) / scale[:, 0]

    with torch.inference_mode():  # the three routes agree before they are timed
        dla = forward_and_dla()
        tokens_result = forward_and_head_tokens()
        torch.testing.assert_close(tokens_result.per_head().flatten(0, 1), dla.scores, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(transformer_lens_route(), dla.scores, atol=1e-3, rtol=1e-3)

    print(f"GPT-2-small-shaped model, batch {args.batch} x {args.pos} tokens, {torch.get_num_threads()} threads")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measured = compare(
        {
            "forward": plain_forward,
            "forward+cache+dla(by=head)": forward_and_dla,
            "forward+cache+head_token_attribution": forward_and_head_tokens,
            "TL route: full cache + stack_head_results": transformer_lens_route,
        },
        args.repeats,
    )
    result = table(measured, "forward")
    print(result.to_string(index=False))
    result.to_csv(out / "bench_circuits.csv", index=False)
    print(f"wrote {out}/bench_circuits.csv")


if __name__ == "__main__":
    main()
