"""The one constructor every token-attribution method returns through."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..protected import model_behind, protected_for
from ..result import Attribution, token_strings


def method_result(
    method: str,
    scores: Tensor,
    layers,
    mask: Tensor,
    source: Any,
    tokens: Tensor | None,
    positions: Tensor | None,
    target=None,
    **fields: Any,
) -> Attribution:
    """An :class:`Attribution` as every method returns it: on the CPU, its tokens labelled with
    the model's tokenizer, its protected positions marked for ``method`` and the target's
    labels and probabilities attached.

    ``source`` is the cache the scores were read from, or the model they were computed with
    (gradient methods); ``positions`` are the prediction positions (None: the model's
    default). Other ``fields`` (``signed``, ``metadata``) go to :class:`Attribution` as given.

    Example:
        >>> attr = method_result("rollout", scores, layer_ids, mask, cache, tokens, pred, target)  # doctest: +SKIP
    """
    return Attribution(
        scores=scores.cpu(),
        layers=tuple(layers),
        mask=mask.cpu(),
        method=method,
        tokens=token_strings(getattr(model_behind(source), "tokenizer", None), tokens),
        target_labels=None if target is None else target.labels,
        target_probs=None if target is None else getattr(target, "probs", None),
        protected=protected_for(source, tokens, mask, positions, method),
        **fields,
    )
