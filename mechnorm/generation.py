"""Explaining a generation: every generated token's attribution from one forward pass.

:func:`explain_generation` decodes greedily, then runs **one** cached forward pass over the
prompt plus the generated tokens. Step t predicts the token at position ``p_t = P + t``
(P = prompt length) from position ``p_t − 1``; in a causal model position i's residual
does not depend on later tokens, so the scores of positions ``< p_t`` read from the full
cache equal those of a separate pass over the prefix ``[:p_t]`` — every step comes out of
one pass. Supported methods are the cache-only ones that are exact per step from one
cache: ``normxlogit``, ``logat``, ``embedding_norm``, ``rollout`` and ``attention``.
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .generation_result import GenerationAttribution
from .heads import Head, UnembedHead
from .inputs import Batch, is_encoder, mask_kwargs, model_device, pad, run_with_cache
from .methods.registry import get_method, hooks_for
from .protected import protected_for
from .residual import layer_residuals, n_blocks, resolve_layers
from .result import token_strings

__all__ = ["GenerationAttribution", "explain_generation", "generation_method", "greedy_generate", "write_generation_report", "SUPPORTED_METHODS"]

#: methods whose per-step scores are exact from one cache of a causal model
SUPPORTED_METHODS = ("normxlogit", "logat", "embedding_norm", "rollout", "attention")
_PER_STEP = ("rollout", "attention")  # called once per step with that step's prediction position
_PROGRESS_AFTER = 8  # generated tokens; a progress bar appears for longer generations


def explain_generation(
    model,
    prompt: str | Sequence[str] | Int[Tensor, "batch pos"],
    generate: int,
    method: str = "normxlogit",
    layers: int | Sequence[int] | None = None,
    head: Head | None = None,
    options: dict | None = None,
    progress: bool | None = None,
) -> GenerationAttribution | list[GenerationAttribution]:
    """Generate ``generate`` tokens greedily and explain each one in turn, from one cached pass.

    Step t's target is the generated token at position ``p_t = P + t``, read at ``p_t − 1``;
    its scores cover positions ``< p_t`` (the prompt and the earlier generations) and are
    NaN after. They equal running the method on each prefix separately with the predicted
    token as target (see ``tests/test_generation.py``), at the cost of one forward pass.

    Args:
        model: a causal ``HookedTransformer`` or ``TransformerBridge`` (an encoder is refused).
        prompt: one text, several texts (left-padded into one batch; each result is given
            without its padding), or token ids ``[pos]`` / ``[batch, pos]`` without padding.
        generate: number of tokens to generate (greedy argmax; no stop at end-of-sequence).
        method: one of :data:`SUPPORTED_METHODS`. Gradient methods and the decomposition
            methods are refused with the step-by-step call to use instead.
        layers: rows to report (blocks applied; None for 0…L) of NormXLogit, LogAt and rollout
            (``attention`` reads one block: ``options={"layer": l}``).
        head: the head-on-top (default ``UnembedHead(model)``); its outputs must be the vocabulary.
        options: extra keyword arguments of the method: ``space``/``norm`` for NormXLogit
            and LogAt, ``which`` for ``embedding_norm``, ``head_fusion``, ``residual``,
            ``discard_ratio`` for rollout, ``heads`` for attention.
        progress: tqdm bar over generated tokens; by default when more than 8 are generated.

    Returns:
        A :class:`GenerationAttribution` (``[step, layer, pos]``) for one prompt, a list of
        them for several. ``metadata["seconds"]`` holds the generation and attribution times.

    Example:
        >>> gen = mechnorm.attribute(model, "The keys to the cabinet", generate=5)   # doctest: +SKIP
        >>> gen.generated_tokens, gen.top_k(step=0, k=3)                            # doctest: +SKIP
        >>> gen.plot().write_html("generation.html")                                # doctest: +SKIP
    """
    options = dict(options or {})
    _check_request(model, method, generate)
    batch, single = _left_padded(model, prompt)
    if batch.tokens.shape[1] + generate > int(getattr(model.cfg, "n_ctx", 10**9)):
        raise ValueError(f"The prompt ({batch.tokens.shape[1]} tokens) plus {generate} generated tokens exceed the "
                         f"model's context of {model.cfg.n_ctx}; generate fewer tokens or shorten the prompt.")
    head = head if head is not None else UnembedHead(model)
    clock = time.perf_counter()
    show = generate > _PROGRESS_AFTER if progress is None else progress
    tokens, mask = greedy_generate(model, batch.tokens, batch.attention_mask, generate, progress=show)
    seconds = {"generate": time.perf_counter() - clock}
    clock = time.perf_counter()
    logits, cache = run_with_cache(model, Batch(tokens, mask), names_filter=hooks_for(method))
    steps = _step_positions(tokens.shape[1], generate)  # [step]: position of each generated token
    generated = tokens[:, steps].to(logits.device)  # [batch, step]
    with torch.inference_mode():
        logprobs = logits[:, steps - 1].float().log_softmax(-1)  # [batch, step, vocab]
        probabilities = logprobs.gather(-1, generated[..., None])[..., 0].exp().cpu()
        mismatch = (logprobs.argmax(-1) != generated).any().item()
        del logits, logprobs
        scores, layer_ids = _scores(method, cache, head, generated, mask.to(generated.device), steps, layers, dict(options))
    seconds["attribute"] = time.perf_counter() - clock
    del cache
    if mismatch:
        warnings.warn("A generated token is not the argmax of the full pass at its step (a near tie the two passes "
                      "break differently); its step is still explained for the generated token.", stacklevel=2)
    results = _split(model, method, scores.cpu(), layer_ids, tokens, mask, generated.cpu(), probabilities,
                     {"options": options, "head": repr(head), "seconds": seconds})
    return results[0] if single else results


@torch.inference_mode()
def greedy_generate(
    model, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None, n: int, progress: bool = True
) -> tuple[Int[Tensor, "batch pos_plus_n"], Tensor]:
    """Append ``n`` greedily decoded tokens (argmax of each step's last-position logits).

    Each step runs the full forward pass on the sequence so far (no key-value cache), with
    the attention mask, so left-padded prompts decode as they would alone.

    Returns:
        The extended ids and mask (on the model's device), generated tokens marked real.

    Example:
        >>> ids, mask = greedy_generate(model, batch.tokens, batch.attention_mask, 5)   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    device = model_device(model)
    tokens = torch.as_tensor(tokens).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    if mask.shape[1] and not mask[:, -1].all():
        raise ValueError("greedy_generate needs left padding (every sequence's last position real); "
                         "tokenize with padding_side='left'.")
    for _ in tqdm(range(n), desc="generating", unit="token", disable=not progress):
        logits = model(tokens, **mask_kwargs(model, mask))
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_ids, dtype=torch.bool)], dim=1)
    return tokens, mask


def generation_method(methods, target=None, default_methods: Sequence[str] = ()) -> str:
    """The one method ``mechnorm.attribute(..., generate=N)`` runs: NormXLogit when ``methods``
    is left at ``default_methods``, else the single name given.

    Example:
        >>> generation_method(("logat",))
        'logat'
    """
    if target is not None:
        raise ValueError("generate= explains each generated token, which is its step's target; drop target=.")
    if tuple(methods) == tuple(default_methods):
        return "normxlogit"
    names = (methods,) if isinstance(methods, str) else tuple(methods)
    if len(names) != 1:
        raise ValueError(f"generate= explains with one method at a time, got {list(names)}; "
                         f"call it once per method, e.g. methods='normxlogit'.")
    return names[0]


def write_generation_report(model, texts: Sequence[str], generate: int, methods: Sequence[str], out) -> int:
    """``mechnorm explain --generate N``: print each step's top sources, write the figures to one
    self-contained HTML page at ``out``; returns the exit code 0.

    Example:
        >>> write_generation_report(model, ["The keys to the"], 5, ("normxlogit",), Path("gen.html"))  # doctest: +SKIP
    """
    from pathlib import Path

    from .demo import DEMO_METHODS

    method = generation_method(methods, None, DEMO_METHODS)
    parts = []
    for text in texts:
        gen = explain_generation(model, text, generate, method=method)
        print(f"{text!r} + {generate} generated tokens, {method}:\n{gen.summary().to_string(index=False)}\n")
        parts.append(gen.plot(title=f"{method}: {text!r}").to_html(full_html=False, include_plotlyjs=not parts))
    out = Path(out)
    out.write_text("<html><head><meta charset='utf-8'></head><body>" + "".join(parts) + "</body></html>", encoding="utf-8")
    print(out)
    return 0


def _check_request(model, method: str, generate) -> None:
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 1:
        raise ValueError(f"generate must be a positive number of tokens, got {generate!r}.")
    spec = get_method(method)  # unknown names: a KeyError listing the known ones
    step_by_step = (f"explain each step separately: for each prefix ids[:p], "
                    f"mechnorm.attribute(model, ids[:p], methods=({method!r},), "
                    f"target=mechnorm.token_target(int(ids[p])))")
    if is_encoder(model):
        raise ValueError("generate= needs a causal language model; this model is a bidirectional encoder, whose "
                         "earlier positions change with later tokens, so one pass cannot stand for every step.")
    if spec.needs_gradients:
        raise ValueError(f"{method!r} needs gradients of each step's own prediction, which one forward pass cannot "
                         f"give for every step; use one of {SUPPORTED_METHODS} with generate=, or {step_by_step}.")
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"{method!r} is not supported with generate= (supported: {SUPPORTED_METHODS}); "
                         f"{step_by_step}.")


def _left_padded(model, prompt) -> tuple[Batch, bool]:
    """The prompt(s) as one left-padded batch, and whether a single prompt was given."""
    tokenizer = getattr(model, "tokenizer", None)
    if isinstance(prompt, Batch):
        rows, single = [r[m].tolist() for r, m in zip(prompt.tokens, prompt.attention_mask.bool())], False
    elif isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt)):
        from .inputs import tokenize

        single = isinstance(prompt, str)
        batch = tokenize(model, prompt, padding_side="left")
        rows = [r[m].tolist() for r, m in zip(batch.tokens, batch.attention_mask)]
    else:
        ids = torch.as_tensor(prompt)
        if ids.dtype.is_floating_point or ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise ValueError(f"prompt must be text, several texts or [pos] / [batch, pos] token ids, got {tuple(ids.shape)}.")
        single = ids.ndim == 1
        rows = ids.reshape(-1, ids.shape[-1]).tolist()
    pad_id = 0
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tokens, mask = pad(rows, pad_id, "left")
    return Batch(tokens, mask), single


def _step_positions(length: int, generate: int) -> Tensor:
    """Position of each generated token in the left-padded sequence of ``length``."""
    return torch.arange(length - generate, length)


def _scores(method, cache, head, generated, mask, steps, layers, options) -> tuple[Tensor, list[int]]:
    """``[batch, step, layer, pos]`` scores of every step (future positions not yet masked)."""
    function = get_method(method).function
    if method in _PER_STEP:
        parts = [function(cache, attention_mask=mask, positions=int(p) - 1, layers=layers, **options)
                 if method == "rollout" else
                 function(cache, attention_mask=mask, positions=int(p) - 1, **options) for p in steps]
        layer_ids = list(parts[0].layers)
        return torch.stack([part.scores for part in parts]).permute(2, 0, 1, 3), layer_ids  # [batch, step, layer, pos]
    if method == "embedding_norm":
        norms = function(cache, attention_mask=mask, **options).scores[0]  # [batch, pos]
        return norms[:, None, None, :].expand(-1, len(steps), 1, -1), [0]
    space = options.pop("space", "logit")
    norm = options.pop("norm", "input")
    if options:
        raise ValueError(f"{method} with generate= takes the options 'space' and 'norm', not {sorted(options)}.")
    if space not in ("logit", "logprob"):
        raise ValueError(f"space must be 'logit' or 'logprob', got {space!r}.")
    layer_ids = resolve_layers(layers, n_blocks(cache))
    rows = []
    for resid in layer_residuals(cache, layer_ids, method):  # [batch, pos, d_model], one layer at a time
        picked = head(resid, generated, cache=cache)  # every step's token at every position: [batch, pos, step]
        if space == "logprob":
            picked = picked - head.log_normalizer(resid, cache=cache)[..., None]
        rows.append(picked)
    scores = torch.stack(rows).permute(1, 3, 0, 2)  # [batch, step, layer, pos]
    if method == "normxlogit":
        norms = get_method("embedding_norm").function(cache, which=norm, attention_mask=mask).scores[0]
        scores = scores.cpu() * norms[:, None, None, :]
    return scores, layer_ids


def _split(model, method, scores, layer_ids, tokens, mask, generated, probabilities, metadata) -> list[GenerationAttribution]:
    """One result per prompt, its padding removed."""
    tokenizer = getattr(model, "tokenizer", None)
    n_steps = generated.shape[1]
    results = []
    for b in range(tokens.shape[0]):
        real = mask[b].cpu()
        ids = tokens[b].cpu()[real]
        prompt_length = ids.shape[0] - n_steps
        positions = torch.arange(ids.shape[0])
        visible = positions[None, :] < (prompt_length + torch.arange(n_steps))[:, None]  # [step, pos]
        strings = token_strings(tokenizer, ids[None])
        protected = protected_for(model, ids[None].expand(n_steps, -1), visible,
                                  prompt_length + torch.arange(n_steps) - 1, method)  # steps as a batch
        results.append(GenerationAttribution(
            scores=scores[b][..., real],
            layers=tuple(layer_ids),
            mask=visible,
            method=method,
            token_ids=ids,
            prompt_length=prompt_length,
            probabilities=probabilities[b],
            tokens=None if strings is None else strings[0],
            signed=method in ("normxlogit", "logat"),
            metadata=dict(metadata),
            protected=protected,
        ))
    return results
