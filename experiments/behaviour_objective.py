"""Does the training objective decide NormXLogit's behavioural check? Retrain the zoo GPT-2 recipe
(same seed and steps; nothing is shipped) with the loss on whole sequences (the zoo's) or on the
answer token only, at a chosen depth, and print how often each method ranks the subject first.

Usage::

    python experiments/behaviour_objective.py --loss answer            # ~6 min on one core
    python experiments/behaviour_objective.py --loss sequence --layers 4

Measured (300 held-out agreement examples, final layer): whole-sequence loss, 3 layers (the zoo)
NormXLogit .81, saliency .54; answer-only loss NormXLogit .00, saliency 1.00; whole-sequence
loss, 4 layers NormXLogit .64, saliency .35. (With the first grammar, which had no bare
subjects: .53 / .62, .00 / .98 and .57 / .91.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_zoo  # noqa: E402
from behaviour_check import subject_first_share  # noqa: E402

import mechnorm  # noqa: E402
from mechnorm import tasks  # noqa: E402

METHODS = ("normxlogit", "logat", "saliency", "grad_x_input")


def answer_loss(model, examples):
    """Cross-entropy of the answer token at the prediction position only."""
    ids, mask = train_zoo.lm_batch(examples)
    logits = model(input_ids=ids, attention_mask=mask).logits
    positions = torch.tensor([len(e.tokens) - 1 for e in examples])
    return F.cross_entropy(logits[torch.arange(len(examples)), positions], torch.tensor([e.answer for e in examples]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", choices=("sequence", "answer"), default="answer")
    parser.add_argument("--layers", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if args.loss == "answer":
        train_zoo.lm_loss = answer_loss  # train() looks the loss up when it runs

    build = functools.partial(train_zoo.build_gpt2, n_layer=args.layers)
    spec = dataclasses.replace(train_zoo.SPECS["gpt2-agree-recall"], build=build)
    model = train_zoo.train(f"gpt2-{args.layers}l-{args.loss}", spec, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tasks.tokenizer("lm").save_pretrained(folder)
        data = tasks.collate(tasks.get_task("agreement").test(300))
        shares = subject_first_share(mechnorm.load_model(folder), data.tokens, data.attention_mask, data.cue_positions, METHODS)
    print(f"{args.layers} layers, {args.loss} loss: " + ", ".join(f"{m} {s:.2f}" for m, s in shares.items()))


if __name__ == "__main__":
    main()
