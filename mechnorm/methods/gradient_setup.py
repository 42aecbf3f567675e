"""What every gradient method needs for one batch: the word embeddings, the target, and a
forward function from (perturbed) embeddings to the explained output.

The forward pass feeds the embeddings in through a hook on ``hook_embed`` and stops at the
final residual (``unembed.hook_in``, or the residual a classifier head reads), so only the
prediction rows are unembedded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..heads import Head
from ..inputs import (UNEMBED_IN_HOOK, Batch, finite_padded_rows, model_device, prediction_positions,
                      require_head_for_encoder, require_no_dropout, run_until)
from ..residual import at_positions, check_mask, final_resid_hook, token_embed_hook
from ..result import Attribution
from ..targets import Target, id_labels
from .grad_budget import checkpointed_blocks
from .output import method_result

Output = Literal["logit", "prob"]


@dataclass
class GradientSetup:
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
        final_hook = final_resid_hook(self.model) if self.head is not None else UNEMBED_IN_HOOK
        hooks = [(self.embed_hook, lambda act, hook: embeds.to(act.dtype))]
        if not self.mask.all():  # only padding leaves fully masked query rows
            hooks += [(name, finite_padded_rows) for name in self.model.hook_dict if name.endswith("attn.hook_attn_scores")]
        inside = [hook for hook in hooks if hook[0].startswith("blocks.")] if self.checkpoint else []
        hooks = [hook for hook in hooks if hook not in inside]  # attached per block run, recomputation included
        with checkpointed_blocks(self.model, self.checkpoint, inside):
            out, can_stop = run_until(self.model, tile(self.tokens), final_hook, tile(self.mask), hooks)  # [n, pos, d_model]
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
        return method_result(method, scores[None], (0,), self.mask, self.model, self.tokens.cpu(), self.positions,
                             self.target, signed=reduce == "sum", metadata={
                                 "output": self.output, "reduce": reduce, "wrt": self.embed_hook,
                                 "positions": self.positions.cpu(),
                                 "head": "model's unembedding" if self.head is None else repr(self.head), **extra})


def gradient_setup(model, tokens, attention_mask, target, output, embeds=None, head=None, resolve_target=True) -> GradientSetup:
    """Check the inputs and build the :class:`GradientSetup`. Without a target, ``resolve_target``
    finds the prediction with a forward pass now (integrated gradients needs it before its
    first step); otherwise :meth:`GradientSetup.forward` reads it from the attribution's own pass.

    Example:
        >>> setup = gradient_setup(model, tokens, mask, None, "logit")          # doctest: +SKIP
    """
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
    device = model_device(model)
    mask = check_mask(attention_mask, *tokens.shape).to(device)
    tokens = tokens.to(device)
    embed_hook = token_embed_hook(model)
    if head is not None and final_resid_hook(model) not in model.hook_dict:
        raise ValueError(f"head= reads the final residual {final_resid_hook(model)!r}, which this model does not hook.")
    if embeds is None:
        embeds = word_embeddings(model, tokens, mask, embed_hook)
    if tuple(embeds.shape[:2]) != tuple(tokens.shape):
        raise ValueError(f"embeds has shape {tuple(embeds.shape)} but tokens are {tuple(tokens.shape)}; "
                         f"pass {embed_hook} of tokens.")
    positions = prediction_positions(model, mask) if target is None else target.to(device).prediction_positions(mask)
    embeds = embeds.detach().to(device).clone().requires_grad_(True)
    setup = GradientSetup(model, tokens, mask, embeds, positions, output, head, embed_hook)
    if target is None:
        if resolve_target:
            with torch.no_grad():
                setup.target = setup.predicted(setup.outputs(embeds))
        return setup
    target.check(model.cfg.d_vocab_out if head is None else head.n_outputs, tokens.shape[0])
    setup.target = target.to(device)
    return setup


def word_embeddings(model, tokens, mask, embed_hook: str) -> Float[Tensor, "batch pos d_model"]:
    """The word embeddings of ``tokens``, read by a forward pass stopped at ``embed_hook``.

    Example:
        >>> embeds = word_embeddings(model, tokens, mask, "hook_embed")        # doctest: +SKIP
    """
    with torch.no_grad():
        embeds, _ = run_until(model, tokens, embed_hook, mask)
    return embeds.detach()


def baseline_embeds(model, baseline, setup: GradientSetup) -> Tensor:
    """Integrated gradients' starting point, shaped like ``setup.embeds``: ``"zero"``, ``"pad"``
    (the pad token's embedding row), ``"mean"`` (the vocabulary's mean embedding) or a tensor.

    Example:
        >>> start = baseline_embeds(model, "mean", setup)                    # doctest: +SKIP
    """
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
