"""Layer-wise evidence alignment: NormXLogit against GlobEnc¬, ALTI¬, Value Zeroing, rollout (the paper's experiment 2).

At every layer l (blocks applied) each method scores the tokens for the prediction; the score
row is compared with the task's evidence tokens (the subject noun for agreement, the lexicon
cue words for the BERT classifier), over the ranked tokens: every real token except the
prediction position and a special first token ([BOS]/[CLS]).

* **Dot Product** (the paper's DP): softmax of the scores over the ranked tokens, summed on
  the evidence tokens. Random baseline: the evidence share ``R/N`` (uniform softmax).
* **Average Precision** against the evidence tokens (``mechnorm.evaluate.average_precision``);
  random baseline ``mechnorm.evaluate.expected_random_ap``.
* **AUROC**: probability that an evidence token outscores a non-evidence one (ties ½);
  random baseline 0.5.

Models: the zoo's GPT-2 and Llama on agreement, SmolLM2-135M on the same sentences (capitalised,
as ``behaviour_check.py``; when fetched), the zoo's BERT on lexicon. Each method explains the
model's own prediction. GlobEnc¬ and ALTI¬ are the per-layer matrices (``aggregate="none"``),
as in the paper's comparison; Value Zeroing is per layer too.

Usage::

    python experiments/layerwise.py                 # 200 per zoo model, 50 on SmolLM2: a few minutes
    python experiments/layerwise.py --n 50 --n-real 20

Writes ``results/layerwise_scores.csv`` (one row per model, method, layer, metric),
``results/layerwise_summary.csv`` (best layer and last layer per method) and
``results/layerwise_<metric>.{png,svg,pdf,html}`` (score per layer, one line per method, one panel per model).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

import mechnorm
from mechnorm import evaluate, fetch, tasks, zoo
from mechnorm.evaluate.compute import random_attribution
from mechnorm.inputs import prediction_positions

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {  # label -> (registered name, options)
    "NormXLogit": ("normxlogit", {}),
    "LogAt": ("logat", {}),
    "GlobEnc¬": ("globenc", {"aggregate": "none"}),
    "ALTI¬": ("alti", {"aggregate": "none"}),
    "Value Zeroing": ("value_zeroing", {}),
    "rollout": ("rollout", {}),
}
METRICS = ("dot_product", "average_precision", "auroc")
REAL_MODEL = "smollm2-135m"


def ranked_tokens(model, tokens, mask) -> torch.Tensor:
    """Real tokens except the prediction position and a special first token ([BOS]/[CLS])."""
    valid = mask.clone()
    rows = torch.arange(len(mask))
    valid[rows, prediction_positions(model, mask)] = False
    special = {getattr(model.tokenizer, name, None) for name in ("bos_token_id", "cls_token_id")} - {None}
    first = mask.float().argmax(-1)
    is_special = torch.tensor([int(tokens[b, first[b]]) in special for b in range(len(mask))])
    valid[rows[is_special], first[is_special]] = False
    return valid


def dot_product(scores, cues, valid) -> torch.Tensor:
    """``Σ_cues softmax(scores over valid tokens)`` per layer and sequence: ``[layer, batch]``."""
    probs = scores.masked_fill(~valid, float("-inf")).softmax(-1)
    return (probs * cues).sum(-1)


def auroc(scores, cues, valid) -> torch.Tensor:
    """``P(s_cue > s_other) + ½ P(tie)`` over valid tokens, per layer and sequence: ``[layer, batch]``."""
    pos = (cues & valid)[:, :, None]  # [batch, cue, 1]
    neg = (~cues & valid)[:, None, :]  # [batch, 1, other]
    s = scores.nan_to_num(0.0)
    wins = (s[..., :, None] > s[..., None, :]).float() + 0.5 * (s[..., :, None] == s[..., None, :]).float()
    pairs = (pos & neg).float()
    return (wins * pairs).sum((-1, -2)) / pairs.sum((-1, -2))


def layer_rows(model_name, label, scores, layers, cues, valid) -> list[dict]:
    values = {
        "dot_product": dot_product(scores, cues, valid),
        "average_precision": evaluate.average_precision(scores, cues, valid, exclude=~valid),
        "auroc": auroc(scores, cues, valid),
    }
    rows = []
    for metric, per_sequence in values.items():
        means = per_sequence.nanmean(-1)
        for layer, value in zip(layers, means.tolist()):
            rows.append(dict(model=model_name, method=label, layer=layer, metric=metric, value=value))
    return rows


def baseline_rows(model_name, layers, cues, valid) -> list[dict]:
    n_tokens, n_cues = valid.sum(-1), (cues & valid).sum(-1)
    ap = torch.tensor([evaluate.expected_random_ap(int(n), int(r)) for n, r in zip(n_tokens, n_cues)]).mean()
    values = {"dot_product": float((n_cues / n_tokens).mean()), "average_precision": float(ap), "auroc": 0.5}
    return [dict(model=model_name, method="random (expected)", layer=layer, metric=m, value=v)
            for m, v in values.items() for layer in layers]


def evaluate_model(model_name, model, tokens, mask, cue_positions, head=None, batch_size=16) -> list[dict]:
    methods = [name for name, _ in METHODS.values()]
    options = {name: opts for name, opts in METHODS.values() if opts}
    clock = time.perf_counter()
    comparison = mechnorm.attribute(model, mechnorm.Batch(tokens, mask), methods=methods, head=head,
                                    options=options, batch_size=batch_size, progress=False)
    cues = evaluate.cue_indicator(cue_positions, mask)
    valid = ranked_tokens(model, tokens, mask)
    layers = list(range(model.cfg.n_layers + 1))
    rows = []
    for label, (name, _) in METHODS.items():
        attr = comparison[name]
        assert list(attr.layers) == layers, (name, attr.layers)
        rows += layer_rows(model_name, label, attr.scores, layers, cues, valid)
    rand = random_attribution(mask, seed=0).scores.expand(len(layers), -1, -1)
    rows += layer_rows(model_name, "random", rand, layers, cues, valid)
    rows += baseline_rows(model_name, layers, cues, valid)
    seconds = {k: round(v, 1) for k, v in comparison.seconds.items()}
    print(f"{model_name}: {len(tokens)} sequences in {time.perf_counter() - clock:.0f} s {seconds}", flush=True)
    return rows


def zoo_lm(name, n, kind) -> list[dict]:
    data = tasks.collate(tasks.get_task("agreement").test(n))
    model = mechnorm.load_model(f"zoo:{name}", kind=kind)
    return evaluate_model(name, model, data.tokens, data.attention_mask, data.cue_positions)


def zoo_bert(n, kind) -> list[dict]:
    data = tasks.collate(tasks.get_task("lexicon").test(n))
    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    return evaluate_model("bert-lexicon", model, data.tokens, data.attention_mask, data.cue_positions,
                          head=zoo.classifier_head("bert-lexicon"))


def real_model(n, kind) -> list[dict]:
    """The agreement sentences, capitalised, through SmolLM2's own tokenizer; cues = the subject's tokens."""
    model = mechnorm.load_model(REAL_MODEL, kind=kind)
    texts, subjects = [], []
    for example in tasks.get_task("agreement").test(n):
        words = example.text.split()
        texts.append(" ".join(["The", *words[1:]]))
        start, end = len("The "), len("The ") + len(words[1])
        offsets = model.tokenizer(texts[-1], return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        subjects.append([i for i, (a, b) in enumerate(offsets) if a < end and b > start])
    batch = mechnorm.tokenize(model, texts)
    return evaluate_model(REAL_MODEL, model, batch.tokens, batch.attention_mask, subjects, batch_size=10)


def figure(frame: pd.DataFrame, metric: str) -> go.Figure:
    models = list(dict.fromkeys(frame["model"]))
    fig = make_subplots(rows=1, cols=len(models), subplot_titles=models, shared_yaxes=True)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f", "#000000"]
    labels = list(METHODS) + ["random", "random (expected)"]
    for col, model in enumerate(models, start=1):
        for i, label in enumerate(labels):
            part = frame[(frame.model == model) & (frame.method == label) & (frame.metric == metric) & (frame.layer > 0)]
            dash = "dot" if label.startswith("random") else None
            fig.add_trace(go.Scatter(x=part.layer, y=part.value, name=label, legendgroup=label, showlegend=col == 1,
                                     mode="lines+markers", line=dict(color=palette[i], dash=dash)), row=1, col=col)
        fig.update_xaxes(title_text="layer (blocks applied)", row=1, col=col)
    fig.update_yaxes(title_text=metric.replace("_", " "), row=1, col=1)
    fig.update_layout(title=f"Layer-wise evidence alignment: {metric.replace('_', ' ')}", width=380 * len(models), height=420)
    return mechnorm.plot.apply_theme(fig)


def matplotlib_png(frame: pd.DataFrame, metric: str, path: Path) -> None:
    """The same figure as :func:`figure`, drawn with matplotlib where plotly cannot export a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(frame["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.8 * len(models), 3.6), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        for label in list(METHODS) + ["random", "random (expected)"]:
            part = frame[(frame.model == model) & (frame.method == label) & (frame.metric == metric) & (frame.layer > 0)]
            ax.plot(part.layer, part.value, ":" if label.startswith("random") else "-o", markersize=3, label=label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("layer (blocks applied)")
    axes[0][0].set_ylabel(metric.replace("_", " "))
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model, method and metric: the value at the last layer, the best layer and its value."""
    rows = []
    for (model, method, metric), part in frame[frame.layer > 0].groupby(["model", "method", "metric"], sort=False):
        best = part.loc[part.value.idxmax()]
        rows.append(dict(model=model, method=method, metric=metric, last=part.value.iloc[-1],
                         best=best.value, best_layer=int(best.layer)))
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="examples per zoo model")
    parser.add_argument("--n-real", type=int, default=50, help=f"sentences for {REAL_MODEL} (0 to skip)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    kind = "hooked" if mechnorm.models.hooked_available() else "bridge"
    rows = zoo_lm("gpt2-agree-recall", args.n, kind) + zoo_lm("llama-agree-recall", args.n, kind)
    if args.n_real and fetch.is_fetched(REAL_MODEL):
        rows += real_model(args.n_real, kind)
    elif args.n_real:
        print(f"{REAL_MODEL} is not fetched (mechnorm fetch {REAL_MODEL}); skipped.")
    rows += zoo_bert(args.n, kind)
    frame = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    frame.to_csv(RESULTS / "layerwise_scores.csv", index=False)
    table = summary(frame)
    table.to_csv(RESULTS / "layerwise_summary.csv", index=False)
    for metric in METRICS:
        fig = figure(frame, metric)
        fig.write_html(RESULTS / f"layerwise_{metric}.html", include_plotlyjs="cdn")
        try:
            mechnorm.plot.save(fig, RESULTS / f"layerwise_{metric}", formats=["png", "svg", "pdf"])
        except Exception as error:  # kaleido needs a Chrome/Chromium; there is none offline
            print(f"plotly static export of {metric} skipped ({type(error).__name__}); PNG drawn with matplotlib")
            matplotlib_png(frame, metric, RESULTS / f"layerwise_{metric}.png")
        wide = table[table.metric == metric].pivot_table(index="method", columns="model", values=["last", "best"],
                                                         sort=False)
        print(f"\n{metric} (last layer / best layer):\n{wide.round(3).to_string()}")


if __name__ == "__main__":
    main()
