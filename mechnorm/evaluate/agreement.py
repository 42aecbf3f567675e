"""Agreement between methods, and the model-randomisation sanity check (Adebayo et al. 2018).

:func:`rank_agreement` gives the Spearman and Kendall correlation (scipy) between the token
rankings of every pair of methods, per sequence over its ranked tokens, averaged, at every
layer the pair shares. :func:`randomization_check` re-initialises the model's blocks from
the top down, on copies, and reports how much each method's attributions still correlate
with the original ones: a method that explains the *model* should decorrelate as its
weights are destroyed.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from scipy.stats import kendalltau, spearmanr
from torch import Tensor

from ..result import Attribution
from .alignment import exclusion_mask
from .compute import attributions, check_methods, predict
from .data import as_eval_data
from .predictor import Predictor

_COLUMNS = ["method_a", "layer_a", "method_b", "layer_b", "spearman", "kendall", "n"]


def rank_correlation(
    a: Float[Tensor, "batch pos"], b: Float[Tensor, "batch pos"], valid: Bool[Tensor, "batch pos"]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence Spearman and Kendall (tau-b) correlation over the ``valid`` positions.

    NaN for a sequence with fewer than two valid tokens or a constant ranking.

    Example:
        >>> s, k = rank_correlation(torch.tensor([[1., 2, 3]]), torch.tensor([[3., 2, 1]]), torch.ones(1, 3, dtype=torch.bool))
        >>> float(s[0]), float(k[0])
        (-1.0, -1.0)
    """
    spearman, kendall = np.full(a.shape[0], np.nan), np.full(a.shape[0], np.nan)
    for i in range(a.shape[0]):
        x, y = a[i, valid[i]].double().numpy(), b[i, valid[i]].double().numpy()
        if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spearman[i] = spearmanr(x, y).statistic
            kendall[i] = kendalltau(x, y).statistic
    return spearman, kendall


def rank_agreement(attrs: Mapping[str, Attribution], exclude=None) -> pd.DataFrame:
    """Spearman and Kendall correlation between every pair of methods, per layer.

    Two layer-wise methods are compared at each layer both have; a single-row method is
    compared with every row of the other. Correlations are per sequence over its real,
    non-excluded tokens, then averaged (``n`` = sequences that had a non-constant ranking).

    Args:
        attrs: method name -> Attribution, all over the same sequences.
        exclude: positions left out of the rankings (e.g. the prediction positions ``[batch]``
            or a ``[batch, pos]`` mask).

    Returns:
        Columns method_a, layer_a, method_b, layer_b, spearman, kendall, n.

    Example:
        >>> rank_agreement({"normxlogit": attr1, "saliency": attr2})      # doctest: +SKIP
    """
    names = list(attrs)
    if len(names) < 2:
        raise ValueError("rank_agreement needs at least two methods' attributions.")
    mask = attrs[names[0]].mask
    if any(tuple(attrs[n].mask.shape) != tuple(mask.shape) for n in names):
        raise ValueError("All attributions must cover the same sequences (same [batch, pos]).")
    valid = mask & ~exclusion_mask(exclude, mask)
    rows = []
    for name_a, name_b in itertools.combinations(names, 2):
        a, b = attrs[name_a], attrs[name_b]
        for layer_a, layer_b in _layer_pairs(a.layers, b.layers):
            s, k = rank_correlation(a.row(layer_a), b.row(layer_b), valid)
            rows.append([name_a, layer_a, name_b, layer_b, _nanmean(s), _nanmean(k), int(np.isfinite(s).sum())])
    return pd.DataFrame(rows, columns=_COLUMNS)


def randomize_blocks(model, n_blocks: int, seed: int = 0):
    """A copy of ``model`` whose top ``n_blocks`` blocks are re-initialised (the original is untouched).

    Each parameter tensor of those blocks is redrawn from a normal with that tensor's own
    mean and standard deviation, so scales stay plausible while the learnt structure is gone.

    Example:
        >>> scrambled = randomize_blocks(model, 1)                          # doctest: +SKIP
    """
    n_layers = int(model.cfg.n_layers)
    if not 0 <= n_blocks <= n_layers:
        raise ValueError(f"n_blocks must be in 0…{n_layers} (this model has {n_layers} blocks), got {n_blocks}.")
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for index in range(n_layers - n_blocks, n_layers):
            for param in clone.blocks[index].parameters():
                values = param.detach().float()
                std = float(values.std()) if values.numel() > 1 else 0.0
                fresh = torch.randn(param.shape, generator=generator) * std + float(values.mean())
                param.copy_(fresh.to(param))
    return clone


def randomization_check(
    model,
    dataset,
    methods: Sequence[str],
    *,
    head=None,
    steps: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    options: Mapping[str, dict] | None = None,
) -> pd.DataFrame:
    """Cascading model randomisation: correlation with the original attributions per randomised blocks.

    For ``n`` = 0, 1, …, L blocks re-initialised from the top (on copies of the model), every
    method explains the *original* prediction again and its headline row (the last layer) is
    rank-correlated with the original model's, per sequence over the real tokens other than
    the protected ones (prediction position, leading BOS/CLS). ``n = 0`` gives 1 by construction (a deterministic method).

    Args:
        model: the model (never modified).
        dataset: anything :func:`~mechnorm.evaluate.as_eval_data` takes.
        methods: registered names (and ``"random"``, which stays near 0 throughout).
        head: the head-on-top (classifiers); it is kept, only blocks are randomised.
        steps: which numbers of randomised blocks; default 0…L.

    Returns:
        Columns method, n_randomized, spearman, kendall.

    Example:
        >>> randomization_check(model, tasks.get_task("agreement").test(32), ["normxlogit", "saliency"])  # doctest: +SKIP
    """
    methods = check_methods(methods)
    data = as_eval_data(dataset)
    n_layers = int(model.cfg.n_layers)
    steps = list(range(n_layers + 1)) if steps is None else [int(s) for s in steps]
    predictor = Predictor(model, head)
    target = predict(predictor, data, batch_size)
    valid = data.attention_mask & ~predictor.protected(data.tokens, data.attention_mask, target.positions)
    original = attributions(model, data, methods, target, head, batch_size, options, seed)
    rows = []
    for n in steps:
        scrambled = randomize_blocks(model, n, seed=seed + n) if n else model
        # a fresh seed for "random" at every step, so its correlation measures chance agreement
        changed = attributions(scrambled, data, methods, target, head, batch_size, options, seed=seed + 1 + n)
        for name in methods:
            s, k = rank_correlation(original[name].row(-1), changed[name].row(-1), valid)
            rows.append({"method": name, "n_randomized": n, "spearman": _nanmean(s), "kendall": _nanmean(k)})
        del scrambled
    return pd.DataFrame(rows, columns=["method", "n_randomized", "spearman", "kendall"])


def _layer_pairs(layers_a: tuple[int, ...], layers_b: tuple[int, ...]) -> list[tuple[int, int]]:
    if len(layers_a) > 1 and len(layers_b) > 1:
        return [(layer, layer) for layer in layers_a if layer in layers_b]
    if len(layers_a) > 1:
        return [(layer, layers_b[0]) for layer in layers_a]
    return [(layers_a[0], layer) for layer in layers_b]


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
