"""A circuit the zoo can confirm: the recall models copy the cue value with one induction-style head.

On held-out recall prompts (``d 4 u 7 y 1 l 5 b 0 y`` → ``1``) the corrupted prompt changes the
queried key's value (``... y 3 ... y``), and the metric is ``logit[answer] − logit[new value]``.
Per example, with mechnorm's tools:

1. DLA per head (``direct_logit_attribution(by="head")``): the head writing most of the logit difference;
2. that head's attention from the last position: does it peak on the cue value?
3. its source-token attribution (``head_token_attribution``): does it peak on the cue value?
4. activation patching of every head (``where="head_out"``): does patching that head from the
   corrupted run's counterpart move the logit difference most?
5. attribution patching: does it rank heads like activation patching (Spearman over heads)?

Then SmolLM2-135M on one agreement sentence: top DLA heads, their attention, head patching,
attribution patching agreement, and DLA exactness (NMAE) on its RMSNorm.

Usage::

    python experiments/circuits.py            # ~2 min: 200 examples per zoo model + SmolLM2
    python experiments/circuits.py --n 50 --no-smollm

Writes ``results/circuits_recall_examples.csv`` (per example), ``circuits_recall_summary.csv``,
``circuits_smollm2_heads.csv`` and ``circuits_smollm2.txt``. ``tests/test_circuits_behaviour.py``
asserts the recall figures on other held-out examples.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

import mechnorm
from mechnorm import tasks
from mechnorm.tasks import vocab

RESULTS = Path(__file__).resolve().parent / "results"
ZOO_MODELS = ("gpt2-agree-recall", "llama-agree-recall")
HEAD_LABEL = r"L\d+H\d+"
SMOLLM_CLEAN, SMOLLM_CORRUPTED = "The keys to the old wooden cabinet", "The key to the old wooden cabinet"


def recall_pairs(examples, seed: int = 0):
    """Clean and corrupted batches (the queried value replaced by another digit) and the contrast target."""
    data = tasks.collate(examples)
    rng = random.Random(seed)
    corrupted = data.tokens.clone()
    new_values = []
    for i, example in enumerate(examples):
        value_pos = example.cue_positions[1]
        new = rng.choice([v for v in vocab.VALUES if vocab.token_id(v) != example.answer])
        corrupted[i, value_pos] = vocab.token_id(new)
        new_values.append(vocab.token_id(new))
    target = mechnorm.Target(ids=data.answers, foil=torch.tensor(new_values), positions=data.positions)
    clean = mechnorm.Batch(data.tokens, data.attention_mask)
    return clean, mechnorm.Batch(corrupted, data.attention_mask), target, data


def recall_circuit(model, examples, seed: int = 0) -> pd.DataFrame:
    """One row per example: the DLA top head and whether pattern, source attribution and patching agree."""
    clean, corrupted, target, data = recall_pairs(examples, seed)
    hooks = mechnorm.hooks_for("dla", "head_token_attribution") | mechnorm.HookFilter(
        patterns=frozenset({"blocks.{i}.attn.hook_pattern"}))
    _, cache = mechnorm.run_with_cache(model, clean, names_filter=hooks)
    head = mechnorm.UnembedHead(model)
    dla = mechnorm.direct_logit_attribution(cache, head, target, by="head", attention_mask=clean.attention_mask)
    hta = mechnorm.head_token_attribution(cache, head, target, attention_mask=clean.attention_mask)
    act = mechnorm.activation_patching(model, clean, corrupted, target, where="head_out", progress=False)
    att = mechnorm.attribution_patching(model, clean, corrupted, target, where="head_out")
    n_heads = int(model.cfg.n_heads)
    rows = []
    for b, example in enumerate(examples):
        value_pos, last = example.cue_positions[1], int(data.positions[b])
        top = int(dla.scores[:, b].argmax())
        block, h = divmod(top, n_heads)
        assert dla.labels[top] == f"L{block}H{h}"
        pattern = cache[f"blocks.{block}.attn.hook_pattern"][b, h, last, : last + 1]
        sources = hta.scores[block, h, b, : last + 1]
        patched = act.scores[:, b].flatten()  # [block * head], normalised
        approx = att.scores[:, b].flatten()
        rows.append({
            "example": b, "text": example.text, "n_pairs": example.meta["n_pairs"],
            "dla_top_head": f"L{block}H{h}", "dla_top": float(dla.scores[top, b]),
            "dla_second": float(dla.scores[:, b].topk(2).values[1]),
            "attention_on_value": float(pattern[value_pos]),
            "pattern_peaks_on_value": int(pattern.argmax()) == value_pos,
            "hta_peaks_on_value": int(sources.argmax()) == value_pos,
            "hta_value_share": float(sources[value_pos] / dla.scores[top, b]),
            "patch_top_head": "L{}H{}".format(*divmod(int(patched.argmax()), n_heads)),
            "patch_top_is_dla_top": int(patched.argmax()) == top,
            "patch_score_of_dla_top": float(patched[top]),
            "patch_second_score": float(patched.topk(2).values[1]),
            "clean_metric": float(act.clean_metric[b]), "corrupted_metric": float(act.corrupted_metric[b]),
            "spearman_attr_vs_act": float(pd.Series(approx.numpy()).corr(pd.Series(patched.numpy()), method="spearman")),
            "top_head_attr_is_act": int(approx.argmax()) == int(patched.argmax()),
        })
    frame = pd.DataFrame(rows)
    agreement = att.compare(act, k=3)
    frame.attrs.update({f"mean_{k}": v for k, v in agreement.items()})
    return frame, per_head(model, cache, data, examples, dla, hta, act, att)


def per_head(model, cache, data, examples, dla, hta, act, att) -> pd.DataFrame:
    """Every head's mean DLA, patching scores and attention from the last position to the cue value."""
    rows_b = torch.arange(len(examples))
    value_pos = torch.tensor([e.cue_positions[1] for e in examples])
    rows = []
    for block in range(int(model.cfg.n_layers)):
        pattern = cache[f"blocks.{block}.attn.hook_pattern"][rows_b, :, data.positions]  # [batch, head, src]
        for h in range(int(model.cfg.n_heads)):
            on_value = pattern[rows_b, h, value_pos]
            sources = hta.scores[block, h]
            sources = sources.masked_fill(~data.attention_mask, float("-inf"))
            rows.append({
                "head": f"L{block}H{h}", "dla_mean": float(dla.scores[dla.labels.index(f"L{block}H{h}")].mean()),
                "patching_mean": float(act.scores[block, :, h].mean()), "attribution_patching_mean": float(att.scores[block, :, h].mean()),
                "attention_on_value_mean": float(on_value.mean()),
                "pattern_peaks_on_value": float((pattern[:, h].argmax(-1) == value_pos).float().mean()),
                "hta_peaks_on_value": float((sources.argmax(-1) == value_pos).float().mean()),
            })
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame, heads: pd.DataFrame, name: str) -> dict:
    """Shares and medians of the per-example figures, and the head-level ranking."""
    mode = frame["dla_top_head"].mode()[0]
    by_dla, by_patch = heads.sort_values("dla_mean", ascending=False), heads.sort_values("patching_mean", ascending=False)
    return {
        "model": name, "n": len(frame),
        "top_head_by_mean_dla": by_dla["head"].iloc[0], "top_head_by_mean_patching": by_patch["head"].iloc[0],
        "top_mean_patching": by_patch["patching_mean"].iloc[0], "second_mean_patching": by_patch["patching_mean"].iloc[1],
        "heads_spearman_dla_vs_patching": float(heads["dla_mean"].corr(heads["patching_mean"], method="spearman")),
        "dla_top_head_mode": mode,
        "dla_top_is_mode": float((frame["dla_top_head"] == mode).mean()),
        "pattern_peaks_on_value": float(frame["pattern_peaks_on_value"].mean()),
        "attention_on_value_median": float(frame["attention_on_value"].median()),
        "hta_peaks_on_value": float(frame["hta_peaks_on_value"].mean()),
        "hta_value_share_median": float(frame["hta_value_share"].median()),
        "patch_top_is_dla_top": float(frame["patch_top_is_dla_top"].mean()),
        "patch_score_of_dla_top_median": float(frame["patch_score_of_dla_top"].median()),
        "patch_second_score_median": float(frame["patch_second_score"].median()),
        "spearman_attr_vs_act_median": float(frame["spearman_attr_vs_act"].median()),
        "spearman_attr_vs_act_min": float(frame["spearman_attr_vs_act"].min()),
        "top_head_attr_is_act": float(frame["top_head_attr_is_act"].mean()),
        **{k: v for k, v in frame.attrs.items()},
    }


def smollm2(lines: list[str]) -> pd.DataFrame:
    """Top DLA heads of SmolLM2-135M on one agreement sentence, their attention and patching."""
    model = mechnorm.load_model("smollm2-135m")
    clean, corrupted = mechnorm.tokenize(model, SMOLLM_CLEAN), mechnorm.tokenize(model, SMOLLM_CORRUPTED)
    target = mechnorm.contrast(" are", " is", model)
    hooks = mechnorm.hooks_for("dla") | mechnorm.HookFilter(patterns=frozenset({"blocks.{i}.attn.hook_pattern"}))
    logits, cache = mechnorm.run_with_cache(model, clean, names_filter=hooks)
    head = mechnorm.UnembedHead(model)
    dla = mechnorm.direct_logit_attribution(cache, head, target, by="head")
    exact = mechnorm.dla_exactness(cache, head, target)
    act = mechnorm.activation_patching(model, clean, corrupted, target, where="head_out", progress=False)
    att = mechnorm.attribution_patching(model, clean, corrupted, target, where="head_out")
    resid = mechnorm.activation_patching(model, clean, corrupted, target, where="resid_pre", progress=False)
    n_heads, tokens = int(model.cfg.n_heads), clean.strings[0]
    last = len(tokens) - 1
    rows = []
    for index in dla.scores[:, 0].abs().argsort(descending=True)[:10].tolist():
        block, h = divmod(index, n_heads)
        pattern = cache[f"blocks.{block}.attn.hook_pattern"][0, h, last]
        top_src = pattern.topk(2)
        rows.append({"head": dla.labels[index], "dla": float(dla.scores[index, 0]),
                     "patching": float(act.scores[block, 0, h]), "attribution_patching": float(att.scores[block, 0, h]),
                     "attends_to": f"{tokens[top_src.indices[0]]!r} {top_src.values[0]:.2f}, "
                                   f"{tokens[top_src.indices[1]]!r} {top_src.values[1]:.2f}"})
    frame = pd.DataFrame(rows)
    agreement = att.compare(act, k=10)
    subject = tokens.index(" keys")
    resid_subject = resid.scores[:, 0, subject]
    lines += [
        f"SmolLM2-135M, {SMOLLM_CLEAN!r} → ' are' − ' is' (corrupted: {SMOLLM_CORRUPTED!r})",
        f"tokens: {tokens}",
        f"clean logit diff {float(act.clean_metric[0]):.3f}, corrupted {float(act.corrupted_metric[0]):.3f}",
        f"DLA exactness (frozen RMSNorm scale vs recomputed), overall NMAE: {exact['nmae'].iloc[-1]:.4f}; "
        f"heads only, median per-head NMAE {exact[exact.component.str.fullmatch(HEAD_LABEL)]['nmae'].median():.4f}",
        f"head patching vs attribution patching over {agreement['n_units']} heads: Pearson {agreement['pearson']:.3f}, "
        f"Spearman {agreement['spearman']:.3f}, top-10 overlap {agreement['top_k_overlap']:.2f}",
        f"heads' patching scores sum to {float(act.scores.nansum()):.3f} (1 = the whole clean-corrupted gap)",
        "resid_pre patching at the subject ' keys' by layer: " + " ".join(f"{v:.2f}" for v in resid_subject.tolist()),
        "resid_pre patching at the last token by layer: " + " ".join(f"{v:.2f}" for v in resid.scores[:, 0, last].tolist()),
        "top-10 heads by |DLA|:", frame.to_string(index=False),
    ]
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--no-smollm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    examples = tasks.get_task("recall").test(args.n)
    frames, head_frames, summaries = [], [], []
    for name in ZOO_MODELS:
        model = mechnorm.load_model(f"zoo:{name}")
        frame, heads = recall_circuit(model, examples)
        frames.append(frame.assign(model=name))
        head_frames.append(heads.assign(model=name))
        summaries.append(summarise(frame, heads, name))
        print(name, "\n", heads.round(3).to_string(index=False))
    pd.concat(frames).to_csv(RESULTS / "circuits_recall_examples.csv", index=False)
    pd.concat(head_frames).to_csv(RESULTS / "circuits_recall_heads.csv", index=False)
    summary = pd.DataFrame(summaries)
    summary.to_csv(RESULTS / "circuits_recall_summary.csv", index=False)
    print(summary.T.to_string())
    if not args.no_smollm:
        lines: list[str] = []
        smollm2(lines).to_csv(RESULTS / "circuits_smollm2_heads.csv", index=False)
        (RESULTS / "circuits_smollm2.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
