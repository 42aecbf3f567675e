"""Perturbation in token space: rank tokens, pick the top-K %, and remove or keep them.

Tokens are never decoded and re-tokenised. A removed token is replaced by another token
id (``"mask"``, ``"pad"``, ``"unk"``, ``"eos"``, ``"bos"`` or an int), by a zero or mean
vector at the token embedding (``"zero"``, ``"mean"``, through a hook on ``hook_embed``),
or deleted (``"delete"``): its position is dropped and the sequence re-packed, so a causal
LM's prediction position stays last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..result import Attribution

Replacement = Union[str, int]
TOKEN_REPLACEMENTS = ("mask", "pad", "unk", "eos", "bos")
EMBED_REPLACEMENTS = ("zero", "mean")
_EPS = 1e-9  # so that e.g. 0.3 * 10 = 3.0000000000000004 counts as 3 tokens


def check_ks(ks: Sequence[float]) -> tuple[float, ...]:
    """Validate K fractions: each in (0, 1].

    Example:
        >>> check_ks([0.1, 0.5])
        (0.1, 0.5)
    """
    ks = tuple(float(k) for k in ks)
    if not ks:
        raise ValueError("ks is empty; give fractions in (0, 1], e.g. ks=(0.1, 0.2, 0.5).")
    bad = [k for k in ks if not 0.0 < k <= 1.0]
    if bad:
        hint = " (percentages? divide by 100)" if all(1 < k <= 100 for k in bad) else ""
        raise ValueError(f"K must be a fraction in (0, 1], got {bad}{hint}; e.g. ks=(0.1, 0.2, 0.5) for 10/20/50 %.")
    return ks


def as_scores(scores, layer: int = -1) -> Float[Tensor, "batch pos"]:
    """A ``[batch, pos]`` score tensor from an :class:`Attribution` (its row at ``layer``) or a tensor.

    Example:
        >>> as_scores(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """
    if isinstance(scores, Attribution):
        return scores.row(layer).float()
    scores = torch.as_tensor(scores).float()
    if scores.ndim != 2:
        raise ValueError(
            f"scores must be [batch, pos] or an Attribution, got shape {tuple(scores.shape)}; "
            "pick one layer of a [layer, batch, pos] tensor first."
        )
    return scores


def n_selected(rankable: Bool[Tensor, "batch pos"], k: float) -> Int[Tensor, "batch"]:
    """How many tokens K % of each sequence's rankable tokens is: ``ceil(K · n)``.

    At least one token is selected for any K > 0 (when the sequence has a rankable token).

    Example:
        >>> n_selected(torch.ones(1, 10, dtype=torch.bool), 0.3).tolist()
        [3]
    """
    counts = rankable.sum(-1).double()
    return torch.ceil(counts * k - _EPS).clamp(min=0).long()


def rank(scores: Float[Tensor, "batch pos"], rankable: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Rank of each position among its sequence's rankable tokens (0 = highest score).

    Ties keep position order (stable sort); positions that are not rankable rank last.

    Example:
        >>> rank(torch.tensor([[0.1, 0.9, 0.5]]), torch.ones(1, 3, dtype=torch.bool)).tolist()
        [[2, 0, 1]]
    """
    if scores.shape != rankable.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and mask {tuple(rankable.shape)} differ in shape.")
    finite = torch.isfinite(scores)
    if (rankable & ~finite).any():
        rows = (rankable & ~finite).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"Scores are NaN or infinite on real tokens of sequence(s) {rows}; the method failed there.")
    key = torch.where(rankable, scores, torch.tensor(float("-inf")))
    order = key.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    return torch.where(rankable, ranks, scores.shape[-1])


def top_k(scores: Float[Tensor, "batch pos"], rankable: Bool[Tensor, "batch pos"], k: float) -> Bool[Tensor, "batch pos"]:
    """The top ``ceil(K · n)`` rankable tokens of each sequence.

    Example:
        >>> top_k(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), torch.ones(1, 4, dtype=torch.bool), 0.5).tolist()
        [[False, True, True, False]]
    """
    return rank(scores, rankable) < n_selected(rankable, k)[:, None]


@dataclass
class Perturbed:
    """Perturbed inputs: ids, mask, prediction positions, and positions to ablate at the embedding."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    positions: Int[Tensor, "batch"]
    embed_ablate: Bool[Tensor, "batch pos"] | None = None


def replacement_id(replacement: Replacement, tokenizer) -> int | None:
    """The token id a token replacement stands for; None for embedding ablation or deletion.

    Example:
        >>> replacement_id(7, None)
        7
    """
    if isinstance(replacement, bool):
        raise TypeError("replacement must be a token id or a strategy name, not a bool.")
    if isinstance(replacement, int):
        return replacement
    if replacement in EMBED_REPLACEMENTS or replacement == "delete":
        return None
    if replacement not in TOKEN_REPLACEMENTS:
        raise ValueError(
            f"Unknown replacement {replacement!r}: use one of {TOKEN_REPLACEMENTS + EMBED_REPLACEMENTS + ('delete',)} "
            "or a token id."
        )
    token_id = getattr(tokenizer, f"{replacement}_token_id", None)
    if token_id is None:
        raise ValueError(
            f"replacement={replacement!r} needs the tokenizer's {replacement} token, which this model lacks; "
            "pass a token id, 'zero', 'mean' or 'delete'."
        )
    return int(token_id)


def perturb(
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    positions: Int[Tensor, "batch"],
    remove: Bool[Tensor, "batch pos"],
    replacement: Replacement,
    tokenizer=None,
) -> Perturbed:
    """Remove the ``remove`` positions of every sequence with one replacement strategy.

    Example:
        >>> out = perturb(torch.tensor([[1, 5, 6, 7]]), torch.ones(1, 4, dtype=torch.bool),
        ...               torch.tensor([3]), torch.tensor([[False, True, False, False]]), "delete")
        >>> out.tokens.tolist(), out.positions.tolist()
        ([[1, 6, 7]], [2])
    """
    remove = remove & mask
    if replacement == "delete":
        return _delete(tokens, mask, positions, remove)
    if replacement in EMBED_REPLACEMENTS:
        return Perturbed(tokens, mask, positions, embed_ablate=remove)
    token_id = replacement_id(replacement, tokenizer)
    return Perturbed(torch.where(remove, token_id, tokens), mask, positions)


def _delete(tokens, mask, positions, remove) -> Perturbed:
    keep = mask & ~remove
    rows = torch.arange(tokens.shape[0])
    if not keep[rows, positions].all():
        raise ValueError("Deletion would remove a prediction position; protect it (it is protected by default).")
    width = int(keep.sum(-1).max())
    new_index = keep.long().cumsum(-1) - 1  # where each kept token lands after re-packing (right padding)
    packed = torch.zeros(tokens.shape[0], width, dtype=tokens.dtype)
    packed_mask = torch.zeros(tokens.shape[0], width, dtype=torch.bool)
    b, p = keep.nonzero(as_tuple=True)
    packed[b, new_index[b, p]] = tokens[b, p]
    packed_mask[b, new_index[b, p]] = True
    return Perturbed(packed, packed_mask, new_index[rows, positions])


def embedding_edit(ablate: Bool[Tensor, "batch pos"], value: Float[Tensor, "d_model"] | None):
    """A ``hook_embed`` forward hook that sets the ``ablate`` positions to ``value`` (zero if None)."""

    def edit(act, hook):
        where = ablate.to(act.device)[..., None]
        fill = torch.zeros((), dtype=act.dtype, device=act.device) if value is None else value.to(act)
        return torch.where(where, fill, act)

    return edit


def real_span(mask: Bool[Tensor, "batch pos"]) -> slice:
    """The column span holding every real token of ``mask``, so padding-only columns can be cut.

    Example:
        >>> real_span(torch.tensor([[False, True, True, False]]))
        slice(1, 3, None)
    """
    real = mask.any(0).nonzero().flatten()
    return slice(int(real.min()), int(real.max()) + 1)
