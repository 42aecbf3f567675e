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

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..heads import Head
from ..inputs import Batch, is_encoder, mask_kwargs, prediction_positions, require_head_for_encoder, require_no_dropout
from ..protected import protected_for
from ..residual import at_positions, check_mask, final_resid_hook, token_embed_hook
from ..result import Attribution, token_strings
from ..targets import Target, first_positions, id_labels
from .grad_budget import TimeEstimate, checkpointed_blocks, n_passes, parse_bytes, saved_bytes, steps_for_budget
from .ig_convergence import _warn_if_not_converged
from .registry import HookFilter, register

Output = Literal["logit", "prob"]
Reduce = Literal["l1", "l2", "sum"]
Baseline = Literal["zero", "pad", "mean"]
UNEMBED_IN_HOOK = "unembed.hook_in"
_TOKENS_PER_PASS = 1024  # integrated gradients: default tokens per pass (GPT-2 small keeps ~2 MB a token for backward)


class _Stopped(Exception):
    """Raised by a hook to end a forward pass once the final residual is captured."""


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
    setup = _setup(model, tokens, attention_mask, target, output, embeds, head, resolve_target=False)
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

    setup = _setup(model, tokens, attention_mask, target, output, embeds, head, resolve_target=False)
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
    setup = _setup(model, tokens, attention_mask, target, output, embeds, head)
    base = _baseline(model, baseline, setup)
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


@dataclass
class _Setup:
    """Everything a gradient method needs for one batch: embeddings, target, forward function."""

    model: object
    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    embeds: Float[Tensor, "batch pos d_model"]
    positions: Int[Tensor, "batch"]
    output: str
    head: Head | None
    embed_hook: str
    target: Target | None = None
    unembed: tuple[Tensor, Tensor | None] | None = None
    checkpoint: bool = False  # recompute blocks in the backward pass (grad_budget.checkpointed_blocks)

    def outputs(self, embeds: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n n_outputs"]:
        """Every output (vocabulary or classes) at the prediction positions, with ``embeds``
        in place of the word embeddings.

        captum stacks scaled copies of the batch along the first axis, so the tokens, mask
        and positions are repeated to match. The forward pass stops at the final residual
        and only the prediction positions go through the head: a full ``[n, pos, vocab]``
        logits tensor (and its backward) would cost as much as a quarter of GPT-2's forward.
        """
        repeats, rest = divmod(embeds.shape[0], self.tokens.shape[0])
        if rest:
            raise ValueError(f"Got {embeds.shape[0]} embedded sequences for a batch of {self.tokens.shape[0]}.")
        tile = lambda t: t.repeat(repeats, *([1] * (t.ndim - 1)))  # noqa: E731
        captured = {}

        def stop(act, hook):
            captured["final"] = act
            raise _Stopped

        final_hook = final_resid_hook(self.model) if self.head is not None else UNEMBED_IN_HOOK
        hooks = [(self.embed_hook, lambda act, hook: embeds.to(act.dtype))]
        if not self.mask.all():  # only padding leaves fully masked query rows
            hooks += [(name, _finite_padded_rows) for name in self.model.hook_dict if name.endswith("attn.hook_attn_scores")]
        can_stop = final_hook in self.model.hook_dict
        hooks += [(final_hook, stop)] if can_stop else []
        inside = [hook for hook in hooks if hook[0].startswith("blocks.")] if self.checkpoint else []
        hooks = [hook for hook in hooks if hook not in inside]  # attached per block run, recomputation included
        try:
            with checkpointed_blocks(self.model, self.checkpoint, inside):
                out = self.model.run_with_hooks(tile(self.tokens), fwd_hooks=hooks, **mask_kwargs(self.model, tile(self.mask)))
        except _Stopped:
            out = captured["final"]  # [n, pos, d_model]
        rows = at_positions(out, tile(self.positions))[:, None]
        if not can_stop:  # no unembedding hook: the model ran to its logits
            return rows[:, 0].float()
        if self.head is not None:
            return self.head(rows)[:, 0].float()  # rows: [n, 1, d_model]
        # W_U read once per setup: TransformerLens 3.9's Unembed copies W_U.T on every call
        # (150 MB for GPT-2), which cost more than the backward pass of a short sequence
        if self.unembed is None:
            self.unembed = (self.model.W_U.detach(), getattr(self.model, "b_U", None))
        weight, bias = self.unembed
        logits = rows[:, 0] @ weight
        return (logits if bias is None else logits + bias.detach()).float()

    def forward(self, embeds: Float[Tensor, "n pos d_model"]) -> Float[Tensor, "n"]:
        """The target's logit (or probability) with ``embeds`` in place of the word embeddings."""
        outputs = self.outputs(embeds)
        if self.target is None:  # the prediction, read from this very pass: no extra forward
            self.target = self.predicted(outputs.detach())
        if self.output == "prob":
            outputs = outputs.softmax(-1)
        repeats = embeds.shape[0] // self.tokens.shape[0]
        columns = self.target.columns(self.tokens.shape[0]).to(outputs.device).repeat(repeats, 1)
        return self.target.reduce(outputs.gather(-1, columns))

    def predicted(self, outputs: Float[Tensor, "n n_outputs"]) -> Target:
        """The argmax output at each sequence's prediction position, as a checked Target."""
        ids = outputs[: self.tokens.shape[0]].argmax(-1)
        tokenizer = getattr(self.model, "tokenizer", None) if self.head is None else None
        target = Target(ids=ids, positions=self.positions, labels=id_labels(ids.cpu(), tokenizer))
        target.check(outputs.shape[-1], self.tokens.shape[0])
        return target

    def result(self, method: str, per_dim: Tensor, reduce: str, extra: dict) -> Attribution:
        """Summarise ``[batch, pos, d_model]`` attributions per token and wrap them."""
        per_dim = per_dim.detach().float()
        if reduce == "l1":
            scores = per_dim.abs().sum(-1)
        elif reduce == "l2":
            scores = per_dim.norm(dim=-1)
        else:
            scores = per_dim.sum(-1)
        return Attribution(
            scores=scores[None].cpu(),
            layers=(0,),
            mask=self.mask.cpu(),
            method=method,
            tokens=token_strings(getattr(self.model, "tokenizer", None), self.tokens.cpu()),
            target_labels=self.target.labels,
            signed=reduce == "sum",
            metadata={
                "output": self.output, "reduce": reduce, "wrt": self.embed_hook, "positions": self.positions.cpu(),
                "head": "model's unembedding" if self.head is None else repr(self.head), **extra,
            },
            protected=protected_for(self.model, self.tokens, self.mask, self.positions, method),
            target_probs=getattr(self.target, "probs", None),
        )


def _setup(model, tokens, attention_mask, target, output, embeds=None, head=None, resolve_target=True) -> _Setup:
    """Check the inputs and build the :class:`_Setup`. Without a target, ``resolve_target``
    finds the prediction with a forward pass now (integrated gradients needs it before its
    first step); otherwise :meth:`_Setup.forward` reads it from the attribution's own pass."""
    if output not in ("logit", "prob"):
        raise ValueError(f"output must be 'logit' or 'prob', got {output!r}.")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Gradient methods cannot run inside torch.inference_mode(); call them outside it.")
    require_no_dropout(model, "gradients")
    if target is not None and not isinstance(target, Target):
        raise TypeError(f"target must be a Target (predicted, token_target, contrast) or None, got {type(target).__name__}.")
    require_head_for_encoder(model, head)
    if isinstance(tokens, Batch):
        if attention_mask is None:
            attention_mask = tokens.attention_mask
        tokens = tokens.tokens
    tokens = torch.as_tensor(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos] ids, got shape {tuple(tokens.shape)}.")
    device = next(model.parameters()).device
    mask = check_mask(attention_mask, *tokens.shape).to(device)
    tokens = tokens.to(device)
    embed_hook = token_embed_hook(model)
    if head is not None and final_resid_hook(model) not in model.hook_dict:
        raise ValueError(f"head= reads the final residual {final_resid_hook(model)!r}, which this model does not hook.")
    if embeds is None:
        embeds = _word_embeddings(model, tokens, mask, embed_hook)
    if tuple(embeds.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"embeds has shape {tuple(embeds.shape)} but tokens are {tuple(tokens.shape)}; "
                         f"pass {embed_hook} of tokens.")
    positions = prediction_positions(model, mask) if target is None else target.to(device).prediction_positions(mask)
    embeds = embeds.detach().to(device).clone().requires_grad_(True)
    setup = _Setup(model, tokens, mask, embeds, positions, output, head, embed_hook)
    if target is None:
        if resolve_target:
            with torch.no_grad():
                setup.target = setup.predicted(setup.outputs(embeds))
        return setup
    target.check(model.cfg.d_vocab_out if head is None else head.n_outputs, tokens.shape[0])
    setup.target = target.to(device)
    return setup


def _word_embeddings(model, tokens, mask, embed_hook: str) -> Float[Tensor, "batch pos d_model"]:
    """The word embeddings of ``tokens``, read by a forward pass stopped at ``embed_hook``."""
    captured = {}

    def stop(act, hook):
        captured["embeds"] = act.detach()
        raise _Stopped

    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(embed_hook, stop)], **mask_kwargs(model, mask))
    except _Stopped:
        pass
    return captured["embeds"]


def _baseline(model, baseline, setup: _Setup) -> Tensor:
    if isinstance(baseline, Tensor):
        return baseline.to(setup.embeds).expand_as(setup.embeds)
    if baseline == "zero":
        return torch.zeros_like(setup.embeds)
    if baseline == "mean":
        return model.W_E.detach().float().mean(0).to(setup.embeds).expand_as(setup.embeds)
    if baseline == "pad":
        tokenizer = getattr(model, "tokenizer", None)
        pad_id = None if tokenizer is None else tokenizer.pad_token_id
        if pad_id is None:
            pad_id = getattr(tokenizer, "eos_token_id", None)
        if pad_id is None:
            raise ValueError("baseline='pad' needs a tokenizer with a pad or eos token; pass baseline='zero' or a tensor.")
        # the table row, not model.embed(): a HookedEncoder's embed adds positions and a LayerNorm
        return model.W_E[pad_id].detach().to(setup.embeds).expand_as(setup.embeds)
    raise ValueError(f"baseline must be 'zero', 'pad', 'mean' or a tensor, got {baseline!r}.")


def _finite_padded_rows(scores: Tensor, hook) -> Tensor:
    """Give fully masked query rows (padding before any real token) finite scores.

    Their softmax is 0/0; TransformerBridge zeroes the forward pattern but the backward pass
    still turns the NaN into NaN gradients for the whole sequence. Those rows only feed
    padded positions, which real tokens never attend to, so any finite value is harmless.
    """
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    return torch.where(dead, torch.zeros_like(scores), scores)

