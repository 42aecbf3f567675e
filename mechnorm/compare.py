"""Run several attribution methods on the same inputs and compare them.

:func:`attribute` tokenises once, runs **one** forward pass per batch caching the union of
the cache-only methods' hooks, runs the gradient methods on the same batch and target, and
returns a :class:`Comparison`: one :class:`~mechnorm.result.Attribution` per method, a tidy
frame over all of them, and their rank agreement.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import replace
from typing import Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .heads import Head, UnembedHead
from .inputs import Batch, is_encoder, prediction_positions, require_head_for_encoder, run_with_cache, tokenize
from .methods.registry import HookFilter, get_method, hooks_for, is_lens
from .residual import at_positions, check_mask, final_resid_hook, token_embed_hook
from .result import Attribution, token_strings
from .streaming import STREAMABLE, run_streamed
from .targets import Target, predicted, with_probs
from .comparison import Comparison

DEFAULT_METHODS = ("normxlogit", "logat", "embedding_norm", "rollout", "saliency", "grad_x_input", "integrated_gradients")
_PROGRESS_AFTER = 3  # batches; a progress bar appears for longer runs


def attribute(
    model,
    inputs: str | Sequence[str] | Batch | Int[Tensor, "batch pos"],
    methods: Sequence[str] = DEFAULT_METHODS,
    target: Target | None = None,
    batch_size: int = 8,
    padding_side: Literal["left", "right"] = "right",
    attention_mask: Tensor | None = None,
    head: Head | None = None,
    options: dict[str, dict] | None = None,
    progress: bool | None = None,
    generate: int | None = None,
    stream: bool | None = None,
) -> Comparison:
    """Run attribution methods on the same inputs, one cached forward pass per batch.

    Args:
        model: a ``HookedTransformer``, ``TransformerBridge`` or ``HookedEncoder``.
        inputs: text (one string or several), a :class:`~mechnorm.inputs.Batch`, or
            ``[batch, pos]`` token ids (with ``attention_mask``).
        methods: registered method names (``mechnorm.list_methods()``).
        target: what to explain (one per sequence, or one for all); by default the
            model's prediction at each sequence's last real token, or with a classifier
            ``head`` the head's class at the prediction position (``[CLS]`` in an encoder).
        batch_size: sequences per forward pass.
        padding_side: ``"right"`` or ``"left"``, when tokenising text.
        attention_mask: ``[batch, pos]`` for token-id inputs.
        head: the head-on-top for NormXLogit, LogAt and the gradient methods (a classifier's
            ``LinearHead``); by default ``UnembedHead(model)``, and the gradient methods
            differentiate the model's own logits.
        options: extra keyword arguments per method, e.g.
            ``{"integrated_gradients": {"n_steps": 20}, "rollout": {"head_fusion": "max"}}``.
        progress: show a tqdm bar; by default only when there are more than 3 batches.
        stream: compute the cache-only methods inside forward hooks, layer by layer
            (:mod:`mechnorm.streaming`), keeping only reduced results instead of every
            activation they read (attention patterns above all); results equal the cached
            route's. None (default) streams when every cache-only method is streamable
            (NormXLogit, LogAt, embedding norm, rollout, raw attention) and the model is not an
            encoder; True insists (an error names the methods that need a cache); False caches.
            Either way the cache is released before the gradient methods run.
        generate: explain a generation instead: greedily generate this many tokens and explain
            each in turn with one method (default NormXLogit) from one forward pass; returns a
            :class:`~mechnorm.generation_result.GenerationAttribution` (a list for several texts).
            See :func:`mechnorm.generation.explain_generation`.

    Returns:
        A :class:`Comparison`.

    Example:
        >>> comp = mechnorm.attribute(model, ["The keys to the cabinet", "The dog"],
        ...                           methods=("normxlogit", "rollout", "saliency"))   # doctest: +SKIP
        >>> comp.to_frame().head()                                                     # doctest: +SKIP
    """
    if generate is not None:  # each generated token in turn, one pass: mechnorm.generation
        from .generation import explain_generation, generation_method

        method = generation_method(methods, target, DEFAULT_METHODS)
        return explain_generation(model, inputs, generate, method, head=head, options=(options or {}).get(method), progress=progress)
    if isinstance(methods, str):
        methods = (methods,)
    if not methods:
        raise ValueError("Name at least one method; see mechnorm.list_methods().")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    specs = [get_method(name) for name in methods]
    readouts = [s.name for s in specs if is_lens(s.name)]
    if readouts:  # refused before any forward pass
        raise TypeError(
            f"{readouts} return a LensResult (a layer-by-layer readout), not token scores, so attribute() cannot "
            f"compare them; call mechnorm.logit_lens(cache, model) on a cache (mechnorm.run_streamed(model, batch, "
            f"{readouts!r}) gives it a streamed one)."
        )
    require_head_for_encoder(model, head)
    given_names = dict(zip(methods, (s.name for s in specs)))  # a function name -> its registry name
    options = {given_names.get(name, name): value for name, value in (options or {}).items()}
    unknown = set(options) - set(given_names.values())
    if unknown:
        raise ValueError(f"options given for methods not run: {sorted(unknown)}; methods are {list(methods)}.")
    batch = _as_batch(model, inputs, attention_mask, padding_side)
    cache_methods = [s.name for s in specs if not s.needs_gradients]
    names_filter = hooks_for(*cache_methods) if cache_methods else HookFilter()
    embed_hook = token_embed_hook(model) if len(cache_methods) < len(specs) else None
    if embed_hook:  # gradient methods start from the cached embeddings
        names_filter = names_filter | HookFilter(frozenset({embed_hook}))
    given_head = head if head is not None and not isinstance(head, UnembedHead) else None
    if given_head is not None and target is None:  # the head's own prediction is read from the final residual
        names_filter = names_filter | HookFilter(frozenset({final_resid_hook(model)}))
    head = head if head is not None else UnembedHead(model)
    tokenizer = getattr(model, "tokenizer", None)
    stream = _resolve_stream(stream, model, cache_methods)

    starts = range(0, len(batch), batch_size)
    show = len(starts) > _PROGRESS_AFTER if progress is None else progress
    parts: dict[str, list[Attribution]] = {s.name: [] for s in specs}
    seconds = {"forward": 0.0, **{s.name: 0.0 for s in specs}}
    from tqdm.auto import tqdm

    for start in tqdm(starts, desc="mechnorm.attribute", unit="batch", disable=not show):
        rows = slice(start, start + batch_size)
        part = Batch(batch.tokens[rows], batch.attention_mask[rows], batch.strings[rows] if batch.strings else None)
        clock = time.perf_counter()
        given = None if target is None else _slice_target(target, rows, len(batch))
        logit_rows = None  # the model's logits at a given target's positions: its probabilities
        if stream:
            prediction, cache = run_streamed(model, part, cache_methods, options, keep=names_filter)
            if given is not None and given.positions is None:  # streamed rows sit at the last real tokens
                logit_rows = cache.prediction_logits
        else:
            logits, cache = run_with_cache(model, part, names_filter=names_filter)
            prediction = predicted(logits, part.attention_mask, tokenizer=tokenizer) if target is None else None
            if given is not None:
                positions = given.prediction_positions(part.attention_mask.to(logits.device))
                logit_rows = logits[torch.arange(len(positions), device=logits.device), positions]
            del logits  # [batch, pos, vocab]
        seconds["forward"] += time.perf_counter() - clock
        if target is None and given_head is not None:
            part_target = _head_prediction(model, given_head, cache, part.attention_mask)
        elif target is None:
            part_target = prediction
        else:  # a classifier head's classes are not the model's vocabulary: no probabilities then
            part_target = given if given_head is not None or logit_rows is None else with_probs(given, logit_rows)
        available = {
            "cache": cache,
            "model": model,
            "head": head,
            "target": part_target,
            "attention_mask": part.attention_mask,
            "tokens": part.tokens,
            "embeds": cache[embed_hook] if embed_hook else None,
        }
        for spec in sorted(specs, key=lambda s: s.needs_gradients):  # cache-only methods first
            if spec.needs_gradients and "cache" in available:
                available.pop("cache")  # released before the gradient methods run
                del cache
            clock = time.perf_counter()
            # without a classifier head, gradient methods differentiate the model's own logits
            given = available if given_head is not None or not spec.needs_gradients else {**available, "head": None}
            result = _call(spec.function, given, options.get(spec.name, {}))
            seconds[spec.name] += time.perf_counter() - clock
            if not isinstance(result, Attribution):
                raise TypeError(
                    f"{spec.name!r} returns a {type(result).__name__}, not token scores, so it cannot be "
                    f"compared here; call mechnorm.{spec.function.__name__}(...) on a cache directly."
                )
            parts[spec.name].append(result)
        available.clear()
        cache = None
    strings = batch.strings if batch.strings is not None else token_strings(tokenizer, batch.tokens)
    attributions = {name: _concat(pieces, strings) for name, pieces in parts.items()}
    return Comparison(attributions, batch, seconds)


def _resolve_stream(stream: bool | None, model, cache_methods: Sequence[str]) -> bool:
    """Whether to stream: asked for, or by default when every cache-only method can be streamed."""
    if not cache_methods:
        return False
    refused = [name for name in cache_methods if name not in STREAMABLE]
    if stream and refused:
        raise ValueError(f"stream=True cannot compute {refused} (they read a cache; streamable: {sorted(STREAMABLE)}); "
                         "pass stream=False or leave them out.")
    if stream and is_encoder(model):
        raise ValueError("stream=True runs causal language models only; pass stream=False for an encoder.")
    return bool(stream) if stream is not None else not refused and not is_encoder(model)


def _as_batch(model, inputs, attention_mask, padding_side) -> Batch:
    if isinstance(inputs, Batch):
        return inputs
    if isinstance(inputs, str) or (isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs)):
        if attention_mask is not None:
            raise ValueError("attention_mask is only for token-id inputs; text is tokenised and masked here.")
        return tokenize(model, inputs, padding_side=padding_side)
    tokens = torch.as_tensor(inputs)
    if tokens.ndim == 1:
        tokens = tokens[None]
        attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1)
    if tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"inputs must be text, a Batch or [batch, pos] token ids, got shape {tuple(tokens.shape)}.")
    mask = check_mask(attention_mask, *tokens.shape)
    return Batch(tokens, mask, token_strings(getattr(model, "tokenizer", None), tokens))


@torch.inference_mode()
def _head_prediction(model, head: Head, cache, mask: Tensor) -> Target:
    """The head's argmax on the cached final residual at each prediction position."""
    positions = prediction_positions(model, mask)
    rows = at_positions(cache[final_resid_hook(model)], positions)[:, None]
    ids = head(rows, cache=cache)[:, 0].argmax(-1).cpu()
    labels = None if head.labels is None else tuple(head.labels[i] for i in ids.tolist())
    return Target(ids=ids, positions=positions.cpu(), labels=labels)


def _slice_target(target: Target, rows: slice, total: int) -> Target:
    """The part of a target for the sequences in ``rows`` (one-entry fields broadcast)."""
    if not isinstance(target, Target):
        raise TypeError(f"target must be a Target (predicted, token_target, contrast) or None, got {type(target).__name__}.")

    def cut(values):
        if values is None or values.reshape(-1).shape[0] == 1:
            return values
        if values.reshape(-1).shape[0] != total:
            raise ValueError(f"The target has {values.reshape(-1).shape[0]} entries but there are {total} sequences.")
        return values.reshape(-1)[rows]

    labels = target.labels
    if labels is not None and len(labels) == total:
        labels = labels[rows]
    return replace(target, ids=cut(target.ids), foil=cut(target.foil), positions=cut(target.positions), labels=labels)


def _call(function, available: dict, extra: dict):
    """Call a method with the arguments its signature asks for, plus the caller's options."""
    parameters = inspect.signature(function).parameters
    kwargs = {name: value for name, value in available.items() if name in parameters}
    bad = [name for name in extra if name not in parameters or name in kwargs]
    if bad:
        accepted = [p for p in parameters if p not in kwargs]
        raise ValueError(f"{function.__name__} does not take options {bad} here; it accepts {accepted}.")
    return function(**kwargs, **extra)


def _concat(pieces: list[Attribution], strings) -> Attribution:
    """Join per-batch results along the batch axis (all batches share one padded length)."""
    first = pieces[0]
    labels = None
    if all(p.target_labels is not None for p in pieces):
        labels = tuple(label for p in pieces for label in p.target_labels)
    metadata = dict(first.metadata)
    for key, value in first.metadata.items():
        if isinstance(value, Tensor) and value.ndim >= 1:  # per-sequence values, e.g. IG's convergence delta
            metadata[key] = torch.cat([p.metadata[key] for p in pieces])
    return Attribution(
        scores=torch.cat([p.scores for p in pieces], dim=1),
        layers=first.layers,
        mask=torch.cat([p.mask for p in pieces]),
        method=first.method,
        tokens=strings,
        target_labels=labels,
        signed=first.signed,
        metadata=metadata,
        protected=None if any(p.protected is None for p in pieces) else torch.cat([p.protected for p in pieces]),
        target_probs=None if any(p.target_probs is None for p in pieces) else torch.cat([p.target_probs for p in pieces]),
    )
