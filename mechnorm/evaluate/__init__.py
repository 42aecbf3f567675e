"""Which attribution method tells the truth: faithfulness, evidence alignment, agreement, cost.

* :func:`comprehensiveness` / :func:`sufficiency`: remove (or keep only) the top-K % tokens in
  token space and measure the prediction's confidence drop and accuracy; AOPC over K.
* :func:`average_precision` / :func:`cue_mass` / :func:`hit_at_k`: does the ranking find the
  known cue tokens?
* :func:`rank_agreement`, :func:`randomization_check`: agreement between methods, and the
  model-randomisation sanity check.
* :func:`run`: all of it for several methods on one dataset, as one tidy DataFrame;
  :func:`table` summarises it; :func:`list_metrics` says how to read each metric.

Example:
    >>> from mechnorm import evaluate, tasks
    >>> frame = evaluate.run(model, tasks.get_task("agreement").test(64))   # doctest: +SKIP
    >>> evaluate.table(frame)                                                # doctest: +SKIP
"""

from .agreement import rank_agreement, rank_correlation, randomization_check, randomize_blocks
from .alignment import average_precision, cue_indicator, cue_mass, expected_random_ap, hit_at_k
from .compute import RANDOM, attributions, predict, random_attribution
from .cost import max_batch, measure
from .data import EvalData, as_eval_data
from .faithfulness import ERASER_KS, PAPER_KS, PerturbationCurve, comprehensiveness, sufficiency
from .harness import DEFAULT_METHODS, DEFAULT_METRICS, run, table
from .metrics import MetricSpec, best_first, get_metric, list_metrics, register_metric
from .perturb import rank, top_k
from .predictor import Predictor, as_predictor

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_METRICS",
    "ERASER_KS",
    "EvalData",
    "MetricSpec",
    "PAPER_KS",
    "PerturbationCurve",
    "Predictor",
    "RANDOM",
    "as_eval_data",
    "as_predictor",
    "attributions",
    "average_precision",
    "best_first",
    "comprehensiveness",
    "cue_indicator",
    "cue_mass",
    "expected_random_ap",
    "get_metric",
    "hit_at_k",
    "list_metrics",
    "max_batch",
    "measure",
    "predict",
    "random_attribution",
    "rank",
    "rank_agreement",
    "rank_correlation",
    "randomization_check",
    "randomize_blocks",
    "register_metric",
    "run",
    "sufficiency",
    "table",
    "top_k",
]
