"""What "the prediction" is: the model's own prediction, a given token, or a contrast.

A :class:`Target` holds one output index per sequence (optionally a foil, for
target-minus-foil scores) and, when known, the prediction position of each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class Target:
    """Output column(s) whose logit a method reads, one per sequence.

    Attributes:
        ids: ``[batch]`` (or ``[1]``, broadcast to any batch) output indices.
        foil: ``[batch]`` / ``[1]`` indices subtracted from ``ids`` (contrastive), or None.
        positions: ``[batch]`` prediction positions when known (set by :func:`predicted`).
        labels: display strings for ``ids`` (e.g. ``[" are", " is"]``), or None.
        probs: ``[batch]`` the model's softmax probability of ``ids`` at ``positions`` (set by
            :func:`predicted`), or None.
    """

    ids: Int[Tensor, "batch"]
    foil: Int[Tensor, "batch"] | None = None
    positions: Int[Tensor, "batch"] | None = None
    labels: tuple[str, ...] | None = None
    probs: Float[Tensor, "batch"] | None = None

    @property
    def is_contrast(self) -> bool:
        """True when scores are target minus foil."""
        return self.foil is not None

    def columns(self, batch: int) -> Int[Tensor, "batch k"]:
        """Columns to gather for a batch: ``[batch, 1]``, or ``[batch, 2]`` with the foil."""
        parts = [_broadcast(self.ids, batch, "target")]
        if self.foil is not None:
            parts.append(_broadcast(self.foil, batch, "foil"))
        return torch.stack(parts, dim=-1)

    def reduce(self, logits: Float[Tensor, "... k"]) -> Float[Tensor, "..."]:
        """Collapse gathered columns to one score: the target's, or target minus foil."""
        return logits[..., 0] - logits[..., 1] if self.is_contrast else logits[..., 0]

    def check(self, n_outputs: int, batch: int) -> None:
        """Raise a clear error when an index is outside the head's outputs or batch sizes differ."""
        columns = self.columns(batch)
        bad = columns[(columns < 0) | (columns >= n_outputs)]
        if bad.numel():
            raise ValueError(
                f"Target token id(s) {sorted(set(bad.tolist()))} are outside the head's "
                f"{n_outputs} outputs (vocabulary or classes). Check the tokenizer used for the target."
            )

    def prediction_positions(self, mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch"]:
        """The stored positions (checked to be real tokens), or each sequence's last real token."""
        if self.positions is not None:
            self.check_positions(mask)
            return _broadcast(self.positions, mask.shape[0], "positions").to(mask.device)
        return last_positions(mask)

    def check_positions(self, mask: Bool[Tensor, "batch pos"]) -> None:
        """Raise when a stored prediction position is outside the sequence or a padding position.

        A target made by ``predicted(logits)`` without the mask of a padded batch reads the
        prediction at the last position, padding included; this names the sequences and the fix.

        Example:
            >>> Target(torch.tensor([3]), positions=torch.tensor([2])).check_positions(torch.tensor([[True, True, False]]))
            Traceback (most recent call last):
            ...
            ValueError: The target's prediction position is padding in sequence(s) [0] (positions [2]); ...
        """
        if self.positions is None:
            return
        positions = _broadcast(self.positions, mask.shape[0], "positions").to(mask.device)
        length = mask.shape[1]
        if (positions < 0).any() or (positions >= length).any():
            raise ValueError(f"The target's prediction positions {positions.tolist()} are outside the sequence length {length}.")
        real = mask.bool()[torch.arange(mask.shape[0], device=mask.device), positions]
        if not real.all():
            bad = (~real).nonzero().flatten().tolist()
            raise ValueError(
                f"The target's prediction position is padding in sequence(s) {bad} (positions "
                f"{positions[~real].tolist()}); it was read without the batch's attention mask. Make it with "
                "mechnorm.predicted(logits, attention_mask=mask) or mechnorm.predicted(logits, tokens=tokens, "
                "tokenizer=model.tokenizer), with mask = mechnorm.tokenize(model, texts).attention_mask, "
                "and pass the same attention_mask=mask to the method."
            )

    def to(self, device) -> "Target":
        """The same target with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, ids=move(self.ids), foil=move(self.foil), positions=move(self.positions), probs=move(self.probs))


def last_positions(mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch"]:
    """Index of each sequence's last real (mask-True) token, under left or right padding."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, -1).amax(-1)


def first_positions(mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch"]:
    """Index of each sequence's first real token (``[CLS]`` in an encoder), under either padding."""
    return mask.long().argmax(-1)


def predicted(
    logits: Float[Tensor, "batch pos vocab"],
    attention_mask: Tensor | None = None,
    position: int | Tensor | None = None,
    tokenizer=None,
    tokens: Tensor | None = None,
) -> Target:
    """The model's final prediction: the argmax of ``logits`` at the prediction position.

    Args:
        logits: the model's output logits ``[batch, pos, vocab]``.
        attention_mask: ``[batch, pos]``; by default inferred from ``tokens`` (below), else
            every position is real.
        position: prediction position (an int for all, or ``[batch]``); by default each
            sequence's last real token, which handles left and right padding.
        tokenizer: the tokenizer (or the model), to label the target and to find padding in ``tokens``.
        tokens: the ``[batch, pos]`` ids the logits were computed from, e.g. a padded batch
            from ``model.to_tokens([...])``: with the tokenizer's pad id, the mask is inferred
            (:func:`mechnorm.inputs.infer_mask`), or an ambiguous layout is refused.

    Returns:
        A :class:`Target` with ``ids``, ``positions``, ``labels`` (with a tokenizer) and
        ``probs``, the softmax probability of each predicted id.

    Example:
        >>> tokens = model.to_tokens(["The keys to the cabinet", "The key"])   # doctest: +SKIP
        >>> logits, cache = model.run_with_cache(tokens)                      # doctest: +SKIP
        >>> target = mechnorm.predicted(logits, tokens=tokens, tokenizer=model.tokenizer)  # doctest: +SKIP
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, pos, vocab], got shape {tuple(logits.shape)}.")
    batch, pos, _ = logits.shape
    if hasattr(tokenizer, "cfg"):  # a model stands for its tokenizer
        tokenizer = tokenizer.tokenizer
    from .residual import check_mask

    if attention_mask is None and tokens is not None:
        from .inputs import infer_mask

        tokens = torch.as_tensor(tokens).reshape(-1, torch.as_tensor(tokens).shape[-1])
        if tuple(tokens.shape) != (batch, pos):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)} but the logits are [batch={batch}, pos={pos}]; "
                             "pass the ids the logits were computed from.")
        attention_mask = infer_mask(tokens, tokenizer)
    if attention_mask is None:
        mask = torch.ones(batch, pos, dtype=torch.bool, device=logits.device)
    else:
        mask = check_mask(attention_mask, batch, pos).to(logits.device)
    if position is None:
        positions = last_positions(mask)
    else:
        positions = _broadcast(torch.as_tensor(position, device=logits.device).long(), batch, "position")
        if (positions < 0).any() or (positions >= pos).any():
            raise ValueError(f"position {positions.tolist()} is outside the sequence length {pos}.")
    if not mask[torch.arange(batch, device=logits.device), positions].all():
        raise ValueError(f"position {positions.tolist()} is padding in some sequence under the attention mask; "
                         "leave position=None for each sequence's last real token.")
    rows = logits[torch.arange(batch, device=logits.device), positions].float()  # [batch, vocab]
    ids = rows.argmax(-1)
    probs = rows.softmax(-1).gather(-1, ids[:, None])[:, 0]
    labels = id_labels(ids, tokenizer)
    return Target(ids=ids, positions=positions, labels=labels, probs=probs.detach())


def token_target(ids_or_strings: int | str | Sequence | Tensor, model=None) -> Target:
    """A given token (or class) per sequence; one value is used for every sequence.

    Strings are turned into single token ids with ``model``'s tokenizer; a string that is
    not exactly one token is an error.

    Example:
        >>> target = mechnorm.token_target(" are", model)            # doctest: +SKIP
        >>> target = mechnorm.token_target([318, 389])                # doctest: +SKIP
    """
    values = [ids_or_strings] if isinstance(ids_or_strings, (int, str)) else list(ids_or_strings)
    if isinstance(ids_or_strings, Tensor):
        values = ids_or_strings.reshape(-1).tolist()
    if not values:
        raise ValueError("token_target needs at least one token id or string.")
    ids = [_single_token_id(v, model) for v in values]
    tokenizer = getattr(model, "tokenizer", None)
    return Target(ids=torch.tensor(ids, dtype=torch.long), labels=id_labels(torch.tensor(ids), tokenizer))


def contrast(target, foil, model=None) -> Target:
    """Target minus foil: scores read ``logit[target] - logit[foil]``.

    ``target`` and ``foil`` are Targets, token ids or strings (strings need ``model``).

    Example:
        >>> target = mechnorm.contrast(" are", " is", model)          # doctest: +SKIP
    """
    target = target if isinstance(target, Target) else token_target(target, model)
    foil = foil if isinstance(foil, Target) else token_target(foil, model)
    if foil.is_contrast:
        raise ValueError("The foil of a contrast cannot itself be a contrast.")
    labels = None
    if target.labels and foil.labels:
        labels = tuple(f"{t} − {f}" for t, f in zip(target.labels, foil.labels))
    return replace(target, foil=foil.ids, labels=labels)


def _single_token_id(value, model) -> int:
    if isinstance(value, (int, torch.Tensor)) and not isinstance(value, bool):
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"Expected a token id or string, got {type(value).__name__}.")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"Cannot turn {value!r} into a token id without a model that has a tokenizer: pass model=.")
    ids = tokenizer.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{value!r} is {len(ids)} tokens ({pieces}), not one; pick a single-token target.")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and value.strip() != tokenizer.unk_token:
        close = _close_tokens(value, tokenizer)
        hint = f" Close tokens in the vocabulary: {close}." if close else ""
        raise ValueError(f"{value!r} is not in the vocabulary: it becomes the unknown token "
                         f"{tokenizer.unk_token!r} (id {unk}), whose logit says nothing about {value!r}.{hint} "
                         f"Pick an in-vocabulary token (model.to_single_token(word) checks one).")
    return ids[0]


def _close_tokens(word: str, tokenizer, n: int = 3) -> list[str]:
    """Vocabulary entries spelled most like ``word`` (for an error's suggestion)."""
    import difflib

    return difflib.get_close_matches(word.strip(), list(tokenizer.get_vocab()), n=n, cutoff=0.6)


def with_probs(target: Target, rows: Float[Tensor, "batch vocab"]) -> Target:
    """``target`` with ``probs`` filled: the softmax probability of each sequence's target id in
    ``rows``, the model's logits at each sequence's prediction position (a contrast: the
    target's, not the foil's).

    Example:
        >>> rows = torch.tensor([[0.0, 0.0], [0.0, 100.0]])
        >>> with_probs(Target(ids=torch.tensor([1])), rows).probs
        tensor([0.5000, 1.0000])
    """
    ids = _broadcast(target.ids, rows.shape[0], "target").to(rows.device)
    return replace(target, probs=rows.float().softmax(-1).gather(-1, ids[:, None])[:, 0].detach().cpu())


def _broadcast(values: Tensor, batch: int, name: str) -> Tensor:
    values = values.reshape(-1)
    if values.shape[0] == 1:
        return values.expand(batch)
    if values.shape[0] != batch:
        raise ValueError(f"The {name} has {values.shape[0]} entries but the batch has {batch} sequences.")
    return values


def id_labels(ids: Tensor, tokenizer) -> tuple[str, ...] | None:
    """The decoded string of each id (for display), or None without a tokenizer."""
    if tokenizer is None:
        return None
    return tuple(tokenizer.decode([i]) for i in ids.tolist())
