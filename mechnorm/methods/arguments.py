"""Arguments as TransformerLens users pass them, turned into what the methods read.

Every cache-reading method starts with :func:`prepare`, so all of them accept the same habits:

* a cache from ``model.run_with_cache(..., remove_batch_dim=True)`` (the batch axis is put back:
  results are ``[layer, 1, pos]``), and 1-D ``tokens`` / ``attention_mask`` for it;
* the model where a head is expected (``UnembedHead(model)``), or no head (the cache's model);
* a token id, a string, or a list of them (one per sequence) where a target is expected, a
  class name of a classifier head, or no target: the model's own prediction, read from the
  cached final residual through the head at each sequence's last real token (``[CLS]`` in an
  encoder);
* no ``tokens=``: the token ids are read back from the cached word embeddings (``hook_embed``,
  which ``mechnorm.hooks_for`` always keeps), to label the result;
* no ``attention_mask=`` on a padded batch (``model.to_tokens([...])``): the mask is inferred
  from the tokenizer's pad id (:func:`mechnorm.inputs.infer_mask`), and a target whose
  prediction position is padding is refused with the call that fixes it.
"""

from __future__ import annotations

import copy
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from ..heads import AffineHead, Head, UnembedHead
from ..inputs import infer_mask, is_encoder, prediction_positions, require_head_for_encoder
from ..residual import TOKEN_EMBED_HOOKS, at_positions, check_mask, final_resid_hook
from ..targets import Target, id_labels, last_positions, token_target
from ..warn import warn

_HEADS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its UnembedHead
_VOCAB_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (version, keys, order)
LOGITS_HOOK = "unembed.hook_out"


class Prepared(NamedTuple):
    """A method's arguments after :func:`prepare`."""

    cache: object
    head: Head | None
    target: Target | None
    attention_mask: Tensor | None
    tokens: Tensor | None


def as_cache(cache):
    """The cache with a batch axis: one from ``run_with_cache(..., remove_batch_dim=True)`` gets
    its single sequence's axis back, so every method reads ``[batch=1, ...]``.

    Example:
        >>> _, cache = model.run_with_cache(tokens, remove_batch_dim=True)   # doctest: +SKIP
        >>> as_cache(cache)["blocks.0.hook_resid_pre"].shape                 # doctest: +SKIP
        torch.Size([1, 5, 64])
    """
    if getattr(cache, "has_batch_dim", True) is not False:
        return cache
    return type(cache)({name: value[None] for name, value in cache.cache_dict.items()}, cache.model, has_batch_dim=True)


def as_head(head_or_model, cache, model=None) -> Head:
    """A :class:`~mechnorm.heads.Head`: the head itself, ``UnembedHead(model)`` for a model, or the
    cache's model's ``UnembedHead`` for None.

    Example:
        >>> as_head(model, cache)                                           # doctest: +SKIP
        UnembedHead(...)
    """
    if isinstance(head_or_model, Head):
        return head_or_model
    model = head_or_model if head_or_model is not None else (model if model is not None else getattr(cache, "model", None))
    if model is None:
        raise ValueError("No head and no model to make one: pass the model or its head, e.g. "
                         "mechnorm.normxlogit(cache, model) or mechnorm.normxlogit(cache, mechnorm.UnembedHead(model)).")
    if not (hasattr(model, "W_U") and hasattr(model, "cfg")):
        raise TypeError(f"head must be a mechnorm Head or a TransformerLens model, got {type(model).__name__}; "
                        "e.g. mechnorm.normxlogit(cache, model) or head=mechnorm.UnembedHead(model).")
    if head_or_model is None:
        require_head_for_encoder(model, None)
    if model not in _HEADS:
        _HEADS[model] = UnembedHead(model)
    return _HEADS[model]


def as_target(target, cache, head: Head | None, mask: Tensor, model=None) -> Target:
    """A :class:`~mechnorm.targets.Target` from what a user would pass.

    ``None``: the model's prediction at each sequence's prediction position, read from the
    cached final residual through ``head`` (or the cached logits, ``unembed.hook_out``);
    an int, a string or a list of them: ``token_target`` (a string naming one of a classifier
    head's ``labels`` picks that class); a ``Target``: itself.

    Example:
        >>> as_target(" are", cache, head, mask)                             # doctest: +SKIP
    """
    if isinstance(target, Target):
        return target
    model = model if model is not None else getattr(cache, "model", None)
    if target is None:
        return _cache_prediction(cache, head, mask, model)
    values = [target] if isinstance(target, (int, str)) else target
    if isinstance(values, (list, tuple, Tensor)) and not isinstance(target, bool):
        labels = getattr(head, "labels", None)
        if labels and all(isinstance(v, str) and v in labels for v in values):
            ids = torch.tensor([labels.index(v) for v in values])
            return Target(ids=ids, labels=tuple(values))
        return token_target(values, model)
    raise TypeError(f"target must be a Target, a token id, a string or a list of them, got {type(target).__name__}; "
                    "e.g. mechnorm.normxlogit(cache, model, ' are') or target=mechnorm.predicted(logits).")


@torch.inference_mode()
def _cache_prediction(cache, head: Head | None, mask: Tensor, model) -> Target:
    if model is None or head is None:
        raise ValueError("No target given and no model to predict it: pass target=mechnorm.predicted(logits), "
                         "e.g. logits, cache = model.run_with_cache(tokens); mechnorm.normxlogit(cache, model, mechnorm.predicted(logits)).")
    mask = mask.to(_device(cache))
    positions = prediction_positions(model, mask) if is_encoder(model) else last_positions(mask)
    final = final_resid_hook(model)
    if final in cache:
        reader = head
        if isinstance(head, UnembedHead) and head.ln == "frozen":  # the frozen scale is the final one anyway
            reader = copy.copy(head)
            reader.ln = "recompute"
        logits = _all_logits(reader, at_positions(cache[final], positions)[:, None], cache)[:, 0]
    elif LOGITS_HOOK in cache and isinstance(head, UnembedHead):
        logits = at_positions(cache[LOGITS_HOOK], positions).float()
    else:
        raise ValueError(f"No target given, and the cache lacks the final residual ({final!r}) to predict it from: "
                         "cache it (names_filter=mechnorm.hooks_for('normxlogit') keeps it) or pass "
                         "target=mechnorm.predicted(logits) from logits, cache = model.run_with_cache(tokens).")
    ids = logits.argmax(-1)
    probs = logits.softmax(-1).gather(-1, ids[:, None])[:, 0]
    labels = getattr(head, "labels", None)
    labels = tuple(labels[i] for i in ids.tolist()) if labels else id_labels(ids.cpu(), getattr(model, "tokenizer", None))
    return Target(ids=ids.cpu(), positions=positions.cpu(), labels=labels, probs=probs.cpu())


def _all_logits(head: Head, rows: Tensor, cache) -> Tensor:
    """Every output's logit for ``rows`` ``[batch, 1, d_model]``; an affine head multiplies by its
    weight in the layout it is stored in (``W_U`` is often a transposed view, slow to slice)."""
    if not isinstance(head, AffineHead):
        return head(rows, None, cache=cache).float()
    logits = torch.nn.functional.linear(head.normalise(rows, cache), head.weight_out.T.float())
    return head.cap(logits if head.bias_out is None else logits + head.bias_out.float())


@torch.inference_mode()
def cache_tokens(cache, model=None) -> Tensor | None:
    """The token ids a cache was computed from, read back from its word embeddings, or None.

    Each cached word embedding is matched to the row of ``W_E`` it equals (a random projection
    finds the candidate, an exact comparison confirms it); None when the cache holds no word
    embedding or a row matches no token (scaled or processed embeddings).

    Example:
        >>> cache_tokens(cache)                                              # doctest: +SKIP
        tensor([[  504,  8889,   288]])
    """
    model = model if model is not None else getattr(cache, "model", None)
    hook = next((name for name in ("hook_embed", "embed.hook_embed", "embed.hook_out") if name in cache), None)
    if model is None or hook is None or not hasattr(model, "W_E"):
        return None
    embeds = cache[hook]
    w_e = model.W_E.detach()
    if embeds.ndim != 3 or embeds.shape[-1] != w_e.shape[-1]:
        return None
    keys, order, direction = (t.to(embeds.device) for t in _vocab_keys(model, w_e))
    flat = embeds.reshape(-1, embeds.shape[-1])
    query = flat.double() @ direction
    index = torch.searchsorted(keys, query).clamp(1, len(keys) - 1)
    nearest = torch.where((query - keys[index - 1]).abs() <= (keys[index] - query).abs(), index - 1, index)
    ids = order[nearest]
    if not torch.allclose(w_e.to(flat.device)[ids].float(), flat.float(), rtol=1e-4, atol=1e-6):
        return None
    return ids.reshape(embeds.shape[:2]).cpu()


def _vocab_keys(model, w_e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted projections of every token embedding on a fixed random direction (memoised)."""
    version = (w_e.data_ptr(), w_e._version, tuple(w_e.shape))
    memo = _VOCAB_KEYS.get(model)
    if memo is None or memo[0] != version:
        direction = torch.randn(w_e.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        keys, order = (w_e.double() @ direction.to(w_e.device)).sort()
        memo = (version, keys, order, direction)
        _VOCAB_KEYS[model] = memo
    return memo[1], memo[2], memo[3]


def prepare(cache, head=None, target=None, attention_mask=None, tokens=None, *, model=None,
            need_head: bool = True, need_target: bool = True) -> Prepared:
    """Coerce a method's arguments (see the module docstring); every cache-reading method calls it first.

    ``need_head``/``need_target``: whether the method reads a head / a target (a method that
    reads only the target's positions passes ``need_target=False``: None then stays None).

    Example:
        >>> cache, head, target, mask, tokens = prepare(cache, model, " are")   # doctest: +SKIP
    """
    cache = as_cache(cache)
    model = model if model is not None else getattr(cache, "model", None)
    if tokens is not None:
        tokens = torch.as_tensor(tokens)
        tokens = tokens[None] if tokens.ndim == 1 else tokens
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        attention_mask = attention_mask[None] if attention_mask.ndim == 1 else attention_mask
    read = tokens if tokens is not None else cache_tokens(cache, model)
    tokenizer = getattr(model, "tokenizer", None)
    if read is not None and tokenizer is not None:
        _warn_unknown_tokens(read, tokenizer)
        if attention_mask is None:
            attention_mask = infer_mask(read, tokenizer)
    head = as_head(head, cache, model) if need_head else head
    if need_target or target is not None:
        real = _all_real(cache)
        mask = real if attention_mask is None else check_mask(attention_mask, *real.shape)
        target = as_target(target, cache, head, mask, model)
        if attention_mask is not None:
            target.check_positions(mask)
    return Prepared(cache, head, target, attention_mask, tokens if tokens is not None else read)


def _warn_unknown_tokens(tokens: Tensor, tokenizer) -> None:
    """Warn where the tokens hold the unknown token: out-of-vocabulary words (``model.to_tokens``
    does not say; ``mechnorm.tokenize`` names the words)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not (tokens == unk).any():
        return
    where = [tuple(p) for p in (tokens == unk).nonzero().tolist()][:5]
    warn(f"The tokens hold the unknown token {tokenizer.unk_token!r} at (sequence, position) {where}: words out of "
         "the vocabulary, read as one meaningless token. mechnorm.tokenize(model, texts) names them; rephrase them.")


def _all_real(cache) -> Tensor:
    names = list(cache.keys())
    hook = next((name for name in ("blocks.0.hook_resid_pre", *TOKEN_EMBED_HOOKS) if name in cache), None)
    hook = hook or next((name for name in names if cache[name].ndim >= 2), None)
    if hook is None:
        raise ValueError("The cache holds no activations; run model.run_with_cache(tokens, names_filter=mechnorm.hooks_for(...)).")
    value = cache[hook]
    # attention patterns are [batch, head, query, key]; every other hook starts [batch, pos]
    length = value.shape[-1] if hook.endswith(("hook_pattern", "hook_attn_scores")) else value.shape[1]
    return torch.ones(value.shape[0], length, dtype=torch.bool)


def _device(cache) -> torch.device:
    return next(iter(cache.values())).device if hasattr(cache, "values") else torch.device("cpu")
