"""Reading embeddings and per-layer residuals out of an ``ActivationCache``.

Layer index = blocks applied: layer 0 is ``blocks.0.hook_resid_pre`` (the analogue of HF
``hidden_states[0]``), layer l >= 1 is ``blocks.{l-1}.hook_resid_post``; a model with L
blocks has L+1 layers. In a post-LN ``HookedEncoder`` (BERT) ``hook_resid_post`` comes before
the block's output LayerNorm, so layer l is read from ``hook_normalized_resid_post`` there,
which is HF's ``hidden_states[l]``.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

INPUT_HOOK = "blocks.0.hook_resid_pre"
TOKEN_EMBED_HOOK = "hook_embed"
ENCODER_TOKEN_EMBED_HOOK = "embed.hook_embed"  # HookedEncoder (BERT) nests its word embedding
# A TransformerBridge aliases hook_embed to the embedding LayerNorm's output where there is one
# (BERT), so its word embedding proper is read from the embedding module itself.
BRIDGE_TOKEN_EMBED_HOOK = "embed.hook_out"
TOKEN_EMBED_HOOKS = frozenset({TOKEN_EMBED_HOOK, ENCODER_TOKEN_EMBED_HOOK, BRIDGE_TOKEN_EMBED_HOOK})
#: per-block templates of the layer residuals; the normalised one exists only in post-LN encoders
RESID_PATTERNS = frozenset({"blocks.{i}.hook_resid_post", "blocks.{i}.hook_normalized_resid_post"})


class MissingHooksError(KeyError):
    """The cache lacks activations a method reads."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def resid_hook(layer: int, post_norm: bool = False) -> str:
    """Hook name holding the residual after ``layer`` blocks (``post_norm`` for post-LN encoders)."""
    if layer == 0:
        return INPUT_HOOK
    return f"blocks.{layer - 1}.hook_normalized_resid_post" if post_norm else f"blocks.{layer - 1}.hook_resid_post"


def at_positions(values: Tensor, positions: Tensor) -> Tensor:
    """``values[b, positions[b]]`` for every sequence b: ``[batch, pos, *]`` with ``[batch]``
    positions gives ``[batch, *]``, with ``[batch, k]`` positions ``[batch, k, *]``."""
    rows = torch.arange(values.shape[0], device=values.device).view(-1, *[1] * (positions.ndim - 1))
    return values[rows, positions.to(values.device)]


def is_post_norm(cache) -> bool:
    """True when the cache comes from a post-LN ``HookedEncoder`` (see the module docstring)."""
    return model_is_post_norm(getattr(cache, "model", None))


def model_is_post_norm(model) -> bool:
    """True for a post-LN ``HookedEncoder``, whose layers are read after each block's LayerNorm."""
    return type(model).__name__ == "HookedEncoder"


def final_resid_hook(model) -> str:
    """Hook name of the final residual (layer L), which the head-on-top reads."""
    return resid_hook(int(model.cfg.n_layers), model_is_post_norm(model))


def token_embed_hook(model_or_cache) -> str:
    """Hook name of the word embeddings alone (no position embedding, no norm).

    ``hook_embed`` in a HookedTransformer, ``embed.hook_embed`` in a HookedEncoder and
    ``embed.hook_out`` in a TransformerBridge. Given a cache, its model decides, or else the
    hook the cache holds.
    """
    model = model_or_cache if hasattr(model_or_cache, "hook_dict") else getattr(model_or_cache, "model", None)
    names = model.hook_dict if hasattr(model, "hook_dict") else model_or_cache.keys()
    for name in (ENCODER_TOKEN_EMBED_HOOK, BRIDGE_TOKEN_EMBED_HOOK, TOKEN_EMBED_HOOK):
        if name in names:
            return name
    owner = type(model).__name__ if hasattr(model, "hook_dict") else "The cache"
    raise ValueError(f"{owner} has no word-embedding hook (one of {sorted(TOKEN_EMBED_HOOKS)}); "
                     "gradient methods, embedding ablation and embedding_norm(which='token') need one.")


def n_blocks(cache) -> int:
    """Number of transformer blocks of the model that produced ``cache``."""
    model = getattr(cache, "model", None)
    if model is not None:
        return int(model.cfg.n_layers)
    indices = [int(m.group(1)) for k in cache.keys() if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not indices:
        raise ValueError("Cannot tell the number of layers: the cache has no blocks.* hooks and no model.")
    return max(indices) + 1


def resolve_layers(layers: int | Sequence[int] | None, n_layers: int) -> list[int]:
    """Layer indices 0…L from ``None`` (all), an int or a list; negatives count from L."""
    if layers is None:
        return list(range(n_layers + 1))
    requested = [layers] if isinstance(layers, int) else list(layers)
    if not requested:
        raise ValueError("layers is empty; pass None for all layers.")
    resolved = []
    for layer in requested:
        index = layer + n_layers + 1 if layer < 0 else layer
        if not 0 <= index <= n_layers:
            raise ValueError(f"Layer {layer} is out of range: this model has layers 0…{n_layers} (blocks applied).")
        resolved.append(index)
    return resolved


def require_hooks(cache, names: Iterable[str], method: str) -> None:
    """Raise :class:`MissingHooksError` listing the hooks to cache when any is absent."""
    missing = [name for name in names if name not in cache]
    if missing:
        raise MissingHooksError(
            f"{method} needs activations the cache does not hold: {missing}. Cache them with "
            f"model.run_with_cache(tokens, names_filter=mechnorm.hooks_for(...)) naming the method, "
            f"or names_filter=lambda name: name in {missing!r} plus what you already cache."
        )


def layer_residuals(
    cache, layers: Sequence[int], method: str, mask: Bool[Tensor, "batch pos"] | None = None
) -> list[Float[Tensor, "batch pos d_model"]]:
    """The residual stream at each of ``layers``, as the cache holds it (no copy).

    Each is checked to be finite at the real positions of ``mask`` (all positions when None):
    see :func:`require_finite`.
    """
    post_norm = is_post_norm(cache)
    names = [resid_hook(layer, post_norm) for layer in layers]
    require_hooks(cache, names, method)
    return [require_finite(cache[name], name, mask) for name in names]


class NonFiniteError(ValueError):
    """A cached activation a method reads holds NaN or inf at a real position."""


def require_finite(values: Tensor, hook: str, real: Tensor | None = None) -> Tensor:
    """``values`` unchanged, or :class:`NonFiniteError` naming the hook, layer, batch and position
    of the first NaN/inf at a real position.

    Args:
        values: a cached activation, ``[batch, pos, ...]`` (or ``[batch, head, query, key]``
            for attention patterns, with ``real`` shaped to match).
        hook: its hook name, for the message.
        real: boolean, broadcastable to the leading dims of ``values``: True where the
            values are read (``[batch, pos]`` for residuals); padding may hold anything.

    The common case costs one ``isfinite().all()``; positions are located only on failure.

    Example:
        >>> require_finite(torch.ones(1, 2, 3), "blocks.0.hook_resid_post").shape
        torch.Size([1, 2, 3])
    """
    if bool(torch.isfinite(values).all()):
        return values
    bad = ~torch.isfinite(values)
    if real is not None:
        real = real.to(bad.device).bool()
        bad = bad & real.reshape(*real.shape, *[1] * (values.ndim - real.ndim))
    found = bad.nonzero()
    if not len(found):
        return values  # non-finite only at padding, which no method reads
    where = found[0].tolist()
    kind = "NaN" if bool(torch.isnan(values[tuple(where)])) else "inf"
    position = f"batch {where[0]}, pos {where[1]}" if "hook_pattern" not in hook else f"batch {where[0]}, head {where[1]}, query {where[2]}, key {where[3]}"
    raise NonFiniteError(
        f"{hook} ({_layer_words(hook)}) holds {kind} at {position} ({len(found)} non-finite values at real "
        "positions): the model produced non-finite activations. Check the input, the dtype (float16 overflows; "
        "try float32 or bfloat16) and the weights."
    )


def _layer_words(hook: str) -> str:
    """``"block 3; layer 4 in blocks applied"`` for a per-block hook, the layer for the input hook."""
    if hook == INPUT_HOOK:
        return "layer 0, the input"
    match = re.match(r"blocks\.(\d+)\.(.*)", hook)
    if match is None:
        return "before block 0" if "embed" in hook else "after the last block"
    block = int(match.group(1))
    if match.group(2) in ("hook_resid_post", "hook_normalized_resid_post"):
        return f"layer {block + 1} = after block {block}"
    if match.group(2) == "hook_resid_pre":
        return f"layer {block} = before block {block}"
    return f"block {block}"


def check_mask(attention_mask: Tensor | None, batch: int, pos: int, device=None) -> Bool[Tensor, "batch pos"]:
    """A boolean ``[batch, pos]`` mask (all True when None), validated against the shape."""
    if pos == 0:
        raise ValueError("The sequences are empty (0 positions); give at least one token per sequence.")
    if attention_mask is None:
        return torch.ones(batch, pos, dtype=torch.bool, device=device)
    mask = torch.as_tensor(attention_mask, device=device)
    if tuple(mask.shape) != (batch, pos):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the cached activations are "
            f"[batch={batch}, pos={pos}]; pass the mask used for the forward pass."
        )
    mask = mask.bool()
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"Sequence(s) {empty} have no real tokens under attention_mask (all padding).")
    return mask


def cache_mask(cache, attention_mask: Tensor | None) -> Bool[Tensor, "batch pos"]:
    """The validated mask for the sequences in ``cache`` (shape read from its input hook)."""
    require_hooks(cache, [INPUT_HOOK], "mechnorm")
    batch, pos = cache[INPUT_HOOK].shape[:2]
    return check_mask(attention_mask, batch, pos, device=cache[INPUT_HOOK].device)
