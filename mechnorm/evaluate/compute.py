"""Producing what evaluation scores: the prediction to explain, and each method's attribution.

Registered methods run through :func:`mechnorm.attribute` (one cached forward pass per
batch, gradient methods on the same batch and target). ``"random"`` is the baseline every
metric is read against: scores from a seeded generator, drawn per sequence so that padding
and batch composition do not change them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from ..inputs import Batch
from ..methods.registry import get_method
from ..result import Attribution
from ..targets import Target
from .data import EvalData
from .predictor import Predictor

RANDOM = "random"


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validate method names against the registry (plus ``"random"``).

    Example:
        >>> check_methods(["normxlogit", "random"])
        ('normxlogit', 'random')
    """
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods:
        raise ValueError("Name at least one method; see mechnorm.list_methods() (and 'random').")
    for name in methods:
        if name != RANDOM:
            try:
                get_method(name)
            except KeyError as err:
                raise KeyError(f"{err.args[0]} Or use 'random' for the random-ranking baseline.") from None
    if len(set(methods)) != len(methods):
        raise ValueError(f"Method names repeat: {list(methods)}.")
    return methods


@torch.inference_mode()
def predict(predictor: Predictor, data: EvalData, batch_size: int = 32) -> Target:
    """The model's own prediction for every sequence, as a :class:`~mechnorm.Target` with positions.

    Example:
        >>> target = predict(Predictor(model), data)                       # doctest: +SKIP
    """
    positions = predictor.prediction_positions(data.attention_mask) if data.positions is None else data.positions
    ids = []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        ids.append(predictor.logits(data.tokens[rows], data.attention_mask[rows], positions[rows]).argmax(-1))
    return Target(ids=torch.cat(ids), positions=positions)


def attributions(
    model,
    data: EvalData,
    methods: Sequence[str],
    target: Target,
    head=None,
    batch_size: int = 16,
    options: Mapping[str, dict] | None = None,
    seed: int = 0,
) -> dict[str, Attribution]:
    """Every method's :class:`~mechnorm.Attribution` over ``data`` for one target.

    ``options`` holds extra keyword arguments per method (as :func:`mechnorm.attribute`
    takes them); ``seed`` seeds ``"random"``.

    Example:
        >>> attrs = attributions(model, data, ["normxlogit", "random"], target)   # doctest: +SKIP
    """
    from ..compare import attribute

    methods = check_methods(methods)
    options = {k: v for k, v in (options or {}).items() if k in methods and k != RANDOM}
    registered = [m for m in methods if m != RANDOM]
    out: dict[str, Attribution] = {}
    if registered:
        comparison = attribute(
            model, Batch(data.tokens, data.attention_mask), methods=registered, target=target,
            batch_size=batch_size, head=head, options=options, progress=False,
        )
        out.update(comparison.attributions)
    if RANDOM in methods:
        out[RANDOM] = random_attribution(data.attention_mask, seed)
    return {name: out[name] for name in methods}


def random_attribution(mask: Bool[Tensor, "batch pos"], seed: int = 0, offset: int = 0) -> Attribution:
    """Uniform random scores on the real tokens, one generator per sequence.

    Sequence ``i`` draws from a generator seeded by ``(seed, offset + i)`` and its scores
    fill its real positions in order, so they do not depend on padding or on which other
    sequences share the batch.

    Example:
        >>> random_attribution(torch.ones(2, 3, dtype=torch.bool), seed=1).scores.shape
        torch.Size([1, 2, 3])
    """
    mask = torch.as_tensor(mask).bool().cpu()
    scores = torch.full(mask.shape, float("nan"))
    for i, row in enumerate(mask):
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + offset + i)
        scores[i, row] = torch.rand(int(row.sum()), generator=generator)
    return Attribution(scores[None], layers=(0,), mask=mask, method=RANDOM, signed=False, metadata={"seed": seed})
