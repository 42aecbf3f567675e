"""Value Zeroing (Mohebbi, Zuidema, Chrupała & Alishahi, EACL 2023), layer-local on any TransformerLens model.

For block l and source token j, token j's value vectors are set to zero in every head of
that block and the block alone is run again from its cached input; token i's score is how far
its block output moves:

    C_l[i, j] = 1 − cos( x̃_iˡ , x̃_iˡ^{¬j} )

with ``x̃ˡ`` the block's output (``blocks.{l}.hook_resid_post``; in a post-LN encoder the
output after the block's final LayerNorm, HF's ``hidden_states[l+1]``). Rows are divided by
their sum (``aggregate="none"``, the paper's per-layer map) or rolled out across blocks
(``aggregate="rollout"``, the paper's aggregated variant).

How the block is run alone: one forward pass of the original batch records the exact
arguments the model gives each needed block (attention mask, rotary cos/sin, position ids:
whatever the model class passes) and stops after the last needed block; each block is then
called again with its cached input ``blocks.{l}.hook_resid_pre`` and those arguments, tiled
along the batch axis for a chunk of source positions, with a hook on ``blocks.{l}.attn.hook_v``
zeroing source j in copy j. This works unchanged on HookedTransformer, HookedEncoder and the
TransformerBridge of TransformerLens 3.9 and 4.x. (``run_with_hooks(start_at_layer=l)`` would
do for HookedTransformer and the 4.x bridge of decoders, but the 3.9 bridge refuses
``start_at_layer`` and HookedEncoder has no such argument.) Key-value caches the model passes
its blocks are dropped so replays never append to them.

Decoders: causal attention means zeroing v_j changes only outputs i ≥ j, so ``C_l[i, j] = 0``
for j > i; nothing else needed adapting (the block, its norms and its MLP are run as they are,
RMSNorm and rotary included).
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..inputs import mask_kwargs, model_device
from ..residual import check_mask, model_is_post_norm, n_blocks, require_hooks, resid_hook, resolve_layers
from ..targets import Target
from .arguments import prepare
from .mixing import Aggregate, blocks_needed, check_aggregate, mixing_attribution, prediction_index, visible_keys
from .registry import HookFilter, register

RESID_PRE = "blocks.{i}.hook_resid_pre"
V_HOOK = "blocks.{i}.attn.hook_v"
_HOOKS = HookFilter(patterns=frozenset({RESID_PRE, "blocks.{i}.hook_resid_post", "blocks.{i}.hook_normalized_resid_post"}))
_CACHE_ARGS = ("past_key_value", "past_key_values", "layer_past", "cache", "past_kv_cache_entry")


class _Stop(Exception):
    """Raised inside the recording pass once every needed block's call is recorded."""


@register(
    "value_zeroing",
    "Value Zeroing (Mohebbi et al. 2023): cosine distance of each block output when a token's values are zeroed.",
    _HOOKS,
    layerwise=True,
)
@torch.inference_mode()
def value_zeroing(
    model,
    cache,
    tokens,
    attention_mask=None,
    aggregate: Aggregate = "none",
    target: Target | None = None,
    positions: int | Tensor | None = None,
    layers: int | Sequence[int] | None = None,
    chunk_size: int = 256,
    return_matrices: bool = False,
    progress: bool = False,
):
    """Value Zeroing scores of every token for the prediction position, per layer.

    Args:
        model: the HookedTransformer, HookedEncoder or TransformerBridge that made ``cache``.
        cache: an ``ActivationCache`` with ``blocks.{l}.hook_resid_pre`` and the block outputs
            (``mechnorm.hooks_for("value_zeroing")``); it is read, never changed.
        tokens: ``[batch, pos]`` ids of the cached batch (to record how the model calls its
            blocks, and to label the result).
        attention_mask: ``[batch, pos]``, False at padding (left or right).
        aggregate: ``"none"`` (each block's row-normalised matrix) or ``"rollout"``.
        target: only its ``positions`` are used, when set.
        positions: prediction position(s); default: last real token, ``[CLS]`` in an encoder.
        layers: rows to report (blocks applied, 0…L); layer 0 is the identity row.
        chunk_size: most sequences per block re-run (source positions × batch are tiled).
        return_matrices: keep the full token-to-token matrices in
            ``metadata["matrices"]``, ``[batch, layer, query, key]``.
        progress: show a progress bar over blocks.

    Returns:
        An :class:`~mechnorm.result.Attribution` ``[layer, batch, pos]``, unsigned, rows sum to 1.

    Example:
        >>> _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("value_zeroing"))  # doctest: +SKIP
        >>> mechnorm.value_zeroing(model, cache, batch.tokens, batch.attention_mask).top_k(3)       # doctest: +SKIP
    """
    cache, _, target, attention_mask, tokens = prepare(cache, None, target, attention_mask, tokens, model=model,
                                                       need_head=False, need_target=False)
    check_aggregate(aggregate)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    n_layers = n_blocks(cache)
    tokens = torch.as_tensor(tokens)
    require_hooks(cache, [RESID_PRE.format(i=0)], "value_zeroing")
    device = cache[RESID_PRE.format(i=0)].device
    if tokens.ndim != 2 or tuple(tokens.shape) != tuple(cache[RESID_PRE.format(i=0)].shape[:2]):
        raise ValueError(f"tokens must be the [batch, pos] ids the cache was made from, "
                         f"{tuple(cache[RESID_PRE.format(i=0)].shape[:2])}; got shape {tuple(tokens.shape)}.")
    mask = check_mask(attention_mask, *tokens.shape, device=device)
    post_norm = model_is_post_norm(model)
    blocks = blocks_needed(resolve_layers(layers, n_layers), aggregate)
    require_hooks(cache, [n for b in blocks for n in (RESID_PRE.format(i=b), resid_hook(b + 1, post_norm))], "value_zeroing")
    pred = prediction_index(model, mask, target, positions)
    calls = _record_block_calls(model, tokens, mask, blocks)
    visible = visible_keys(model, mask)
    bar = tqdm(blocks, desc="value zeroing", disable=not progress, leave=False)
    matrices = {b: _block_matrix(model, cache, b, calls[b], post_norm, chunk_size) * visible for b in bar}
    return mixing_attribution("value_zeroing", matrices.__getitem__, n_layers, mask, pred, layers,
                              aggregate, return_matrices, cache=cache, tokens=tokens)


def _record_block_calls(model, tokens, mask, blocks: list[int]) -> dict[int, tuple[list, dict]]:
    """The positional and keyword arguments the model passes each block in ``blocks``."""
    calls: dict[int, tuple[list, dict]] = {}
    if not blocks:
        return calls

    def record(block):
        def hook(module, args, kwargs):
            calls[block] = (list(args), dict(kwargs))
            if block == blocks[-1]:
                raise _Stop

        return hook

    handles = [model.blocks[b].register_forward_pre_hook(record(b), with_kwargs=True) for b in blocks]
    device = model_device(model)
    try:
        model(tokens.to(device), **mask_kwargs(model, mask))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _block_matrix(model, cache, block: int, call, post_norm: bool, chunk_size: int) -> Float[Tensor, "batch query key"]:
    """``C[b, i, j] = 1 − cos(out_i, out_i with v_j zeroed)`` for one block."""
    resid = cache[RESID_PRE.format(i=block)]
    original = cache[resid_hook(block + 1, post_norm)].float()
    batch, pos = resid.shape[:2]
    per_chunk = max(1, chunk_size // batch)
    out_hook = resid_hook(block + 1, post_norm)
    distance = torch.zeros(batch, pos, pos, device=resid.device)  # [batch, query, key]
    for start in range(0, pos, per_chunk):
        sources = torch.arange(start, min(pos, start + per_chunk), device=resid.device)
        copies = len(sources)
        zeroed_at = sources.repeat_interleave(batch)  # copy c = (source c // batch, sequence c % batch)
        args, kwargs = _tile_call(call, resid, copies, batch)
        grabbed = {}

        def zero_values(v, hook):
            v = v.clone()
            v[torch.arange(v.shape[0], device=v.device), zeroed_at.to(v.device)] = 0.0
            return v

        def grab(x, hook):
            grabbed["out"] = x

        with model.hooks(fwd_hooks=[(V_HOOK.format(i=block), zero_values), (out_hook, grab)]):
            model.blocks[block](*args, **kwargs)
        changed = grabbed["out"].float().reshape(copies, batch, pos, -1)
        cos = torch.nn.functional.cosine_similarity(changed, original[None], dim=-1)  # [source, batch, query]
        distance[:, :, start:start + copies] = (1.0 - cos).clamp_min(0.0).permute(1, 2, 0)
    return distance


def _tile_call(call, resid: Tensor, copies: int, batch: int) -> tuple[list, dict]:
    """The recorded call with the cached block input, every per-sequence tensor tiled ``copies`` times."""
    args, kwargs = call

    def tile(value):
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == batch:
            return value.repeat(copies, *[1] * (value.ndim - 1))
        if isinstance(value, tuple):
            return tuple(tile(v) for v in value)
        if type(value).__name__.endswith("Cache"):  # HF key-value caches: never append to them
            return None
        return value

    args = [tile(a) for a in args]
    kwargs = {k: (None if k in _CACHE_ARGS else tile(v)) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    tiled = resid.repeat(copies, 1, 1)
    if args:
        args[0] = tiled
    else:
        kwargs["hidden_states"] = tiled
    return args, kwargs
