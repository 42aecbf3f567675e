"""The main job behind ``make demo``: explain a real LLM's predictions, fast, and say how.

Runs SmolLM2-135M-Instruct (fetched from a package registry, see ``mechnorm fetch``) on a
few sentences — agreement through an attractor, a factual recall, an induction pattern —
with NormXLogit, the cache methods and the fast gradient baselines, prints a summary a
researcher reads in half a minute (the prediction and its probability, what the score is,
each method's top tokens with their scores, the methods' agreement), and writes an HTML
report with the layer-by-layer heatmaps. Integrated gradients (minutes on two CPU cores)
runs with ``--full``; the output says so and prints its completeness gap when it runs.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

DEFAULT_MODEL = "smollm2-135m"
#: what ``mechnorm demo`` runs by default: a minute on two busy CPU cores
FAST_METHODS = ("normxlogit", "logat", "embedding_norm", "rollout", "saliency", "grad_x_input")
#: ``mechnorm demo --full`` adds integrated gradients
DEMO_METHODS = (*FAST_METHODS, "integrated_gradients")
#: IG steps under --full: on the demo sentences the completeness gap is up to 72 % at 32 steps
#: and within 5 % at 100 (measured on SmolLM2, signed sum)
IG_STEPS = 100
_IG_STEPS_PER_PASS = 10


@dataclass(frozen=True)
class DemoCase:
    """One sentence to explain, and what it shows."""

    name: str
    text: str
    note: str


CASES = (
    DemoCase("agreement", "The keys to the old wooden cabinet", "number agreement through the attractor 'cabinet'"),
    DemoCase("factual recall", "The Eiffel Tower is located in the city of", "a fact recalled from the subject"),
    DemoCase("induction", "Mr Dursley and Mrs Potter went home. Then Mr Dursley and Mrs", "copying a name seen earlier"),
)


def top_tokens_table(comparison, k: int = 3) -> pd.DataFrame:
    """One row per (sentence, method): the method's top-k tokens with their scores at its last
    layer, largest first, protected positions (prediction position, BOS, a sink) left out.

    Example:
        >>> top_tokens_table(mechnorm.attribute(model, ["The keys to the"]), k=3)  # doctest: +SKIP
    """
    rows = []
    for method in comparison.methods:
        top = comparison[method].top_k(k)
        for b, group in top.groupby("batch"):
            labels = group["label"] if "label" in group else group.token.map(repr)
            cells = [f"{label} {_number(score)}" for label, score in zip(labels, group.score)]
            rows.append({"batch": b, "method": method, "top tokens (score)": " | ".join(cells)})
    return pd.DataFrame(rows, columns=["batch", "method", "top tokens (score)"])


def prediction_lines(comparison) -> list[str]:
    """Per sequence: the explained prediction and, when known, its probability.

    Example:
        >>> prediction_lines(comparison)                                # doctest: +SKIP
        ["' are' (p = 0.41)"]
    """
    from .report import predicted_labels

    labels = predicted_labels(comparison)
    probs = next((a.target_probs for a in comparison.attributions.values()
                  if getattr(a, "target_probs", None) is not None), None)
    return [f"{label!r}" + ("" if probs is None else f" (p = {float(probs[b]):.2f})") for b, label in enumerate(labels)]


def score_statement(attribution, batch: int = 0) -> str:
    """One sentence saying what an attribution's score is for sequence ``batch``
    (the result's own ``describe()``; the registry's description where it has none).

    Example:
        >>> score_statement(comparison["normxlogit"], 0)               # doctest: +SKIP
    """
    describe = getattr(attribution, "describe", None)
    if callable(describe):
        return describe(batch)
    from .methods.registry import get_method

    return get_method(attribution.method).description


def run_demo(model_name: str = DEFAULT_MODEL, out: str | Path = "mechnorm-demo.html", kind: str | None = None,
             full: bool = False, k: int = 3) -> Path:
    """Explain the demo sentences, print the summary, write the HTML report; returns its path.

    Args:
        model_name: what :func:`mechnorm.load_model` loads (default: SmolLM2-135M).
        out: the HTML report.
        kind: ``"hooked"`` or ``"bridge"`` (default: the installed TransformerLens line's).
        full: also run integrated gradients at :data:`IG_STEPS` steps (minutes on a CPU).
        k: top tokens printed per method.

    Example:
        >>> from mechnorm.demo import run_demo
        >>> run_demo("zoo:gpt2-agree-recall", "demo.html")                 # doctest: +SKIP
    """
    import mechnorm
    from tqdm.auto import tqdm

    from .compare import Comparison
    from .report import write_report

    start = time.perf_counter()
    print(f"mechnorm demo: loading {model_name} ...", flush=True)
    model = mechnorm.load_model(model_name, kind=kind)
    batch = mechnorm.tokenize(model, [case.text for case in CASES])
    methods = DEMO_METHODS if full else FAST_METHODS
    cache_methods = tuple(m for m in methods if not mechnorm.get_method(m).needs_gradients)
    groups = [cache_methods] + [(m,) for m in methods if m not in cache_methods]
    attributions, seconds = {}, {}
    with tqdm(groups, desc="methods", unit="method", total=len(groups)) as bar:
        for group in bar:
            bar.set_postfix_str(", ".join(group) if len(group) < 3 else "cache methods (one forward pass)")
            ig = group == ("integrated_gradients",)  # signed, so its completeness gap can be printed
            options = {group[0]: {"n_steps": IG_STEPS, "reduce": "sum",
                                  "internal_batch_size": len(batch) * _IG_STEPS_PER_PASS}} if ig else None
            with _ig_progress(model, len(batch)) if ig else nullcontext():
                part = mechnorm.attribute(model, batch, methods=group, options=options, progress=False)
            attributions.update(part.attributions)
            seconds.update({m: part.seconds[m] + part.seconds["forward"] / len(group) for m in group})
    comparison = Comparison({m: attributions[m] for m in methods}, batch, seconds)
    _print_summary(comparison, model_name, model, full, k, time.perf_counter() - start)
    path = write_report(comparison, Path(out), title=f"mechnorm demo — {model_name}")
    print(f"HTML report (layer-by-layer heatmaps, every method's token highlights): {path}")
    return path


def _print_summary(comparison, model_name, model, full, k, elapsed) -> None:
    table = top_tokens_table(comparison, k)
    predictions = prediction_lines(comparison)
    print(f"\nmechnorm demo on {model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}): "
          f"{len(CASES)} sentences, {len(comparison)} methods, {elapsed:.0f} s\n")
    print(f"Top {k} tokens per method at its last layer with their scores, largest first; the prediction "
          "position itself and a leading BOS (and, for attention-following methods, the attention sink) "
          "are not ranked. Each method's score is defined in the HTML report.\n")
    for b, case in enumerate(CASES):
        print(f"[{case.name}] {case.text!r} -> {predictions[b]}   ({case.note})")
        if "normxlogit" in comparison.methods:
            print(f"  score: {score_statement(comparison['normxlogit'], b)}")
        rows = table[table.batch == b]
        width = max(len(m) for m in rows.method)
        for method, cells in zip(rows.method, rows["top tokens (score)"]):
            print(f"  {method:<{width}}  {cells}")
        print()
    print("Method agreement (Spearman over each sentence's tokens, final layer, mean over sentences):")
    agreement = comparison.agreement().round(2)
    agreement.index = [f"{i + 1} {name}" for i, name in enumerate(agreement.index)]
    agreement.columns = [str(i + 1) for i in range(len(agreement.columns))]  # fits 80 columns
    print(agreement.to_string(), end="\n\n")
    print("Seconds per method: " + ", ".join(f"{m} {s:.1f}" for m, s in comparison.seconds.items()))
    if full:
        print(_ig_convergence(comparison["integrated_gradients"]))
    else:
        print(f"Skipped: integrated_gradients ({IG_STEPS} steps, several minutes on two CPU cores). "
              "Run `mechnorm demo --full` to include it, with its completeness gap per sentence.")


def _ig_convergence(attribution) -> str:
    """IG's completeness gap |Σ scores − (f(x) − f(baseline))| / |f(x) − f(baseline)| per sentence."""
    delta = attribution.metadata["convergence_delta"].float()
    total = attribution.row(-1).nan_to_num().sum(-1)  # signed sum (reduce="sum")
    gaps = (delta.abs() / (total - delta).abs().clamp_min(1e-6)).tolist()
    verdict = "converged (< 5 %)" if max(gaps) < 0.05 else "NOT converged: raise n_steps"
    steps = attribution.metadata.get("n_steps", IG_STEPS)
    return (f"integrated_gradients at {steps} steps, completeness gap per sentence: "
            + ", ".join(f"{g:.1%}" for g in gaps) + f" -> {verdict}")


@contextmanager
def _ig_progress(model, batch_size: int):
    """A progress bar over IG's step batches: counts the forward passes that carry more than
    the batch itself (each carries ``_IG_STEPS_PER_PASS`` interpolation steps)."""
    from tqdm.auto import tqdm

    from .residual import token_embed_hook

    bar = tqdm(total=math.ceil(IG_STEPS / _IG_STEPS_PER_PASS), desc="integrated_gradients", unit="step batch")
    point = model.hook_dict[token_embed_hook(model)]

    def count(module, args, output) -> None:  # returns None: the output is left as it is
        if output.shape[0] > batch_size:
            bar.update(1)

    handle = point.register_forward_hook(count)
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
