"""Which attribution method tells the truth? The NormXLogit paper's evaluation on the zoo models.

For every zoo model and task it was trained on (mechnorm.tasks, whose cue tokens are known):

* comprehensiveness and sufficiency, K = 10…90 %, confidence drop and accuracy, AOPC;
* evidence alignment (average precision, cue mass) at every layer of layer-wise methods;
* time per instance (single thread) and the largest batch that fits an 8 GiB budget;
* rank agreement between methods, and the cascading model-randomisation sanity check
  (every model, on its first task).

Methods: NormXLogit, LogAt, ℓ2 embedding norm, integrated gradients, grad × input,
saliency (gradient norm), attention rollout, DecompX, ALTI-Logit (decoders only), GlobEnc,
ALTI, Value Zeroing (those registered), random (mean of 3 seeds). On the BERT classifier
the gradient methods differentiate its classifier head at [CLS], as NormXLogit reads it.

Usage::

    python experiments/faithfulness.py                 # zoo models (waits for them to exist)
    python experiments/faithfulness.py --dev --n 32    # untrained stand-ins, to test the script

Writes ``experiments/results/faithfulness*.csv``, ``faithfulness_*.html`` and the printed report
``faithfulness_report.txt``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import mechnorm
from mechnorm import evaluate, tasks, zoo

RESULTS = Path(__file__).resolve().parent / "results"
SETUPS = [  # (zoo model, task)
    ("gpt2-agree-recall", "agreement"),
    ("gpt2-agree-recall", "recall"),
    ("llama-agree-recall", "agreement"),
    ("llama-agree-recall", "recall"),
    ("bert-lexicon", "lexicon"),
]
METHODS = ("normxlogit", "logat", "embedding_norm", "integrated_gradients", "grad_x_input", "saliency", "rollout",
           "decompx", "alti_logit", "globenc", "alti", "value_zeroing", "random")
DECODER_ONLY = ("alti_logit",)  # explains a pre-LN residual stream (Ferrando et al. 2023): not BERT
BUDGET_BYTES = 8 * 2**30
MEMORY_BATCHES = (8, 64)
IG_STEPS = 50  # mechnorm's default n_steps for integrated gradients
HEADLINE = ["comprehensiveness", "comprehensiveness_accuracy", "sufficiency", "sufficiency_accuracy",
            "average_precision", "cue_mass", "seconds_per_instance"]


def load(name: str, dev: bool, tmp: Path, zoo_dir: Path | None = None):
    """(model, head) for a zoo model (from ``zoo_dir`` when given), or an untrained stand-in with ``dev``."""
    encoder = name.startswith("bert")
    if zoo_dir is not None:
        model = mechnorm.load_model(zoo_dir / name)
        return model, zoo.classifier_head(zoo_dir / name) if encoder else None
    if not dev:
        model = mechnorm.load_model(f"zoo:{name}")  # BERT loads as a HookedEncoder
        return model, zoo.classifier_head(name) if encoder else None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_zoo  # the zoo's own model definitions, left untrained

    torch.manual_seed(0)
    folder = tmp / name
    build = {"gpt2": train_zoo.build_gpt2, "llama": train_zoo.build_llama, "bert": train_zoo.build_bert}[name.split("-")[0]]
    build().save_pretrained(folder)
    tasks.tokenizer("cls" if encoder else "lm").save_pretrained(folder)
    model = mechnorm.load_model(folder)
    head = mechnorm.LinearHead(torch.randn(2, model.cfg.d_model), torch.zeros(2), norm=mechnorm.FinalNorm("layernorm", eps=1e-12)) if encoder else None
    return model, head


def methods_for(name: str) -> tuple[list[str], dict, str]:
    """The methods run on a model, their options, and a note on the choices made."""
    registered = set(mechnorm.list_methods()["name"]) | {evaluate.RANDOM}
    methods = [m for m in METHODS if m in registered and not (name.startswith("bert") and m in DECODER_ONLY)]
    if name.startswith("llama"):  # RMSNorm first: a zero (or zero pad) baseline sits on its singularity
        return methods, {"integrated_gradients": {"baseline": "mean"}}, "integrated gradients from the mean-embedding baseline"
    return methods, {}, ""


def memory_rows(model, head, examples, methods, options) -> list[dict]:
    """Peak RSS rise of each method at two batch sizes → MB per instance and the largest batch in budget.

    Integrated gradients runs all its steps in one pass here (captum's ``internal_batch_size``
    = batch × steps), the unchunked setting the paper's batch-size comparison describes;
    mechnorm's default caps the tokens per pass, which bounds IG's memory at the cost of time.
    """
    data = evaluate.as_eval_data(examples[: max(MEMORY_BATCHES)])
    predictor = evaluate.Predictor(model, head)
    rows = []
    for method in methods:
        if method == evaluate.RANDOM:
            continue
        peaks = {}
        for size in MEMORY_BATCHES:
            part = data[:size]
            target = evaluate.predict(predictor, part)
            opts = dict(options)
            if method == "integrated_gradients":
                opts[method] = {**options.get(method, {}), "internal_batch_size": size * IG_STEPS}
            run = lambda: evaluate.attributions(model, part, [method], target, head, batch_size=size, options=opts)  # noqa: E731
            run()  # warm-up
            peaks[size] = min(evaluate.measure(run)[2] for _ in range(2))
        fit = evaluate.max_batch(peaks, BUDGET_BYTES)
        rows.append({"method": method, **{f"peak_mb@{b}": p / 2**20 for b, p in peaks.items()}, **fit})
    return rows


def constant_share(attrs: dict, ranked, threshold: float = 0.5) -> dict[str, float]:
    """Methods whose headline scores are constant over the ranked tokens of most sequences."""
    out = {}
    for method, attr in attrs.items():
        row = attr.row(-1).masked_fill(~ranked, float("nan"))
        spread = row.nan_to_num(float("-inf")).amax(-1) - row.nan_to_num(float("inf")).amin(-1)
        share = float((spread <= 1e-12).float().mean())
        if share > threshold:
            out[method] = share
    return out


def warnings_summary(caught, spans: dict[str, tuple[int, int]]) -> str:
    """Warnings raised during the run, counted; integrated gradients' non-convergence summarised
    per setup (``spans``: setup -> the slice of ``caught`` its evaluation raised)."""
    lines, counts = [], {}
    for label, (start, stop) in spans.items():
        off = [int(re.search(r"up to (\d+)%", str(w.message)).group(1)) for w in caught[start:stop]
               if str(w.message).startswith("Integrated gradients did not converge")]
        if off:
            lines.append(f"note: {label}: integrated gradients ({IG_STEPS} steps) did not converge on {len(off)} batch "
                         f"calls (the timing warm-up included): completeness off by up to {min(off)}–{max(off)}% (median {sorted(off)[len(off) // 2]}%) "
                         "of f(x) − f(baseline)")
    for w in caught:
        message = str(w.message)
        if not message.startswith("Integrated gradients did not converge"):
            counts[message.split(". ")[0]] = counts.get(message.split(". ")[0], 0) + 1
    lines += [f"warning ({n}×): {text}" for text, n in counts.items()]
    return "\n".join(lines)


def curves_html(frame: pd.DataFrame) -> str:
    """Comprehensiveness and sufficiency against K, one ``mechnorm.plot.faithfulness_curves`` per setup and metric."""
    parts = []
    for (model, task), block in frame.groupby(["model", "task"], sort=False):
        for metric in ("comprehensiveness", "sufficiency"):
            fig = mechnorm.plot.faithfulness_curves(block, metric=metric)
            fig.update_layout(title=f"{model} / {task}: {metric} ({evaluate.get_metric(metric).arrow})")
            parts.append(fig.to_html(full_html=False, include_plotlyjs="cdn" if not parts else False))
    return "<html><body>" + "\n".join(parts) + "</body></html>"


def layers_figure(frame: pd.DataFrame):
    """Average precision against the cue tokens at every layer of the layer-wise methods."""
    import plotly.express as px

    ap = frame[(frame.metric == "average_precision") & frame.method.isin(["normxlogit", "logat"])].copy()
    ap["setup"] = ap.model + " / " + ap.task
    return px.line(ap, x="layer", y="value", color="method", facet_col="setup", markers=True,
                   labels={"value": "average precision", "layer": "layer (blocks applied)"},
                   title="Evidence alignment per layer")


def summary_text(table: pd.DataFrame) -> str:
    """Where NormXLogit ranks, per setup and metric, in words (computed from the table)."""
    lines = []
    for (model, task), block in table.groupby(["model", "task"], sort=False):
        block = block.set_index("method")
        parts = []
        for metric in ("comprehensiveness", "sufficiency", "average_precision", "seconds_per_instance"):
            if metric not in block or block[metric].isna().all():
                continue
            spec = evaluate.get_metric(metric)
            values = block[metric].drop(index="random") if spec.family == "cost" else block[metric]
            order = values.sort_values(ascending=spec.lower_is_better)
            place = list(order.index).index("normxlogit") + 1
            best = order.index[0]
            text = f"{metric} {block.loc['normxlogit', metric]:.4g} (#{place}/{len(order)}"
            text += "" if best == "normxlogit" else f", best {best} {order.iloc[0]:.4g}"
            text += f", random {block.loc['random', metric]:.4g})" if spec.family != "cost" else ")"
            parts.append(text)
        lines.append(f"- {model} / {task}: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="test examples per task")
    parser.add_argument("--dev", action="store_true", help="untrained stand-ins instead of the zoo models")
    parser.add_argument("--wait", type=float, default=0, help="minutes to wait for the zoo models to appear")
    parser.add_argument("--zoo-dir", type=Path, help="read zoo-format models from this folder instead of mechnorm/zoo")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true",
                        help="faithfulness, alignment and agreement only: no memory fit, no randomisation check")
    args = parser.parse_args()
    torch.set_num_threads(1)  # timings on one core: the machine is shared, and ratios are what matter
    start = time.perf_counter()
    deadline = time.time() + 60 * args.wait
    root = args.zoo_dir or zoo.ROOT
    ready = lambda name: args.dev or (root / name / "config.json").exists()  # noqa: E731
    while not all(ready(n) for n, _ in SETUPS) and time.time() < deadline:
        time.sleep(30)
    setups = [(n, t) for n, t in SETUPS if ready(n)]
    missing = sorted({n for n, _ in SETUPS if not ready(n)})
    if missing:
        print(f"note: zoo model(s) {missing} not found under {root}; their rows are left out "
              "(train them with experiments/train_zoo.py).")
    if not setups:
        sys.exit("No zoo model to evaluate; train them (experiments/train_zoo.py) or pass --dev.")

    frames, memory, agreement, notes, spans = [], [], [], {}, {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = {}
        for name, task in setups:
            if name not in loaded:
                loaded[name] = load(name, args.dev, Path(tmp), args.zoo_dir)
            model, head = loaded[name]
            methods, options, note = methods_for(name)
            if note:
                notes[name] = note
            examples = tasks.get_task(task).test(args.n)
            clock, first_warning = time.perf_counter(), len(caught)
            frame = evaluate.run(model, examples, methods, head=head, batch_size=16, options=options, n_seeds=3)
            spans[f"{name} / {task}"] = (first_warning, len(caught))
            print(f"{name} / {task}: {len(examples)} examples, {time.perf_counter() - clock:.0f} s")
            frames.append(frame.assign(model=name, task=task))
            if not args.quick:
                memory += [dict(row, model=name, task=task) for row in memory_rows(model, head, examples, methods, options)]
            data = evaluate.as_eval_data(examples[:64])
            predictor = evaluate.Predictor(model, head)
            target = evaluate.predict(predictor, data)
            attrs = evaluate.attributions(model, data, methods, target, head, options=options)
            protected = predictor.protected(data.tokens, data.attention_mask, target.positions)
            for method, share in constant_share(attrs, data.attention_mask & ~protected).items():
                notes[f"{name} / {task} / {method}"] = (f"scores are constant over the ranked tokens of {share:.0%} of "
                                                        "sequences: its ranking carries no information there")
            agreement.append(evaluate.rank_agreement(attrs, exclude=protected).assign(model=name, task=task))
        randomization = []
        for name, task in ({} if args.quick else dict(reversed(setups))).items():  # each model on its first task
            # integrated gradients left out: L + 1 extra IG runs per model for little news
            model, head = loaded[name]
            methods, options, _ = methods_for(name)
            randomization.append(evaluate.randomization_check(
                model, tasks.get_task(task).test(64), [m for m in methods if m != "integrated_gradients"], head=head, options=options,
            ).assign(model=name, task=task))
        randomization = pd.concat(randomization, ignore_index=True) if randomization else pd.DataFrame(
            columns=["model", "task", "method", "n_randomized", "spearman"])

    frame = pd.concat(frames, ignore_index=True)
    memory = pd.DataFrame(memory, columns=["model", "task", "method", "mb_per_instance", "max_batch"]) if not memory else pd.DataFrame(memory)
    table = pd.concat(
        [evaluate.table(f.drop(columns=["model", "task"]), arrows=False).reset_index().assign(model=f.model.iloc[0], task=f.task.iloc[0])
         for f in frames], ignore_index=True,
    )
    table = table.merge(memory[["model", "task", "method", "mb_per_instance", "max_batch"]], how="left", on=["model", "task", "method"])
    table = table[["model", "task", "method", *[m for m in HEADLINE if m in table], "mb_per_instance", "max_batch"]]
    layers = frame[frame.metric == "average_precision"].pivot_table(index=["model", "task", "method"], columns="layer", values="value")

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_dev" if args.dev else ""
    frame.to_csv(args.out / f"faithfulness{suffix}.csv", index=False)
    table.to_csv(args.out / f"faithfulness_summary{suffix}.csv", index=False)
    memory.to_csv(args.out / f"faithfulness_memory{suffix}.csv", index=False)
    pd.concat(agreement).to_csv(args.out / f"faithfulness_agreement{suffix}.csv", index=False)
    randomization.to_csv(args.out / f"faithfulness_randomization{suffix}.csv", index=False)
    layers.to_csv(args.out / f"faithfulness_layers{suffix}.csv")
    (args.out / f"faithfulness_curves{suffix}.html").write_text(curves_html(frame))
    layers_figure(frame).write_html(args.out / f"faithfulness_layers{suffix}.html", include_plotlyjs="cdn")

    pd.set_option("display.width", 250, "display.max_columns", 30, "display.max_rows", 200)
    lines: list[str] = []
    emit = lambda text: (print(text), lines.append(str(text)))  # noqa: E731
    emit("\nAOPC over K = 10…90 % (confidence drop; accuracy vs gold), alignment at the last layer, cost:")
    emit(table.round(4).to_string(index=False))
    emit("\nAverage precision against the cue tokens per layer (random baseline = method 'random'):")
    emit(layers.round(3).to_string())
    emit(f"\nMemory: peak RSS rise (MB) at batch sizes {MEMORY_BATCHES}, fitted as fixed + per-instance × batch, "
         "→ largest batch in 8 GiB (IG with all 50 steps in one pass):")
    emit(memory.round(3).to_string(index=False))
    emit("\nModel randomisation: Spearman with the original attributions by randomised blocks (from the top):")
    if len(randomization):
        emit(randomization.pivot_table(index=["model", "task", "method"], columns="n_randomized", values="spearman").round(3).to_string())
    else:
        emit("(not run: --quick)")
    emit("\nWhere NormXLogit ranks:")
    emit(summary_text(table))
    for name, note in notes.items():
        emit(f"note: {name}: {note}")
    emit(warnings_summary(caught, spans))
    emit(f"\ntotal run time {time.perf_counter() - start:.0f} s")

    (args.out / f"faithfulness_report{suffix}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
