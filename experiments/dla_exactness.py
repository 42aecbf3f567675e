"""How exact direct logit attribution is on trained models: sum check and NMAE against the direct effect.

For each model, on held-out task prompts (zoo models) or a few sentences (SmolLM2-135M):

* ``sum_error``: max |Σ_c DLA_c + constant − model logit| (must be float rounding);
* ``nmae``: ``mean|DLA − DE| / mean|DE|`` over components and prompts (``mechnorm.dla_exactness``),
  by component (every head) and by layer (attention / MLP per block), with the predicted token's
  logit as target, and (task prompts with a foil) the predicted-minus-foil logit difference. 0 would mean the final norm's scale does not move when a component is removed.

Usage::

    python experiments/dla_exactness.py [--n 100] [--no-smollm] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

import mechnorm
from mechnorm import tasks

SENTENCES = [
    "The keys to the old wooden cabinet",
    "The capital of France is",
    "She opened the door and saw that the",
    "One, two, three, four,",
]


def measure(model, batch: mechnorm.Batch, name: str, foils=None) -> list[dict]:
    logits, cache = mechnorm.run_with_cache(model, batch, names_filter=mechnorm.hooks_for("dla"))
    predicted = mechnorm.predicted(logits, attention_mask=batch.attention_mask)
    targets = {"predicted": predicted}
    if foils is not None:
        targets["predicted − foil"] = mechnorm.contrast(predicted, mechnorm.Target(foils))
    head = mechnorm.UnembedHead(model)
    rows = []
    for (kind, target), by in [(t, by) for t in targets.items() for by in ("component", "layer")]:
        dla = mechnorm.direct_logit_attribution(cache, head, target, by=by, attention_mask=batch.attention_mask)
        logit = target.reduce(logits[torch.arange(len(batch)), target.positions][:, None].gather(-1, target.columns(len(batch))[:, None])[:, 0])
        frame = mechnorm.dla_exactness(cache, head, target, by=by, attention_mask=batch.attention_mask)
        rows.append({"model": name, "target": kind, "by": by, "prompts": len(batch), "components": len(dla.labels),
                     "sum_error": (dla.total() - logit).abs().max().item(),
                     "mean_abs_direct_effect": frame["mean_abs_direct_effect"].iloc[-1],
                     "nmae": frame["nmae"].iloc[-1],
                     "nmae_worst_component": frame["nmae"].iloc[:-1].max()})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--no-smollm", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for zoo in ("gpt2-agree-recall", "llama-agree-recall"):
        model = mechnorm.load_model(f"zoo:{zoo}")
        for task in ("agreement", "recall"):
            data = tasks.collate(tasks.get_task(task).test(args.n))
            keep = data.foils >= 0  # the contrast needs a foil; agreement has one per example
            batch = mechnorm.Batch(data.tokens[keep], data.attention_mask[keep])
            rows += measure(model, batch, f"{zoo} / {task}", data.foils[keep])
    if not args.no_smollm:
        model = mechnorm.load_model("smollm2-135m")
        rows += measure(model, mechnorm.tokenize(model, SENTENCES), "smollm2-135m / sentences")
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "dla_exactness.csv", index=False)
    print(f"wrote {out}/dla_exactness.csv")


if __name__ == "__main__":
    main()
