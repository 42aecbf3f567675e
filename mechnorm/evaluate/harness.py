"""One call that evaluates several methods on one dataset: :func:`run` → a tidy DataFrame.

For every method: its attributions over the dataset (timed, peak memory measured), then
comprehensiveness and sufficiency (per K and AOPC, confidence drop and accuracy) on its
headline row (the last layer), and evidence alignment (average precision, cue mass) at
every layer it reports. ``"random"`` is averaged over seeds. :func:`table` turns the frame
into one row per method, sorted by a metric's own direction.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..result import Attribution
from ..targets import Target
from .alignment import average_precision, cue_mass, hit_at_k
from .compute import RANDOM, attributions, check_methods, predict
from .cost import measure
from .data import EvalData, as_eval_data
from .faithfulness import PAPER_KS, comprehensiveness, sufficiency
from .metrics import best_first, get_metric
from .perturb import Replacement, check_ks
from .predictor import Predictor

DEFAULT_METHODS = (
    "normxlogit", "logat", "embedding_norm", "integrated_gradients", "grad_x_input", "saliency", "rollout", RANDOM,
)
DEFAULT_METRICS = ("comprehensiveness", "sufficiency", "average_precision", "cue_mass", "hit_at_1", "cost")
ALIGNMENT_METRICS = {"average_precision": average_precision, "cue_mass": cue_mass, "hit_at_1": hit_at_k}
COLUMNS = ["method", "layer", "metric", "k", "value"]
_NAN = float("nan")


def run(
    model,
    dataset,
    methods: Sequence[str] = DEFAULT_METHODS,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    head=None,
    batch_size: int = 16,
    ks: Sequence[float] = PAPER_KS,
    replacement: Replacement | None = None,
    n_seeds: int = 3,
    options: Mapping[str, dict] | None = None,
    progress: bool = True,
    counts: bool = False,
) -> pd.DataFrame:
    """Evaluate attribution methods on one model and dataset.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` (or an encoder with ``head``).
        dataset: :mod:`mechnorm.tasks` examples, a ``TaskBatch``, a ``mechnorm.Batch`` or a
            dict of tensors (see :func:`~mechnorm.evaluate.as_eval_data`).
        methods: registered method names and/or ``"random"``.
        metrics: any of ``"comprehensiveness"``, ``"sufficiency"`` (each with its accuracy
            when the dataset has labels), ``"average_precision"``, ``"cue_mass"``,
            ``"hit_at_1"`` (need cue positions) and ``"cost"`` (seconds per instance, peak MB at ``batch_size``).
        head: the head-on-top (a classifier's ``LinearHead``); ``UnembedHead(model)`` by default.
        batch_size: sequences per forward pass, for the methods and the perturbations.
        ks, replacement: as for :func:`~mechnorm.evaluate.comprehensiveness`.
        n_seeds: seeds the ``"random"`` baseline is averaged over.
        options: extra keyword arguments per method, e.g. ``{"integrated_gradients": {"n_steps": 20}}``.
        progress: show a tqdm bar over methods.
        counts: add a column ``n``, the examples each value averages over (an alignment
            metric skips sequences with no cue left to score), so that frames of parts of a
            dataset combine exactly (:func:`mechnorm.runner.combine_evaluation`).

    Returns:
        A tidy DataFrame with columns method, layer, metric, k, value: one row per metric and
        K (``k`` = NaN for the AOPC over K, and for metrics without K); ``layer`` is the
        attribution row scored (NaN for cost). Metric names are in
        :func:`~mechnorm.evaluate.list_metrics`.

    Example:
        >>> frame = mechnorm.evaluate.run(model, tasks.get_task("agreement").test(64),
        ...                               methods=["normxlogit", "saliency", "random"])   # doctest: +SKIP
        >>> mechnorm.evaluate.table(frame)                                               # doctest: +SKIP
    """
    methods = check_methods(methods)
    metrics = _check_metrics(metrics)
    ks = check_ks(ks)
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be at least 1, got {n_seeds}.")
    data = as_eval_data(dataset)
    if set(ALIGNMENT_METRICS) & set(metrics) and data.cue_mask is None:
        raise ValueError(f"{', '.join(ALIGNMENT_METRICS)} need cue positions: pass task examples or a dict with "
                         "'cue_positions', or drop those metrics.")
    predictor = Predictor(model, head)
    target = predict(predictor, data, batch_size)
    protected = predictor.protected(data.tokens, data.attention_mask, target.positions)
    settings = dict(ks=ks, replacement=replacement, batch_size=batch_size, protect=protected)

    frames = []
    for name in tqdm(methods, desc="mechnorm.evaluate", unit="method", disable=not progress):
        seeds = range(n_seeds) if name == RANDOM else [0]
        per_seed = []
        for seed in seeds:
            attr, seconds, peak = _timed_attribution(model, data, name, target, head, batch_size, options, seed)
            rows = _scores_rows(predictor, data, attr, target, metrics, settings, protected)
            if "cost" in metrics:
                rows += [(_NAN, "seconds_per_instance", _NAN, seconds / len(data), len(data)),
                         (_NAN, "peak_mb", _NAN, peak / 2**20, len(data))]
            per_seed.append(pd.DataFrame(rows, columns=["layer", "metric", "k", "value", "n"]))
        # seeds change the scores, not which examples count: n is the same for every seed
        averaged = pd.concat(per_seed).groupby(["layer", "metric", "k"], dropna=False, sort=False).agg(
            value=("value", "mean"), n=("n", "first"))
        frames.append(averaged.reset_index().assign(method=name))
    return pd.concat(frames, ignore_index=True)[COLUMNS + (["n"] if counts else [])]


def table(frame: pd.DataFrame, sort_by: str = "comprehensiveness", arrows: bool = True) -> pd.DataFrame:
    """One row per method: each metric's AOPC / headline value, sorted best first by ``sort_by``.

    Per-layer metrics are read at each method's last reported layer (use the frame itself
    for the other layers). With ``arrows`` the columns read ``"sufficiency ↓"`` etc.

    Example:
        >>> mechnorm.evaluate.table(frame, sort_by="average_precision")    # doctest: +SKIP
    """
    get_metric(sort_by)
    summary = frame[frame["k"].isna()]
    last = summary.groupby(["method", "metric"])["layer"].transform("max")
    summary = summary[(summary["layer"] == last) | summary["layer"].isna()]
    wide = summary.pivot_table(index="method", columns="metric", values="value", aggfunc="mean", sort=False)
    wide.columns.name = None
    if sort_by in wide:
        wide = best_first(wide, sort_by)
    if arrows:
        wide = wide.rename(columns=lambda m: f"{m} {get_metric(m).arrow}")
    return wide


def _timed_attribution(model, data: EvalData, name, target: Target, head, batch_size, options, seed):
    """One method's attribution over ``data`` with its wall time and peak memory (after a warm-up)."""
    attributions(model, data[:2], [name], _slice(target, 2), head, batch_size, options, seed)
    result, seconds, peak = measure(lambda: attributions(model, data, [name], target, head, batch_size, options, seed))
    return result[name], seconds, peak


def _scores_rows(predictor, data: EvalData, attr: Attribution, target: Target, metrics, settings, protected) -> list:
    rows = []
    layer = attr.layers[-1]
    for name, function in (("comprehensiveness", comprehensiveness), ("sufficiency", sufficiency)):
        if name in metrics:
            curve = function(predictor, data.tokens, data.attention_mask, attr, target=target, labels=data.labels, **settings)
            rows += [(layer, r.metric, r.k, r.value, len(data)) for r in curve.to_frame().itertuples()]
    for name, function in ALIGNMENT_METRICS.items():
        if name in metrics:
            values = function(attr, data.cue_mask, data.attention_mask, exclude=protected)  # [layer, batch]
            rows += [(row_layer, name, _NAN, float(v.nanmean()), int(v.isfinite().sum()))
                     for row_layer, v in zip(attr.layers, values)]
    return rows


def _slice(target: Target, n: int) -> Target:
    return Target(ids=target.ids[:n], positions=target.positions[:n])


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    allowed = DEFAULT_METRICS
    bad = [m for m in metrics if m not in allowed]
    if bad or not metrics:
        raise ValueError(f"Unknown metric(s) {bad}; run() computes {list(allowed)} (see evaluate.list_metrics()).")
    return metrics
