"""Attention baselines read from the cache: raw attention weights and attention rollout.

Both report, for each sequence, how much its prediction position attends to each token
(directly, or through the whole stack for rollout). Scores are unsigned; they are
attention mass, not evidence for a particular output, so the target only fixes the
prediction position.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..inputs import is_encoder, prediction_positions
from ..residual import at_positions, check_mask, n_blocks, require_finite, require_hooks, resolve_layers
from ..result import Attribution
from ..targets import Target, last_positions
from .arguments import prepare
from .output import method_result
from .registry import HookFilter, register

HeadFusion = Literal["mean", "max", "min"]
PATTERN_HOOK = "blocks.{i}.attn.hook_pattern"
_PATTERNS = HookFilter(patterns=frozenset({PATTERN_HOOK}))


@register(
    "rollout",
    "Attention rollout (Abnar & Zuidema 2020): head-fused attention plus identity, multiplied through the layers.",
    _PATTERNS,
    layerwise=True,
)
@torch.inference_mode()
def attention_rollout(
    cache,
    head_fusion: HeadFusion = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    attention_mask=None,
    target: Target | None = None,
    positions: int | Tensor | None = None,
    layers: int | Sequence[int] | None = None,
    tokens=None,
) -> Attribution:
    """Attention rollout: how much each token flows into the prediction position.

    Per block, heads are fused (``head_fusion``), keys that are padding (or in the future,
    for a causal model) get zero attention, and ``Â = residual·I + (1 − residual)·fused``
    is renormalised row by row. ``R_0 = I`` and ``R_l = Â_l · R_{l−1}``; the score of
    token i at layer l is ``R_l[pred, i]``. Rows follow the project's layer convention
    (blocks applied): layer l uses blocks 0…l−1, so layer 0 is the identity row (all mass
    on the prediction position itself) and the last row, layer L, is the paper's rollout.

    Args:
        cache: an ``ActivationCache`` with ``blocks.{i}.attn.hook_pattern``
            (``mechnorm.hooks_for("rollout")``).
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over heads.
        residual: weight of the identity (the skip connection), in [0, 1]; the paper uses 0.5.
        discard_ratio: in [0, 1): in each query row, this fraction of the smallest
            attention weights among the keys it can see is set to zero before adding the
            identity (the ViT-rollout variant; 0 = the paper).
        attention_mask: ``[batch, pos]``, False at padding.
        target: only its ``positions`` are used, when set.
        positions: the prediction position (an int for all, or ``[batch]``); by default
            ``target.positions``, else each sequence's last real token.
        layers: which rows to report: None for 0…L, an int or a list.
        tokens: ``[batch, pos]`` ids, only to label the result.

    Returns:
        An :class:`Attribution` ``[len(layers), batch, pos]``, unsigned; each row sums to 1
        over real tokens.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("rollout"))  # doctest: +SKIP
        >>> mechnorm.attention_rollout(cache).top_k(3)                # doctest: +SKIP
    """
    cache, _, target, attention_mask, tokens = prepare(cache, None, target, attention_mask, tokens, need_head=False, need_target=False)
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}.")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1] (the weight of the identity; the paper uses 0.5), got {residual}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1) (0 keeps every weight), got {discard_ratio}.")
    n_layers = n_blocks(cache)
    layer_ids = resolve_layers(layers, n_layers)
    streamed = getattr(cache, "streamed", {}).get(("rollout", head_fusion, residual, discard_ratio))
    if streamed is not None:  # mixed in forward hooks by mechnorm.streaming, one block at a time
        mixed, (mask, pred) = streamed, _mask_and_positions(cache, streamed[0][None, :, None], attention_mask, target, positions)
    else:
        names = [PATTERN_HOOK.format(i=i) for i in range(n_layers)]
        require_hooks(cache, names, "attention_rollout")
        mask, pred = _mask_and_positions(cache, cache[names[0]][None], attention_mask, target, positions)
        visible = _visible(cache, mask)
        mixed = [rollout_mixing(require_finite(cache[name], name, visible[:, None]), visible, head_fusion, residual, discard_ratio)
                 for name in names]
    scores = rollout_rows(mixed, pred, layer_ids)  # [layer, batch, key]
    return method_result("rollout", scores, layer_ids, mask, cache, tokens, pred, target, signed=False, metadata={
        "head_fusion": head_fusion, "residual": residual, "discard_ratio": discard_ratio, "positions": pred.cpu()})


@register(
    "attention",
    "Raw attention weights of the prediction position over the tokens at one layer (heads fused).",
    _PATTERNS,
)
@torch.inference_mode()
def attention_weights(
    cache,
    layer: int = -1,
    heads: HeadFusion | int = "mean",
    attention_mask=None,
    target: Target | None = None,
    positions: int | Tensor | None = None,
    tokens=None,
) -> Attribution:
    """Raw attention: the prediction position's attention over tokens in one block.

    Args:
        cache: an ``ActivationCache`` with ``blocks.{i}.attn.hook_pattern``.
        layer: the layer (blocks applied, 1…L; negatives count from L) whose block's
            attention is read: layer l reads ``blocks.{l-1}.attn.hook_pattern``.
        heads: an attention head's index, or ``"mean"``, ``"max"``, ``"min"`` over all heads
            (named ``heads`` because ``head`` is the head-on-top everywhere in mechnorm).
        attention_mask, target, positions, tokens: as for :func:`attention_rollout`.

    Returns:
        An :class:`Attribution` with one row (``layer``), unsigned; padded keys get 0
        attention (NaN in the result).

    Example:
        >>> mechnorm.attention_weights(cache, layer=-1, heads=3).top_k(3)   # doctest: +SKIP
    """
    cache, _, target, attention_mask, tokens = prepare(cache, None, target, attention_mask, tokens, need_head=False, need_target=False)
    n_layers = n_blocks(cache)
    (layer,) = resolve_layers(layer, n_layers)
    if layer == 0:
        raise ValueError("Layer 0 is the input (no block applied), so it has no attention; pick a layer in 1…L.")
    patterns = _patterns(cache, [layer - 1], "attention_weights")[0]  # [batch, head, query, key]
    if isinstance(heads, int) and not isinstance(heads, bool):
        if not -patterns.shape[1] <= heads < patterns.shape[1]:
            raise ValueError(f"Attention head {heads} is out of range: block {layer - 1} has {patterns.shape[1]} heads.")
        fused = patterns[:, heads]
    elif heads in ("mean", "max", "min"):
        fused = _fuse(patterns[None], heads)[0]
    else:
        raise ValueError(f"heads must be an attention head's index or 'mean', 'max', 'min', got {heads!r}.")
    mask, pred = _mask_and_positions(cache, patterns[None], attention_mask, target, positions)
    require_finite(patterns, PATTERN_HOOK.format(i=layer - 1), _visible(cache, mask)[:, None])
    scores = at_positions(fused * _visible(cache, mask), pred)  # [batch, key]
    return method_result("attention", scores[None], (layer,), mask, cache, tokens, pred, target, signed=False,
                         metadata={"heads": heads, "block": layer - 1, "positions": pred.cpu()})


def rollout_mixing(
    pattern: Float[Tensor, "batch head query key"], visible: Bool[Tensor, "batch query key"],
    head_fusion: HeadFusion = "mean", residual: float = 0.5, discard_ratio: float = 0.0,
) -> Float[Tensor, "batch query key"]:
    """One block's rollout matrix ``Â = residual·I + (1 − residual)·fused``, rows renormalised.

    The per-block step of :func:`attention_rollout`, shared by the cached route and by
    :mod:`mechnorm.streaming` (which calls it inside the ``hook_pattern`` forward hook).

    Example:
        >>> rollout_mixing(torch.full((1, 2, 2, 2), 0.5), torch.ones(1, 2, 2, dtype=torch.bool))[0]
        tensor([[0.7500, 0.2500],
                [0.2500, 0.7500]])
    """
    fused = _fuse(pattern.float()[None], head_fusion)[0].masked_fill(~visible, 0.0)  # not NaN·0 at padding
    if discard_ratio > 0:
        fused = _discard_smallest(fused, visible, discard_ratio)
    eye = torch.eye(fused.shape[-1], device=fused.device)
    mixed = residual * eye + (1.0 - residual) * fused
    # a padded query row can be all zero (residual = 0): keep it zero rather than 0/0
    return mixed / mixed.sum(-1, keepdim=True).clamp_min(torch.finfo(mixed.dtype).tiny)


def rollout_rows(mixed: Sequence[Tensor], pred: Tensor, layers: Sequence[int]) -> Float[Tensor, "layer batch key"]:
    """Row ``pred`` of ``R_l = Â_l ⋯ Â_1`` for each l in ``layers``, as vector–matrix products.

    ``e_pred · Â_l ⋯ Â_1`` is taken right to left from the prediction row, block by block
    for all requested layers at once, so only ``[layer, batch, pos]`` rows are formed:
    ``O(layers · blocks · pos²)`` work, against the ``O(blocks · pos³)`` of multiplying the
    full ``[pos, pos]`` products.

    Example:
        >>> eye = torch.eye(2)[None]
        >>> rollout_rows([eye, eye], torch.tensor([1]), [0, 2])[:, 0]
        tensor([[0., 1.],
                [0., 1.]])
    """
    start = torch.nn.functional.one_hot(pred.to(mixed[0].device), mixed[0].shape[-1]).float()  # [batch, key]
    rows = start.expand(len(layers), *start.shape).clone()  # [layer, batch, key]
    for block in reversed(range(max(layers))):
        active = [i for i, layer in enumerate(layers) if layer > block]  # chains that pass through this block
        rows[active] = torch.einsum("lbq,bqk->lbk", rows[active], mixed[block])
    return rows


def _patterns(cache, blocks, method: str) -> Float[Tensor, "block batch head query key"]:
    names = [PATTERN_HOOK.format(i=i) for i in blocks]
    require_hooks(cache, names, method)
    return torch.stack([cache[name].float() for name in names])


def _fuse(patterns: Tensor, how: str) -> Float[Tensor, "block batch query key"]:
    if how == "mean":
        return patterns.mean(2)
    return patterns.amax(2) if how == "max" else patterns.amin(2)


def _mask_and_positions(cache, patterns, attention_mask, target, positions) -> tuple[Tensor, Tensor]:
    batch, pos = patterns.shape[1], patterns.shape[-1]
    mask = check_mask(attention_mask, batch, pos, device=patterns.device)
    if positions is not None:
        pred = torch.as_tensor(positions, device=mask.device).long().reshape(-1)
        if pred.numel() not in (1, batch):
            raise ValueError(f"positions has {pred.numel()} entries but the batch has {batch} sequences.")
        pred = pred.expand(batch)
        if (pred < 0).any() or (pred >= pos).any():
            raise ValueError(f"positions {pred.tolist()} are outside the sequence length {pos}.")
    elif target is not None:
        pred = target.prediction_positions(mask)
    elif getattr(cache, "model", None) is not None:
        pred = prediction_positions(cache.model, mask)  # [CLS] in an encoder
    else:
        pred = last_positions(mask)
    if not mask[torch.arange(batch, device=mask.device), pred].all():
        raise ValueError("A prediction position is a padding token; pass the attention mask used for the forward pass.")
    return mask, pred


def _visible(cache, mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch query key"]:
    """Keys each query may attend to: real tokens, and for a causal model no later ones."""
    visible = mask[:, None, :] & mask[:, :, None]  # padded queries and keys take no part
    model = getattr(cache, "model", None)
    # a TransformerBridge around BERT reports attention_dir="causal": ask is_encoder instead
    if model is None or not is_encoder(model):
        visible = visible.tril()
    return visible


def _discard_smallest(fused: Tensor, visible: Tensor, ratio: float) -> Tensor:
    """Zero the ``ratio`` fraction of smallest weights among each row's visible keys."""
    n_drop = (visible.sum(-1) * ratio).floor().long()  # [batch, query]
    ranked = fused.masked_fill(~visible, float("inf")).argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
    return fused.masked_fill(ranked < n_drop[..., None], 0.0)
