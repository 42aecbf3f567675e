"""Evidence alignment: do the highest-scored tokens coincide with the known cue tokens?

Three numbers per sequence (and per layer, for a layer-wise :class:`~mechnorm.Attribution`):

* :func:`average_precision` of the ranking against the cue indicator: the mean, over cue
  tokens, of the precision among the tokens scored at least as high (1 when every cue
  outranks every other token). Tied scores count as one threshold, as in scikit-learn's
  ``average_precision_score``, so a constant score earns no credit from position order.
* :func:`cue_mass`: the dot product of the scores, normalised to unit L1 norm over the
  ranked tokens, with the cue indicator: the signed share of attribution mass on cues.
* :func:`hit_at_k`: whether a cue is among the ``k`` top-ranked tokens (``k=1``: "is the
  top token a cue?"), the behavioural check's question.

The prediction position (and any other excluded position) is removed from the ranking.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..result import Attribution

Cues = Bool[Tensor, "batch pos"] | Sequence[Sequence[int]]


def cue_indicator(cue_positions: Cues, mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """A ``[batch, pos]`` cue mask from a boolean mask or one list of positions per sequence.

    Example:
        >>> cue_indicator([[1], [0, 2]], torch.ones(2, 3, dtype=torch.bool)).tolist()
        [[False, True, False], [True, False, True]]
    """
    batch, length = mask.shape
    if isinstance(cue_positions, Tensor) and cue_positions.dtype == torch.bool:
        if tuple(cue_positions.shape) != (batch, length):
            raise ValueError(f"cue mask has shape {tuple(cue_positions.shape)}; the scores are [batch={batch}, pos={length}].")
        cues = cue_positions.cpu()
    else:
        rows = [list(map(int, r)) for r in cue_positions]
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} lists of cue positions for {batch} sequences; give one list per sequence.")
        cues = torch.zeros(batch, length, dtype=torch.bool)
        for b, row in enumerate(rows):
            bad = [p for p in row if not 0 <= p < length]
            if bad:
                raise ValueError(
                    f"Cue position(s) {bad} of sequence {b} are beyond its {length} positions; cue positions "
                    "index the token sequence (BOS/CLS included), as in mechnorm.tasks examples."
                )
            cues[b, row] = True
    on_padding = (cues & ~mask).any(-1).nonzero().flatten().tolist()
    if on_padding:
        raise ValueError(
            f"Cue positions of sequence(s) {on_padding} fall on padding; with left padding shift them by the "
            "padding length, or pass the cue mask built with the same padding."
        )
    return cues


def exclusion_mask(exclude, mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` positions to leave out of the ranking, from None, a mask, an int or ``[batch]`` positions.

    Example:
        >>> exclusion_mask(torch.tensor([2, 0]), torch.ones(2, 3, dtype=torch.bool)).tolist()
        [[False, False, True], [True, False, False]]
    """
    batch, length = mask.shape
    if exclude is None:
        return torch.zeros_like(mask)
    exclude = torch.as_tensor(exclude).cpu()
    if exclude.dtype == torch.bool:
        if tuple(exclude.shape) != (batch, length):
            raise ValueError(f"exclude mask has shape {tuple(exclude.shape)}; expected [batch={batch}, pos={length}].")
        return exclude
    positions = exclude.long().reshape(-1).expand(batch) if exclude.numel() == 1 else exclude.long().reshape(-1)
    if positions.shape[0] != batch or (positions < 0).any() or (positions >= length).any():
        raise ValueError(f"exclude positions {positions.tolist()} must be one position in 0…{length - 1} per sequence.")
    out = torch.zeros_like(mask)
    out[torch.arange(batch), positions] = True
    return out


def average_precision(
    scores,
    cue_positions: Cues,
    mask: Bool[Tensor, "batch pos"] | None = None,
    exclude=None,
) -> Float[Tensor, "*layer batch"]:
    """Average precision of each sequence's token ranking against its cue tokens.

    ``AP = mean over cue tokens c of |cues scored ≥ s_c| / |tokens scored ≥ s_c|``, over the
    real, non-excluded tokens. Without ties this is the usual mean of precision@rank at
    each cue's rank.

    Args:
        scores: an :class:`~mechnorm.Attribution` (every layer) or ``[batch, pos]`` /
            ``[layer, batch, pos]`` scores, ranked largest first.
        cue_positions: a ``[batch, pos]`` boolean mask or one list of positions per sequence.
        mask: ``[batch, pos]``, False at padding (the Attribution's mask by default).
        exclude: positions to leave out: the prediction positions ``[batch]`` (or an int), or
            a ``[batch, pos]`` mask. Cues there are left out too.

    Returns:
        ``[layer, batch]`` for an Attribution or a 3-d tensor, else ``[batch]``; NaN for a
        sequence with no cue left.

    Example:
        >>> ap = average_precision(torch.tensor([[0.9, 0.1, 0.5]]), [[0, 1]])  # cues ranked 1st and 3rd
        >>> round(float(ap[0]), 4)  # (1/1 + 2/3) / 2
        0.8333
    """
    values, cues, valid, squeeze = _prepare(scores, cue_positions, mask, exclude)
    at_least = _scored_at_least(values, valid)
    precision = (at_least & cues[..., None, :]).sum(-1) / at_least.sum(-1).clamp(min=1)
    relevant = cues & valid
    ap = (precision * relevant).sum(-1) / relevant.sum(-1)
    return ap[0] if squeeze else ap


def cue_mass(
    scores,
    cue_positions: Cues,
    mask: Bool[Tensor, "batch pos"] | None = None,
    exclude=None,
) -> Float[Tensor, "*layer batch"]:
    """Dot product of the L1-normalised scores with the cue indicator: ``Σ_cues s / Σ |s|``.

    In [-1, 1]: 1 when all attribution mass sits on cue tokens; for a non-negative method a
    uniform score gives the cue share. Arguments and shapes as for :func:`average_precision`.

    Example:
        >>> cue_mass(torch.tensor([[3.0, 1.0, 0.0]]), [[0]]).tolist()
        [0.75]
    """
    values, cues, valid, squeeze = _prepare(scores, cue_positions, mask, exclude)
    values = values.masked_fill(~valid, 0.0)
    total = values.abs().sum(-1)
    mass = (values * cues).sum(-1) / total
    mass = torch.where(total > 0, mass, torch.nan).masked_fill(~(cues & valid).any(-1), float("nan"))
    return mass[0] if squeeze else mass


def hit_at_k(
    scores,
    cue_positions: Cues,
    mask: Bool[Tensor, "batch pos"] | None = None,
    exclude=None,
    k: int = 1,
) -> Float[Tensor, "*layer batch"]:
    """1.0 where a cue token is among a sequence's ``k`` top-ranked tokens, else 0.0.

    A token's rank counts every ranked token scored at least as high, itself included, so
    ties rank pessimistically: a constant score scores no hit unless ``k`` covers every token.
    The mean over sequences is the share of sequences whose top ``k`` hold a cue. Arguments
    and shapes as for :func:`average_precision`; NaN for a sequence with no cue left.

    Example:
        >>> hit_at_k(torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1]]), [[0], [0]]).tolist()
        [1.0, 0.0]
        >>> hit_at_k(torch.tensor([[0.2, 0.8, 0.1]]), [[0]], k=2).tolist()
        [1.0]
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive whole number of tokens, got {k}.")
    values, cues, valid, squeeze = _prepare(scores, cue_positions, mask, exclude)
    worst_rank = _scored_at_least(values, valid).sum(-1)  # [layer, batch, pos]
    relevant = cues & valid
    hits = ((worst_rank <= k) & relevant).any(-1).float()
    hits = hits.masked_fill(~relevant.any(-1), float("nan"))
    return hits[0] if squeeze else hits


def expected_random_ap(n_tokens: int, n_cues: int) -> float:
    """Expected average precision of a uniformly random ranking of ``n_tokens`` with ``n_cues`` cues.

    ``E[AP] = (1/N) · (H_N + (R − 1)/(N − 1) · (N − H_N))`` with ``H_N`` the N-th harmonic
    number; it is the random baseline AP should be read against (slightly above the cue share
    ``R/N``).

    Example:
        >>> round(expected_random_ap(4, 4), 6), round(expected_random_ap(2, 1), 4)
        (1.0, 0.75)
    """
    if not 0 < n_cues <= n_tokens:
        raise ValueError(f"Need 0 < n_cues <= n_tokens, got n_cues={n_cues}, n_tokens={n_tokens}.")
    if n_tokens == 1:
        return 1.0
    harmonic = sum(1.0 / i for i in range(1, n_tokens + 1))
    return (harmonic + (n_cues - 1) / (n_tokens - 1) * (n_tokens - harmonic)) / n_tokens


def _scored_at_least(values, valid) -> Bool[Tensor, "layer batch pos pos"]:
    """``[..., i, j]``: token j is ranked and scored at least as high as token i."""
    s = values.masked_fill(~valid, float("-inf"))
    return (s[..., None, :] >= s[..., :, None]) & valid[..., None, :]


def _prepare(scores, cue_positions, mask, exclude):
    """Scores as ``[layer, batch, pos]``, the cue mask and the ranked (valid) positions."""
    if isinstance(scores, Attribution):
        values, mask = scores.scores, scores.mask if mask is None else mask
        squeeze = False
    else:
        values = torch.as_tensor(scores).float().cpu()
        squeeze = values.ndim == 2
        values = values[None] if squeeze else values
        if values.ndim != 3:
            raise ValueError(f"scores must be [batch, pos] or [layer, batch, pos], got shape {tuple(values.shape)}.")
    if mask is None:
        mask = torch.ones(values.shape[1:], dtype=torch.bool)
    mask = torch.as_tensor(mask).bool().cpu()
    if tuple(mask.shape) != tuple(values.shape[1:]):
        raise ValueError(f"mask shape {tuple(mask.shape)} != scores' [batch, pos] {tuple(values.shape[1:])}.")
    cues = cue_indicator(cue_positions, mask)
    valid = mask & ~exclusion_mask(exclude, mask)
    bad = (~torch.isfinite(values) & valid).any(0).any(-1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"Scores are NaN or infinite on real tokens of sequence(s) {bad}.")
    return values.float(), cues, valid.expand_as(values), squeeze


__all__ = ["average_precision", "cue_indicator", "cue_mass", "exclusion_mask", "expected_random_ap", "hit_at_k"]

