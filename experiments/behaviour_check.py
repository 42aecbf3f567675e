"""The zoo's behavioural check for every method: does the top-ranked token find the subject noun?

On held-out agreement examples, which all have one or two modifiers between the subject and
the verb (``the key to the cabinets`` → ``is``), how often is the top-ranked token at the final layer
the subject noun (hit@1; the first token and the prediction position are not ranked)? For
the zoo's two causal LMs and, on the same sentences, the real SmolLM2-135M (when fetched:
``mechnorm fetch smollm2-135m``), explaining the model's prediction (the default) and the
contrast answer − foil (``is`` − ``are``).

Usage::

    python experiments/behaviour_check.py              # ~4 min, writes results/behaviour_check.csv
    python experiments/behaviour_check.py --n 50       # quicker

``tests/test_behaviour.py`` asserts NormXLogit's figure on the zoo models.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pandas as pd
import torch

import mechnorm
from mechnorm import evaluate, fetch, tasks
from mechnorm.compare import DEFAULT_METHODS
from mechnorm.residual import at_positions
from mechnorm.targets import first_positions, last_positions

RESULTS = Path(__file__).resolve().parent / "results"
ZOO_MODELS = ("gpt2-agree-recall", "llama-agree-recall")
REAL_MODEL = "smollm2-135m"
REAL_MODEL_SKIPS = ("integrated_gradients",)  # 30 layers × 50 steps: too slow on a CPU for 300 sentences


def subject_first_share(model, tokens, mask, subjects, methods=DEFAULT_METHODS, contrast=None, options=None) -> dict:
    """Per method, the share of sequences whose top token at the final layer is a subject token.

    ``subjects``: the subject's token positions per sequence; ``contrast``: ``(answers, foils)``
    ids to explain answer − foil instead of the prediction.
    """
    target = None if contrast is None else mechnorm.contrast(*contrast)
    options = {m: o for m, o in (options or {}).items() if m in methods}
    comparison = mechnorm.attribute(model, mechnorm.Batch(tokens, mask), methods=methods, target=target,
                                    options=options, progress=False)
    rows, not_ranked = torch.arange(len(mask)), torch.zeros_like(mask)
    not_ranked[rows, first_positions(mask)] = True  # [BOS] in the zoo; SmolLM2's first word, its attention sink
    not_ranked[rows, last_positions(mask)] = True  # the prediction's own position
    return {m: float(evaluate.hit_at_k(comparison[m].row(-1), subjects, mask, exclude=not_ranked).mean()) for m in methods}


def zoo_rows(examples, methods) -> list[dict]:
    data = tasks.collate(examples)
    rows = []
    for name in ZOO_MODELS:
        model = mechnorm.load_model(f"zoo:{name}")
        options = {"integrated_gradients": {"baseline": "mean"}} if name.startswith("llama") else {}
        for label, contrast in (("prediction", None), ("contrast", (data.answers, data.foils))):
            shares = subject_first_share(model, data.tokens, data.attention_mask, data.cue_positions, methods, contrast, options)
            rows += _rows(name, label, shares)
    return rows


def real_model_rows(examples, methods) -> list[dict]:
    """The same sentences, capitalised, through SmolLM2's own tokenizer (no BOS is prepended)."""
    model = mechnorm.load_model(REAL_MODEL)
    tokenizer = model.tokenizer
    texts, subjects = [], []
    for example in examples:
        words = example.text.split()  # "the", subject, ...
        texts.append(" ".join(["The", *words[1:]]))
        start, end = len("The "), len("The ") + len(words[1])
        offsets = tokenizer(texts[-1], return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        subjects.append([i for i, (a, b) in enumerate(offsets) if a < end and b > start])
    batch = mechnorm.tokenize(model, texts)
    verb = {w: tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0] for w in ("is", "are")}
    answers = torch.tensor([verb[e.answer_text] for e in examples])
    foils = torch.tensor([verb["are" if e.answer_text == "is" else "is"] for e in examples])
    verb_share, right_share = _verb_predictions(model, batch, answers, foils)
    print(f"{REAL_MODEL} predicts ' is' or ' are' on {verb_share:.0%} of the sentences; "
          f"the right one scores above the other on {right_share:.0%}", flush=True)
    rows = []
    for label, contrast in (("prediction", None), ("contrast", (answers, foils))):
        shares = subject_first_share(model, batch.tokens, batch.attention_mask, subjects, methods, contrast,
                                     {"integrated_gradients": {"baseline": "mean"}})
        rows += _rows(REAL_MODEL, label, shares)
    return rows


@torch.inference_mode()
def _verb_predictions(model, batch, answers, foils) -> tuple[float, float]:
    """Shares of sentences whose prediction is a verb, and whose answer logit beats the foil's."""
    logits = model(batch.tokens, attention_mask=batch.attention_mask)
    last = at_positions(logits, last_positions(batch.attention_mask))
    is_verb = torch.isin(last.argmax(-1), torch.cat([answers, foils]))
    right = last.gather(1, answers[:, None]) > last.gather(1, foils[:, None])
    return float(is_verb.float().mean()), float(right.float().mean())


def _rows(model: str, target: str, shares: dict) -> list[dict]:
    print(f"{model}, {target}: " + ", ".join(f"{m} {s:.2f}" for m, s in shares.items()), flush=True)
    return [dict(model=model, target=target, method=m, share=s) for m, s in shares.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="held-out examples")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # integrated gradients' convergence warnings: see faithfulness.py
    examples = tasks.get_task("agreement").test(args.n)  # all with one or two modifiers
    rows = zoo_rows(examples, args.methods)
    if fetch.is_fetched(REAL_MODEL):
        rows += real_model_rows(examples, [m for m in args.methods if m not in REAL_MODEL_SKIPS])
    else:
        print(f"{REAL_MODEL} is not fetched (mechnorm fetch {REAL_MODEL}); zoo models only.")
    frame = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    frame.to_csv(RESULTS / "behaviour_check.csv", index=False)
    table = frame.pivot_table(index=["model", "target"], columns="method", values="share", sort=False)[args.methods]
    print(f"Subject noun ranked first, {len(examples)} held-out agreement examples, final layer:")
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
