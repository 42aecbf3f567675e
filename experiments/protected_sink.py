"""Is the first real position of a causal LM (the attention sink) evidence, or a sink, for each method?

Runs SmolLM2-135M (no BOS prepended) on seven sentences whose first tokens differ, and measures
(1) the attention mass later queries put on position 0, per layer; (2) position 0's final
residual norm against the others'; (3) per method, how often position 0 is the top token once
the prediction position is set aside. The answer fixes ``mechnorm.protected.SINK_METHODS``.

    .venv/bin/python experiments/protected_sink.py   # writes experiments/results/protected_sink.md
"""

from __future__ import annotations

from pathlib import Path

import torch

import mechnorm
from mechnorm.protected import SINK_METHODS

TEXTS = [
    "The keys to the old wooden cabinet", "The Eiffel Tower is located in the city of",
    "Mr Dursley and Mrs Potter went home. Then Mr Dursley and Mrs", "Paris is the capital of",
    "Germany's capital city is", "keys to the old wooden cabinet", "Dogs chase cats and cats chase",
]
METHODS = ("normxlogit", "logat", "embedding_norm", "rollout", "attention", "globenc", "alti", "alti_logit",
           "decompx", "value_zeroing", "saliency", "grad_x_input")
OUT = Path(__file__).parent / "results" / "protected_sink.md"


def first_token_top(attr) -> int:
    """Sequences whose top-scoring position, the prediction position left out, is position 0."""
    count = 0
    for b in range(attr.batch_size):
        real = attr.mask[b].nonzero().flatten()
        scores = attr.row(-1)[b].clone()
        scores[int(real[-1])] = float("nan")
        count += int(torch.nan_to_num(scores, nan=float("-inf")).argmax() == int(real[0]))
    return count


def main() -> None:
    torch.set_num_threads(1)
    model = mechnorm.load_model("smollm2-135m")
    batch = mechnorm.tokenize(model, TEXTS)
    last = batch.attention_mask.sum(1) - 1
    names = lambda name: name.endswith("hook_pattern") or name.endswith("hook_resid_post")  # noqa: E731
    _, cache = mechnorm.run_with_cache(model, batch, names)
    lines = [f"# The attention sink on SmolLM2-135M ({len(TEXTS)} sentences, no BOS)", "",
             "First tokens: " + ", ".join(repr(s[0]) for s in batch.strings), "",
             "## Attention of later queries on position 0 (mean over heads and queries)", "",
             "| layer | " + " | ".join(f"s{b}" for b in range(len(TEXTS))) + " |", "|---" * (len(TEXTS) + 1) + "|"]
    for layer in [*range(0, model.cfg.n_layers - 1, 5), model.cfg.n_layers - 1]:
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float().mean(1)  # [batch, query, key]
        mass = [float(pattern[b, 1 : int(last[b]) + 1, 0].mean()) for b in range(len(TEXTS))]
        lines.append(f"| {layer} | " + " | ".join(f"{m:.2f}" for m in mass) + " |")
    norm = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].float().norm(dim=-1)
    ratios = [float(norm[b, 0] / norm[b, 1 : int(last[b]) + 1].median()) for b in range(len(TEXTS))]
    lines += ["", "Final residual norm of position 0 / median of the others: "
              + ", ".join(f"{r:.1f}" for r in ratios), "",
              "## Position 0 ranked first, the prediction position left out", "",
              "| method | sequences | protected as sink |", "|---|---|---|"]
    comp = mechnorm.attribute(model, batch, methods=METHODS)
    for method in METHODS:
        sink = method in SINK_METHODS
        lines.append(f"| {method} | {first_token_top(comp[method])}/{len(TEXTS)} | {'yes' if sink else 'no'} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
