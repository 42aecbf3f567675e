"""Gradient baselines with respect to the input word embeddings (``hook_embed``).

Saliency, gradient × input and integrated gradients, computed by captum on a forward
function that feeds (perturbed) embeddings into the model through a hook on
``hook_embed`` (``embed.hook_embed`` in a ``HookedEncoder``) — the quantity captum users
attribute to — so ``HookedTransformer``, ``TransformerBridge`` and ``HookedEncoder`` work.
The output differentiated is the model's own next-token logit, or, with ``head=``, a
head-on-top (a classifier's :class:`~mechnorm.LinearHead`) applied to the final residual at
the prediction position (``[CLS]`` in an encoder). These are the only methods that run the
model (forward and backward), so they take the model and the tokens rather than a cache.

The embedding dimension is summarised per token by ``reduce``: ``"l1"`` (the NormXLogit
paper's choice), ``"l2"``, or the signed ``"sum"`` (for grad × input and IG, whose sums over
tokens then add up to the output change).
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from ..heads import Head
from ..inputs import Batch, is_encoder
from ..result import Attribution
from ..targets import Target, first_positions
from .grad_budget import TimeEstimate, n_passes, parse_bytes, saved_bytes, steps_for_budget
from .gradient_setup import baseline_embeds, gradient_setup
from .ig_convergence import _warn_if_not_converged
from .registry import HookFilter, register

Output = Literal["logit", "prob"]
Reduce = Literal["l1", "l2", "sum"]
Baseline = Literal["zero", "pad", "mean"]
_TOKENS_PER_PASS = 1024  # integrated gradients: default tokens per pass (GPT-2 small keeps ~2 MB a token for backward)


@register(
    "saliency",
    "Gradient of the target's logit w.r.t. each token's input embedding (hook_embed), L1 norm per token.",
    HookFilter(),
    needs_gradients=True,
)
def saliency(
    model,
    tokens: Int[Tensor, "batch pos"] | Batch,
    attention_mask=None,
    target: Target | None = None,
    output: Output = "logit",
    reduce: Literal["l1", "l2"] = "l1",
    embeds: Tensor | None = None,
    head: Head | None = None,
    checkpoint: bool | None = None,
) -> Attribution:
    """Saliency (Simonyan et al. 2014): the size of ∂output/∂embedding per token.

    Args:
        model: a ``HookedTransformer``, ``TransformerBridge`` or ``HookedEncoder`` in eval mode.
        tokens: ``[batch, pos]`` ids, or a :class:`~mechnorm.inputs.Batch` (its mask is used).
        attention_mask: ``[batch, pos]``, False at padding.
        target: what to explain; by default the prediction at each sequence's last real token
            (``[CLS]``, the first, in an encoder) — the model's next token, or the head's
            class with ``head=`` (a contrast explains target − foil).
        output: differentiate the target's ``"logit"`` or its softmax ``"prob"``.
        reduce: ``"l1"`` or ``"l2"`` norm of the gradient over the embedding dimension
            (a signed sum of a gradient has no meaning: use :func:`grad_x_input`).
        embeds: the cached ``hook_embed`` activations of ``tokens``, when at hand; they
            save the forward pass that would read them.
        head: a head-on-top read from the final residual at the prediction position, e.g.
            ``mechnorm.zoo.classifier_head("bert-lexicon")``; None differentiates the model's
            own unembedding (causal LMs). An encoder needs its head.
        checkpoint: recompute each block in the backward pass instead of keeping its
            activations (``torch.utils.checkpoint``): memory near a forward pass's for about
            one more forward's time. None turns it on from 1,024 tokens in the batch.

    Returns:
        An :class:`Attribution` with one row (layer 0), unsigned.

    Example:
        >>> batch = mechnorm.tokenize(model, ["The keys to the cabinet"])  # doctest: +SKIP
        >>> mechnorm.saliency(model, batch).top_k(3)                       # doctest: +SKIP
    """
    from captum.attr import Saliency

    if reduce not in ("l1", "l2"):
        raise ValueError(f"saliency's reduce must be 'l1' or 'l2', got {reduce!r}; for signed scores use "
                         "grad_x_input(reduce='sum').")
    setup = gradient_setup(model, tokens, attention_mask, target, output, embeds, head, resolve_target=False)
    setup.checkpoint = setup.tokens.numel() >= _TOKENS_PER_PASS if checkpoint is None else checkpoint
    with torch.enable_grad():
        grads = Saliency(setup.forward).attribute(setup.embeds, abs=False)
    return setup.result("saliency", grads, reduce, {})


@register(
    "grad_x_input",
    "Gradient × input embedding (hook_embed), summarised per token (L1 by default).",
    HookFilter(),
    needs_gradients=True,
)
def grad_x_input(
    model,
    tokens: Int[Tensor, "batch pos"] | Batch,
    attention_mask=None,
    target: Target | None = None,
    output: Output = "logit",
    reduce: Reduce = "l1",
    embeds: Tensor | None = None,
    head: Head | None = None,
    checkpoint: bool | None = None,
) -> Attribution:
    """Gradient × input (Shrikumar et al. 2016) on the word embeddings.

    Args:
        model, tokens, attention_mask, target, output, embeds, head, checkpoint: as for :func:`saliency`.
        reduce: ``"l1"``, ``"l2"`` or the signed ``"sum"`` over the embedding dimension.

    Returns:
        An :class:`Attribution` with one row (layer 0); signed when ``reduce="sum"``.

    Example:
        >>> mechnorm.grad_x_input(model, batch, reduce="sum").top_k(3)    # doctest: +SKIP
    """
    from captum.attr import InputXGradient

    setup = gradient_setup(model, tokens, attention_mask, target, output, embeds, head, resolve_target=False)
    setup.checkpoint = setup.tokens.numel() >= _TOKENS_PER_PASS if checkpoint is None else checkpoint
    with torch.enable_grad():
        attributions = InputXGradient(setup.forward).attribute(setup.embeds)
    return setup.result("grad_x_input", attributions, reduce, {})


@register(
    "integrated_gradients",
    "Integrated gradients (Sundararajan et al. 2017) on the input embeddings, 50 steps, zero baseline "
    "(a causal LM's first token held).",
    HookFilter(),
    needs_gradients=True,
)
def integrated_gradients(
    model,
    tokens: Int[Tensor, "batch pos"] | Batch,
    attention_mask=None,
    target: Target | None = None,
    output: Output = "logit",
    reduce: Reduce = "l1",
    n_steps: int = 50,
    baseline: Baseline | Tensor = "zero",
    hold_first: bool | None = None,
    internal_batch_size: int | None = None,
    embeds: Tensor | None = None,
    head: Head | None = None,
    max_memory: int | str | None = None,
    checkpoint: bool = False,
) -> Attribution:
    """Integrated gradients on the word embeddings (captum, Gauss–Legendre steps).

    Args:
        model, tokens, attention_mask, target, output, embeds, head: as for :func:`saliency`.
        reduce: ``"l1"``, ``"l2"`` or the signed ``"sum"``; with ``"sum"`` the scores of a
            sequence add up to ``f(x) − f(baseline)`` (completeness), up to the
            integration error recorded in ``metadata["convergence_delta"]``.
        n_steps: integration steps.
        baseline: ``"zero"`` embeddings, ``"pad"`` (every token replaced by the pad token's
            embedding), ``"mean"`` (the mean of the embedding table), or a tensor
            broadcastable to ``[batch, pos, d_model]``. Where the first operation on the
            embedding is a norm (Llama, GPT-NeoX: no position table), the path from zero
            crosses the norm's singularity and IG converges badly: use ``"mean"`` there, or
            ``"pad"`` when the pad embedding is not zero (a warning says when completeness fails).
        hold_first: keep each sequence's first real token at its own embedding along the
            path (its attribution is then 0). The first position is a causal LM's attention
            sink: scaling it changes what every later position attends to, and on pretrained
            LLMs IG then does not converge (as captum's ``skip_tokens`` holds BOS). None holds
            it in causal LMs and not in encoders.
        internal_batch_size: how many scaled inputs go through the model at once
            (captum's argument, at least the batch size); None takes as many steps per
            pass as keep a pass near 1024 tokens, which bounds the activations kept for
            the backward pass.
        max_memory: a budget for the activations one pass keeps for its backward (bytes, or
            ``"2GB"``): one step is measured (the tensors autograd saves, see
            :func:`~mechnorm.methods.grad_budget.saved_bytes`) and as many steps as fit go
            through each pass. Give it or ``internal_batch_size``, not both.
        checkpoint: recompute each block in the backward pass (as for :func:`saliency`);
            off by default here, since IG's passes are already bounded.

    After its first pass, integrated gradients estimates the whole run's time and warns when
    it will take more than a minute (``metadata["seconds_estimate"]``).

    Returns:
        An :class:`Attribution` with one row (layer 0); signed when ``reduce="sum"``.

    Example:
        >>> mechnorm.integrated_gradients(model, batch, reduce="sum", n_steps=50)  # doctest: +SKIP
    """
    from captum.attr import IntegratedGradients

    if n_steps < 1:
        raise ValueError(f"n_steps must be at least 1, got {n_steps}.")
    setup = gradient_setup(model, tokens, attention_mask, target, output, embeds, head)
    base = baseline_embeds(model, baseline, setup)
    if hold_first is None:
        hold_first = not is_encoder(model)
    if hold_first:
        rows, first = torch.arange(len(setup.mask), device=base.device), first_positions(setup.mask)
        base = base.clone()
        base[rows, first] = setup.embeds.detach()[rows, first]
    setup.checkpoint = checkpoint
    batch, pos = setup.tokens.shape
    if max_memory is not None:
        if internal_batch_size is not None:
            raise ValueError("Give integrated_gradients internal_batch_size or max_memory, not both.")
        budget = parse_bytes(max_memory)
        internal_batch_size = batch * steps_for_budget(saved_bytes(setup.forward, setup.embeds, model), budget, n_steps)
    if internal_batch_size is None:
        internal_batch_size = batch * min(n_steps, max(1, _TOKENS_PER_PASS // (batch * pos)))
    timed = TimeEstimate(setup.forward, n_passes(n_steps, batch, internal_batch_size))
    with torch.enable_grad():
        attributions, delta = IntegratedGradients(timed).attribute(
            setup.embeds,
            baselines=base,
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
    _warn_if_not_converged(attributions, delta, n_steps, model=model, baseline=baseline)
    baseline_name = baseline if isinstance(baseline, str) else "tensor"
    extra = {"n_steps": n_steps, "baseline": baseline_name, "hold_first": hold_first,
             "internal_batch_size": internal_batch_size, "seconds_estimate": timed.estimate,
             "convergence_delta": delta.detach().float().cpu()}
    return setup.result("integrated_gradients", attributions, reduce, extra)
