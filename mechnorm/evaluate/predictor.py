"""What "the model's output" is for evaluation: one distribution per sequence.

A :class:`Predictor` runs the model on token ids and returns the head's logits at each
sequence's prediction position, so the same faithfulness code serves a causal LM (the
next-token distribution at the last real token, through ``UnembedHead``) and a classifier
(its head on the first real token, ``[CLS]``). Evaluation never reads the model's own
output layer: it captures the final residual and applies the head, which for an LM with
``UnembedHead(ln="recompute")`` is exactly what the model computes.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..heads import Head, UnembedHead
from ..inputs import is_encoder, mask_kwargs, require_head_for_encoder
from ..protected import protected_positions
from ..residual import at_positions, check_mask, final_resid_hook, token_embed_hook
from ..targets import first_positions, last_positions

Position = Literal["last", "first"]
EmbedEdit = Callable[[Tensor, object], Tensor]


class Predictor:
    """The model plus its head-on-top, read at each sequence's prediction position.

    Args:
        model: a ``HookedTransformer``, ``TransformerBridge`` or ``HookedEncoder``.
        head: the head-on-top; by default ``UnembedHead(model)`` (causal LMs). An encoder
            classifier needs its head, e.g. ``mechnorm.zoo.classifier_head("bert-lexicon")``.
        position: where the prediction is read when no position is given: ``"last"`` real
            token (causal LMs, the default for them) or ``"first"`` (``[CLS]``, the default
            for bidirectional models).

    Example:
        >>> predictor = Predictor(model)                                   # doctest: +SKIP
        >>> predictor.logits(tokens, mask).softmax(-1)                     # doctest: +SKIP
    """

    def __init__(self, model, head: Head | None = None, position: Position | None = None):
        self.model = model
        self.encoder = is_encoder(model)
        require_head_for_encoder(model, head)
        if head is None:
            head = UnembedHead(model)
        self.head = head
        self.position: Position = position or ("first" if self.encoder else "last")
        if self.position not in ("last", "first"):
            raise ValueError(f"position must be 'last' or 'first', got {position!r}.")
        self.final_hook = final_resid_hook(model)
        try:
            self.embed_hook: str | None = token_embed_hook(model)
        except ValueError:  # zero/mean embedding ablation then says so; token replacement still works
            self.embed_hook = None
        self.tokenizer = getattr(model, "tokenizer", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prediction_positions(self, mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch"]:
        """Each sequence's prediction position: its last or first real token."""
        return last_positions(mask) if self.position == "last" else first_positions(mask)

    def protected(self, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"],
                  positions: Int[Tensor, "batch"]) -> Bool[Tensor, "batch pos"]:
        """Positions never removed nor ranked: the prediction position and a leading BOS/CLS.

        The first real token is protected when it is one of the tokenizer's special tokens
        (BOS for LMs, ``[CLS]`` for classifiers), as the paper excludes ``[CLS]``. The one
        definition is :func:`mechnorm.protected.protected_positions`, which results use too.
        """
        return protected_positions(tokens, mask, positions, self.tokenizer)

    def mean_embedding(self) -> Float[Tensor, "d_model"]:
        """The mean of the token-embedding table over the vocabulary (for mean ablation)."""
        return self.model.W_E.detach().float().mean(0)

    @torch.inference_mode()
    def logits(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Tensor | None = None,
        positions: Int[Tensor, "batch"] | None = None,
        embed_edit: EmbedEdit | None = None,
    ) -> Float[Tensor, "batch n_outputs"]:
        """The head's logits over every output at each sequence's prediction position.

        Args:
            tokens: ``[batch, pos]`` ids.
            attention_mask: ``[batch, pos]``, False at padding; all real by default.
            positions: ``[batch]`` prediction positions; by default :meth:`prediction_positions`.
            embed_edit: an optional forward hook applied to the token embedding
                (``hook_embed``), used by embedding ablation.

        Example:
            >>> Predictor(model).logits(batch.tokens, batch.attention_mask).shape   # doctest: +SKIP
            torch.Size([3, 50257])
        """
        mask = check_mask(attention_mask, *tokens.shape, device=tokens.device)
        positions = self.prediction_positions(mask) if positions is None else positions
        captured: dict[str, Tensor] = {}

        def capture(act, hook):
            captured["resid"] = act

        hooks = [(self.final_hook, capture)]
        if embed_edit is not None:
            if self.embed_hook is None:
                raise ValueError("This model has no hook_embed; use a token replacement instead of 'zero'/'mean'.")
            hooks.append((self.embed_hook, embed_edit))
        device = self.device
        self.model.run_with_hooks(tokens.to(device), return_type=None, fwd_hooks=hooks, **mask_kwargs(self.model, mask))
        picked = at_positions(captured["resid"], positions)
        return self.head(picked[:, None, :], cache=None)[:, 0].float().cpu()

    def __repr__(self) -> str:
        return f"Predictor(head={self.head!r}, position={self.position!r})"


def as_predictor(model, head: Head | None = None) -> Predictor:
    """``model`` itself when it is already a :class:`Predictor`, else ``Predictor(model, head)``.

    Example:
        >>> as_predictor(model).position                                   # doctest: +SKIP
        'last'
    """
    if isinstance(model, Predictor):
        if head is not None and head is not model.head:
            raise ValueError("Pass head= either to the Predictor or to the function, not both.")
        return model
    return Predictor(model, head)
