"""Positions a method cannot meaningfully rank: the one definition shared by results and evaluation.

Two kinds of position are *protected* for every method:

* the **prediction position** itself (a causal LM's last real token, an encoder's ``[CLS]``):
  its own representation *is* the prediction, so every method scores it trivially high
  (rollout keeps the identity mass there, NormXLogit reads the prediction from it);
* a **leading special token** (BOS, ``[CLS]``): not part of the text. Evaluation never
  removes it (the model needs it) and results never rank it.

The first real position of a causal model (the **attention sink**) is protected only for
the methods in :data:`SINK_METHODS` (``sink=True``). Evidence on SmolLM2-135M, which
prepends no BOS, on seven sentences starting with ``The``, ``Mr``, ``Paris``, ``Germany``,
``keys`` or ``Dogs`` (``experiments/results/protected_sink.md``): from layer 15 on, 60–95 %
of later queries' attention goes to position 0 whatever its token, and its final residual
norm is 7–8× the median of the others. Counting how often position 0 is the top token
once the prediction position is set aside: raw attention 7/7, rollout 7/7, GlobEnc 7/7,
DecompX 7/7 (with a logit share ~10× the next token's), ALTI 5/7, Value Zeroing 5/7 —
there the score is the sink, not evidence. NormXLogit 1/7, LogAt 1/7, ALTI-Logit 1/7,
gradient × input 1/7, saliency 2/7, embedding norm 0/7: they rank position 0 for content
('Paris' in "Paris is the capital of", 'Germany' in "Germany's capital city is"), and the
first word of a text without BOS can be the evidence, so protecting it for every method
would hide real evidence. Encoders have no sink rule: their first position is ``[CLS]``,
a special token, protected anyway.

Example:
    >>> import torch
    >>> tokens = torch.tensor([[1, 7, 8, 9], [0, 1, 7, 8]])   # 1 = BOS, 0 = padding (left)
    >>> mask = torch.tensor([[True, True, True, True], [False, True, True, True]])
    >>> protected_positions(tokens, mask, torch.tensor([3, 3]), special_ids=[1]).int().tolist()
    [[1, 0, 0, 1], [0, 1, 0, 1]]
"""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .targets import first_positions, last_positions

__all__ = ["protected_positions", "protected_for", "SINK_METHODS"]

#: methods whose scores follow attention mass, so the attention sink is protected for them
SINK_METHODS = frozenset({"attention", "rollout", "globenc", "alti", "decompx", "value_zeroing"})


def protected_positions(
    tokens: Int[Tensor, "batch pos"] | None,
    mask: Bool[Tensor, "batch pos"],
    positions: Int[Tensor, "batch"],
    tokenizer=None,
    special_ids: Iterable[int] | None = None,
    sink: bool = False,
) -> Bool[Tensor, "batch pos"]:
    """Positions never ranked nor removed: prediction position, leading special token, (sink).

    Args:
        tokens: ``[batch, pos]`` ids, to recognise a leading BOS / ``[CLS]``; None marks only
            the prediction position (and the sink when asked).
        mask: ``[batch, pos]``, False at padding; padding is never marked.
        positions: ``[batch]`` prediction positions.
        tokenizer: its ``all_special_ids`` name the special tokens, unless ``special_ids`` does.
        special_ids: ids counted as special tokens (overrides ``tokenizer``).
        sink: also mark each sequence's first real position (a causal model's attention
            sink; see the module docstring for when this applies).

    Returns:
        Boolean ``[batch, pos]`` on ``mask``'s device.

    Example:
        >>> mask = torch.tensor([[True, True, True]])
        >>> protected_positions(None, mask, torch.tensor([2]), sink=True).tolist()
        [[True, False, True]]
    """
    mask = mask.bool()
    batch = mask.shape[0]
    positions = torch.as_tensor(positions, device=mask.device).long().reshape(-1).expand(batch)
    rows = torch.arange(batch, device=mask.device)
    keep = torch.zeros_like(mask)
    keep[rows, positions] = True
    first = first_positions(mask)
    if sink:
        keep[rows, first] = True
    if special_ids is None:
        special_ids = getattr(tokenizer, "all_special_ids", None) or []
    special = torch.as_tensor(list(special_ids), dtype=torch.long)
    if tokens is not None and special.numel():
        tokens = torch.as_tensor(tokens).to(mask.device)
        if tuple(tokens.shape) != tuple(mask.shape):
            raise ValueError(f"tokens has shape {tuple(tokens.shape)} but the mask is {tuple(mask.shape)}; "
                             "pass the token ids of the cached batch.")
        is_special = torch.isin(tokens[rows, first], special.to(mask.device))
        keep[rows[is_special], first[is_special]] = True
    return keep & mask


def model_behind(cache_or_model):
    """The model itself, or the model a TransformerLens cache was made by (None if unknown)."""
    return cache_or_model if hasattr(cache_or_model, "cfg") else getattr(cache_or_model, "model", None)


def protected_for(cache_or_model, tokens, mask: Tensor, positions: Tensor | None, method: str) -> Bool[Tensor, "batch pos"]:
    """:func:`protected_positions` for a result of ``method`` on the model behind a cache.

    The tokenizer comes from the model; the attention sink is added for the methods in
    :data:`SINK_METHODS` on a causal model (a cache without a model counts as causal).
    ``positions=None`` takes the model's default prediction positions (``[CLS]`` in an
    encoder, else the last real token). Returned on the CPU, as results store it.

    Example:
        >>> protected_for(cache, batch.tokens, batch.attention_mask, target.positions, "rollout")  # doctest: +SKIP
    """
    from .inputs import is_encoder  # inputs imports result; imported lazily to keep this module at the bottom

    model = model_behind(cache_or_model)
    causal = model is None or not is_encoder(model)
    tokenizer = getattr(model, "tokenizer", None)
    tokens = None if tokens is None else torch.as_tensor(tokens).cpu()
    if positions is None:
        positions = first_positions(mask) if not causal else last_positions(mask)
    return protected_positions(tokens, mask.cpu(), torch.as_tensor(positions).cpu(), tokenizer,
                               sink=causal and method in SINK_METHODS)
