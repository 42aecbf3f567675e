"""Streaming: cache-only methods computed inside forward hooks, layer by layer, then dropped.

A cached run keeps every activation a method reads until the method runs; attention rollout
reads every block's ``[batch, head, pos, pos]`` pattern, which at 2,000 tokens of SmolLM2 is
several GB. :func:`run_streamed` runs **one** forward pass whose hooks reduce each activation
as it appears, with the same per-layer function the cached route calls, and keep only
the reduced result:

* ``rollout``: each block's pattern is fused over heads and mixed with the identity
  (:func:`~mechnorm.methods.attention.rollout_mixing`) in its ``hook_pattern`` hook; only the
  lower triangle of the ``[batch, pos, pos]`` mixing matrix is kept (1/(2·heads) of the
  pattern; a causal model's matrix is zero above the diagonal). The rows are then read right
  to left from the prediction position (:func:`~mechnorm.methods.attention.rollout_rows`).
* ``attention`` (raw): only the one block it reads is kept.
* ``normxlogit``, ``logat``, ``embedding_norm``: the residual rows ``[batch, pos, d_model]`` per
  layer are kept (what the prediction is is known only at the end of the pass, and LogAt reads
  every position through the head at that prediction). They are L+1 rows of ``d_model``
  per token: 143 MB for SmolLM2 at 2,000 tokens, against 4.3 GB of attention patterns.
* the forward pass stops at the unembedding's input: the prediction is read from the
  prediction rows only, so no ``[batch, pos, vocab]`` logits tensor is made.

* ``logit_lens``: the same residual rows (and the final norm's ``[batch, pos, 1]`` scale); the
  lens reads any position and layer of them, so they are kept whole.
* ``dla`` (``direct_logit_attribution``): the components are kept at the prediction positions
  only (each sequence's last real token, known from the mask before the pass): per block
  ``hook_z`` and ``hook_mlp_out`` rows ``[batch, d_model]`` instead of ``[batch, pos, d_model]``,
  and a learned ``hook_pos_embed`` and the input residual likewise (:mod:`mechnorm.streaming_rows`;
  reading them at another position raises). The word embeddings (the labels and the shapes
  read them at every position) and the final norm's ``[batch, pos, 1]`` scale stay whole: one
  of the cache's 2L + 3 ``[pos, d_model]`` tensors (two on a bridge, which also names the
  word embeddings ``embed.hook_out``).

The result is an ``ActivationCache`` holding only the kept tensors; the registered methods
read it exactly as they read a cache, so their checks, options and results are the cached
route's. The lens and DLA return other result types than ``attribute()`` compares, so call
them on the small cache::

    target, cache = mechnorm.run_streamed(model, batch, ["logit_lens", "dla"])
    lens = mechnorm.logit_lens(cache, model, target, attention_mask=batch.attention_mask)
    dla = mechnorm.direct_logit_attribution(cache, model, target, attention_mask=batch.attention_mask)
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor

from .inputs import UNEMBED_IN_HOOK, Batch, model_device, run_until
from .methods.attention import PATTERN_HOOK, _visible, rollout_mixing
from .methods.registry import HookFilter, canonical_name, get_method, hooks_for
from .residual import at_positions, resolve_layers
from .streaming_rows import prediction_rows
from .targets import Target, last_positions, predicted

#: methods :func:`run_streamed` computes layer by layer; any other cache-only method needs a cache
STREAMABLE = frozenset({"normxlogit", "logat", "embedding_norm", "rollout", "attention", "logit_lens", "dla"})
#: what DLA reads at the prediction positions only (kept as rows there unless also asked for whole)
DLA_ROW_HOOKS = HookFilter(frozenset({"hook_pos_embed", "blocks.0.hook_resid_pre"}),
                           frozenset({"blocks.{i}.attn.hook_z", "blocks.{i}.hook_mlp_out"}))



def can_stream(methods: Sequence[str]) -> bool:
    """True when every named cache-only method can be streamed (see :data:`STREAMABLE`).

    Example:
        >>> can_stream(["normxlogit", "logit_lens", "direct_logit_attribution"]), can_stream(["decompx"])
        (True, False)
    """
    return all(canonical_name(name) in STREAMABLE for name in methods)


@torch.inference_mode()
def run_streamed(
    model,
    batch: Batch,
    methods: Sequence[str],
    options: dict[str, dict] | None = None,
    keep: HookFilter | None = None,
) -> tuple[Target, "object"]:
    """One forward pass that reduces activations in hooks; a small cache for ``methods``.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        batch: the padded inputs (:func:`mechnorm.tokenize`).
        methods: streamable method names (:data:`STREAMABLE`), aliases accepted
            (``"direct_logit_attribution"`` for ``"dla"``).
        options: per-method keyword arguments, as for :func:`mechnorm.attribute`; rollout's
            ``head_fusion``, ``residual``, ``discard_ratio`` and raw attention's ``layer`` decide
            what the hooks keep, so pass the same options to the methods afterwards.
        keep: extra hooks to keep whole (e.g. the word embeddings for gradient methods).

    Returns:
        ``(prediction, cache)``: the model's argmax at each sequence's last real token (as
        :func:`mechnorm.predicted` reads it from the logits), and an ``ActivationCache`` that
        the methods read as usual (its ``prediction_logits`` holds the ``[batch, vocab]``
        logits at those tokens).

    Example:
        >>> batch = mechnorm.tokenize(model, ["The keys to the cabinet"])           # doctest: +SKIP
        >>> target, cache = run_streamed(model, batch, ["normxlogit", "rollout"])     # doctest: +SKIP
        >>> mechnorm.attention_rollout(cache, attention_mask=batch.attention_mask)    # doctest: +SKIP
        >>> target, cache = run_streamed(model, batch, ["logit_lens", "dla"])        # doctest: +SKIP
        >>> mechnorm.logit_lens(cache, model, target, attention_mask=batch.attention_mask)  # doctest: +SKIP
        >>> mechnorm.direct_logit_attribution(cache, model, target, attention_mask=batch.attention_mask)  # doctest: +SKIP

    DLA's components are kept at the prediction positions only (``positions="prediction"``);
    pass ``keep=mechnorm.hooks_for("dla")`` to read them at other positions.
    """
    from transformer_lens import ActivationCache

    methods = [canonical_name(name) for name in methods]
    refused = sorted(set(methods) - STREAMABLE)
    if refused:
        raise ValueError(f"{refused} cannot be streamed (streamable: {sorted(STREAMABLE)}); "
                         "run them on a cache (mechnorm.attribute(..., stream=False)).")
    options = options or {}
    n_layers = int(model.cfg.n_layers)
    store: dict[str, Tensor] = {}
    streamed: dict[tuple, list] = {}
    device = model_device(model)
    mask = batch.attention_mask.to(device)
    positions = last_positions(mask)

    others = [name for name in methods if name != "dla"]
    whole = (hooks_for(*others) if others else HookFilter()) | (keep or HookFilter())
    whole = HookFilter(whole.names, whole.patterns - {PATTERN_HOOK})
    dla = hooks_for("dla") if "dla" in methods else HookFilter()
    row_hooks = [name for name in model.hook_dict if dla(name) and DLA_ROW_HOOKS(name) and not whole(name)]
    kept = [name for name in model.hook_dict if whole(name) or (dla(name) and name not in row_hooks)]
    slabs = _Slabs(len(kept) + 1)
    hooks = [(name, _keeper(store, name, slabs)) for name in kept]
    if row_hooks:  # one buffer for every kept row, allocated before the pass (see _Slabs)
        cfg = model.cfg
        width = len(mask) * max(int(cfg.d_model), int(cfg.n_heads) * int(cfg.d_head))
        buffer = torch.empty(len(row_hooks), width, dtype=getattr(cfg, "dtype", None) or torch.float32, device=device)
        hooks += [(name, _row_keeper(store, name, positions, buffer[i])) for i, name in enumerate(row_hooks)]
    if "rollout" in methods:
        settings = _settings("rollout", options, ("head_fusion", "residual", "discard_ratio"))
        visible = _visible(ActivationCache({}, model), mask)
        mixed = _LowerTriangles(n_layers, visible)
        streamed[("rollout", *settings)] = mixed
        for block in range(n_layers):
            hooks.append((PATTERN_HOOK.format(i=block), _mixer(mixed, block, visible, settings)))
    if "attention" in methods:
        (layer,) = _settings("attention", options, ("layer",))
        block = max(resolve_layers(layer, n_layers)[0] - 1, 0)  # layer 0 is refused by the method itself
        name = PATTERN_HOOK.format(i=block)
        hooks.append((name, _keeper(store, name, _Slabs(1))))
    out, stopped = run_until(model, batch.tokens.to(device), UNEMBED_IN_HOOK, mask, hooks)
    rows = at_positions(out, positions)  # [batch, d_model] final residual rows, or logits without an unembedding hook
    del out
    if stopped:
        rows = rows @ model.W_U  # [batch, vocab]: the prediction rows only
        bias = getattr(model, "b_U", None)
        rows = rows if bias is None else rows + bias
    for mixed in streamed.values():
        missing = [i for i, m in enumerate(mixed.packed) if m is None]
        if missing:
            raise RuntimeError(f"The forward pass did not reach hook_pattern of blocks {missing}; this model computes "
                               "attention without hooking its pattern, so rollout cannot be streamed.")
    cache = ActivationCache(store, model)  # made now so its has_embed flags see the kept hooks
    cache.streamed = streamed  # what the methods look up instead of the patterns
    cache.prediction_logits = rows  # [batch, vocab] at each sequence's last real token
    prediction = predicted(rows[:, None], tokenizer=getattr(model, "tokenizer", None))
    return replace(prediction, positions=positions), cache


def _settings(method: str, options: dict, names: Sequence[str]) -> tuple:
    """The method's values of ``names``: the caller's options, else the function's defaults."""
    parameters = inspect.signature(get_method(method).function).parameters
    given = options.get(method, {})
    return tuple(given.get(name, parameters[name].default) for name in names)


def _row_keeper(store: dict, name: str, positions: Tensor, out: Tensor):
    def keep(act, hook):
        store[name] = prediction_rows(act, positions, name, out)

    return keep


def _keeper(store: dict, name: str, slabs: "_Slabs"):
    def keep(act, hook):  # a bridge's hook.name can be the aliased module's, so the name is bound here
        store[name] = slabs.keep(act.detach())

    return keep


class _Slabs:
    """Kept activations copied into one buffer per shape, allocated at its first use.

    The model allocates each activation among its temporaries; keeping those tensors pins
    the allocator's heap between them. One large buffer (mapped outside that heap, and only
    its written pages resident) lets the temporaries' memory be reused. Copies are exact.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slabs: dict[tuple, list] = {}

    def keep(self, act: Tensor) -> Tensor:
        key = (tuple(act.shape), act.dtype, act.device)
        if key not in self.slabs:
            self.slabs[key] = [torch.empty((self.capacity, *act.shape), dtype=act.dtype, device=act.device), 0]
        slab = self.slabs[key]
        if slab[1] == self.capacity:  # more of this shape than hooks were counted: keep it as is
            return act
        slab[0][slab[1]].copy_(act)
        slab[1] += 1
        return slab[0][slab[1] - 1]


def _mixer(mixed: "_LowerTriangles", block: int, visible: Tensor, settings: tuple):
    def mix(pattern, hook):
        mixed.pack(block, rollout_mixing(pattern, visible, *settings))

    return mix


class _LowerTriangles:
    """Rollout's per-block ``[batch, pos, pos]`` matrices, kept as their lower triangles.

    A causal model's mixing matrix is zero above the diagonal (no query sees a later key), so
    only the lower triangle is stored: half the memory, and unpacking is exact. Indexing
    returns the full matrix.
    """

    def __init__(self, n_blocks: int, visible: Tensor):
        batch, pos = visible.shape[0], visible.shape[-1]
        self.lower = torch.ones(pos, pos, dtype=torch.bool, device=visible.device).tril()
        # one buffer for all blocks, allocated before the pass: the kept triangles do not sit
        # between the pass's temporaries in the allocator's heap, which then can be reused
        self.store = torch.empty(n_blocks, batch, pos * (pos + 1) // 2, device=visible.device)
        self.filled = [False] * n_blocks

    @property
    def packed(self) -> list[Tensor | None]:
        """Each block's lower triangle, ``[batch, pos·(pos+1)/2]`` (None where not reached)."""
        return [self.store[i] if done else None for i, done in enumerate(self.filled)]

    def pack(self, block: int, matrix: Tensor) -> None:
        if matrix[:, ~self.lower].any():
            raise RuntimeError("A causal model's rollout matrix has weight above the diagonal; stream=False computes it.")
        torch.masked_select(matrix, self.lower, out=self.store[block].view(-1))
        self.filled[block] = True

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, block: int) -> Tensor:
        packed = self.packed[block]
        full = packed.new_zeros(packed.shape[0], *self.lower.shape)
        full[:, self.lower] = packed
        return full




__all__ = ["STREAMABLE", "can_stream", "run_streamed"]
