"""Comprehensiveness and sufficiency (ERASER, DeYoung et al. 2020) and their AOPC.

Comprehensiveness removes each sequence's top-K % ranked tokens and measures the drop in
the probability of the originally predicted output (higher = the ranking found what the
model needs); sufficiency keeps only those tokens (lower = they suffice). AOPC is the mean
over K. Both also report accuracy against gold labels when given.

Positions that are never removed (the prediction position and a leading BOS/CLS, see
:meth:`Predictor.protected`) are excluded from the ranking and from the token count, as the
paper excludes ``[CLS]``. Each K is one batched forward pass per chunk of ``batch_size``
sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..residual import check_mask
from ..targets import Target
from .perturb import (
    EMBED_REPLACEMENTS,
    Replacement,
    as_scores,
    check_ks,
    embedding_edit,
    perturb,
    real_span,
    replacement_id,
    top_k,
)
from .predictor import Predictor, as_predictor

PAPER_KS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ERASER_KS = (0.01, 0.05, 0.1, 0.2, 0.5)
Mode = Literal["comprehensiveness", "sufficiency"]


@dataclass
class PerturbationCurve:
    """Per-K, per-sequence outcome of removing (or keeping only) the top-K % tokens.

    Attributes:
        metric: ``"comprehensiveness"`` or ``"sufficiency"``.
        ks: the K fractions.
        full_prob: ``[batch]`` probability of the explained output on the full input.
        prob: ``[k, batch]`` its probability on each perturbed input.
        n_removed: ``[k, batch]`` how many tokens were removed.
        correct: ``[k, batch]`` perturbed prediction == gold label, or None without labels.
        full_correct: ``[batch]`` the same on the full input, or None.

    Example:
        >>> curve = comprehensiveness(model, tokens, mask, attr)           # doctest: +SKIP
        >>> curve.aopc, curve.confidence_drop.mean(-1)                    # doctest: +SKIP
    """

    metric: Mode
    ks: tuple[float, ...]
    full_prob: Float[Tensor, "batch"]
    prob: Float[Tensor, "k batch"]
    n_removed: Int[Tensor, "k batch"]
    correct: Bool[Tensor, "k batch"] | None = None
    full_correct: Bool[Tensor, "batch"] | None = None

    @property
    def confidence_drop(self) -> Float[Tensor, "k batch"]:
        """``p(ŷ | full) − p(ŷ | perturbed)`` per K and sequence."""
        return self.full_prob[None] - self.prob

    @property
    def aopc(self) -> float:
        """Mean confidence drop over K and sequences (area over the perturbation curve)."""
        return float(self.confidence_drop.mean())

    @property
    def accuracy(self) -> Float[Tensor, "k"] | None:
        """Accuracy against the gold labels at each K, or None without labels."""
        return None if self.correct is None else self.correct.float().mean(-1)

    @property
    def accuracy_aopc(self) -> float:
        """Mean accuracy over K (NaN without labels)."""
        return float("nan") if self.correct is None else float(self.correct.float().mean())

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows ``metric, k, value``: confidence drop (``metric``) and accuracy
        (``metric + "_accuracy"``) per K, and their AOPC with ``k`` = NaN."""
        rows = [{"metric": self.metric, "k": k, "value": float(v)} for k, v in zip(self.ks, self.confidence_drop.mean(-1))]
        rows.append({"metric": self.metric, "k": float("nan"), "value": self.aopc})
        if self.correct is not None:
            name = f"{self.metric}_accuracy"
            rows += [{"metric": name, "k": k, "value": float(v)} for k, v in zip(self.ks, self.accuracy)]
            rows.append({"metric": name, "k": float("nan"), "value": self.accuracy_aopc})
        return pd.DataFrame(rows, columns=["metric", "k", "value"])


def comprehensiveness(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    scores,
    *,
    target=None,
    labels: Int[Tensor, "batch"] | None = None,
    ks: Sequence[float] = PAPER_KS,
    replacement: Replacement | None = None,
    head=None,
    protect: Bool[Tensor, "batch pos"] | None = None,
    layer: int = -1,
    batch_size: int = 32,
) -> PerturbationCurve:
    """Remove each sequence's top-K % tokens; how much does the prediction's probability drop?

    Args:
        model: a model (``HookedTransformer``, ``TransformerBridge``, ``HookedEncoder``) or a
            :class:`Predictor`.
        tokens: ``[batch, pos]`` ids; attention_mask: ``[batch, pos]``, False at padding.
        scores: an :class:`~mechnorm.Attribution` (its row at ``layer``) or ``[batch, pos]``;
            tokens are ranked largest first.
        target: what to track: None (the model's prediction on the full input), a
            :class:`~mechnorm.Target` (its ``ids``, and ``positions`` when set) or ids ``[batch]``.
        labels: gold labels ``[batch]`` (token ids or classes) for the accuracy, optional.
        ks: K fractions in (0, 1]; default the paper's 10…90 % (:data:`ERASER_KS` for ERASER's).
        replacement: ``"mask"``, ``"pad"``, ``"unk"``, ``"eos"``, ``"bos"``, a token id,
            ``"zero"``/``"mean"`` (embedding ablation at ``hook_embed``) or ``"delete"``; by
            default ``"mask"`` for encoders with a mask token, ``"delete"`` otherwise.
        head: the head-on-top, when ``model`` is not a Predictor (see :class:`Predictor`).
        protect: extra ``[batch, pos]`` positions never removed, on top of the defaults.
        batch_size: sequences per forward pass.

    Returns:
        A :class:`PerturbationCurve`; ``.aopc`` is the paper's number.

    Example:
        >>> attr = mechnorm.normxlogit(cache, head, target)                 # doctest: +SKIP
        >>> comprehensiveness(model, batch.tokens, batch.attention_mask, attr).aopc  # doctest: +SKIP
        0.41
    """
    return _curve("comprehensiveness", model, tokens, attention_mask, scores, target, labels, ks,
                  replacement, head, protect, layer, batch_size)


def sufficiency(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None,
    scores,
    *,
    target=None,
    labels: Int[Tensor, "batch"] | None = None,
    ks: Sequence[float] = PAPER_KS,
    replacement: Replacement | None = None,
    head=None,
    protect: Bool[Tensor, "batch pos"] | None = None,
    layer: int = -1,
    batch_size: int = 32,
) -> PerturbationCurve:
    """Keep only each sequence's top-K % tokens (and the protected ones); how much does the
    prediction's probability drop? Lower is better. Arguments as for :func:`comprehensiveness`.

    Example:
        >>> sufficiency(model, batch.tokens, batch.attention_mask, attr, ks=ERASER_KS).aopc  # doctest: +SKIP
    """
    return _curve("sufficiency", model, tokens, attention_mask, scores, target, labels, ks,
                  replacement, head, protect, layer, batch_size)


def default_replacement(predictor: Predictor) -> Replacement:
    """``"mask"`` for an encoder whose tokenizer has a mask token, else ``"delete"``."""
    has_mask = getattr(predictor.tokenizer, "mask_token_id", None) is not None
    return "mask" if predictor.encoder and has_mask else "delete"


def _curve(mode: Mode, model, tokens, attention_mask, scores, target, labels, ks, replacement, head, protect,
           layer, batch_size) -> PerturbationCurve:
    predictor = as_predictor(model, head)
    ks = check_ks(ks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    tokens = torch.as_tensor(tokens).long().cpu()
    mask = check_mask(attention_mask, *tokens.shape).cpu()
    scores = as_scores(scores, layer).cpu()
    if scores.shape != tokens.shape:
        raise ValueError(f"scores are {tuple(scores.shape)} but tokens are {tuple(tokens.shape)}; pass scores for these tokens.")
    replacement = default_replacement(predictor) if replacement is None else replacement
    replacement_id(replacement, predictor.tokenizer)  # fail early on an unusable replacement
    ids, positions = _target(target, predictor, mask)
    keep = predictor.protected(tokens, mask, positions)
    if protect is not None:
        keep = keep | (torch.as_tensor(protect).bool().cpu() & mask)
    labels = None if labels is None else torch.as_tensor(labels).long().reshape(-1)
    if labels is not None and labels.shape[0] != tokens.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {tokens.shape[0]} sequences.")
    fill = predictor.mean_embedding() if replacement == "mean" else None

    parts = []
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        span = real_span(mask[rows])  # drop columns that are padding in every row of this chunk
        parts.append(_chunk(mode, predictor, ks, replacement, fill, tokens[rows, span], mask[rows, span],
                            scores[rows, span], keep[rows, span], positions[rows] - span.start,
                            None if ids is None else ids[rows], None if labels is None else labels[rows]))
    full_prob, prob, removed, correct, full_correct = (
        None if parts[0][i] is None else torch.cat([p[i] for p in parts], dim=-1) for i in range(5)
    )
    return PerturbationCurve(mode, ks, full_prob, prob, removed, correct, full_correct)


def _chunk(mode, predictor, ks, replacement, fill, tokens, mask, scores, keep, positions, ids, labels):
    full = predictor.logits(tokens, mask, positions)
    ids = full.argmax(-1) if ids is None else ids
    if (ids < 0).any() or (ids >= full.shape[-1]).any():
        raise ValueError(f"Target ids {ids.tolist()} are outside the head's {full.shape[-1]} outputs.")
    rows = torch.arange(tokens.shape[0])
    full_prob = full.softmax(-1)[rows, ids]
    rankable = mask & ~keep
    probs, removed, correct = [], [], []
    for k in ks:
        selected = top_k(scores, rankable, k)
        remove = selected if mode == "comprehensiveness" else rankable & ~selected
        out = perturb(tokens, mask, positions, remove, replacement, predictor.tokenizer)
        edit = embedding_edit(out.embed_ablate, fill) if replacement in EMBED_REPLACEMENTS else None
        logits = predictor.logits(out.tokens, out.attention_mask, out.positions, embed_edit=edit)
        probs.append(logits.softmax(-1)[rows, ids])
        removed.append(remove.sum(-1))
        if labels is not None:
            correct.append(logits.argmax(-1) == labels)
    full_correct = None if labels is None else full.argmax(-1) == labels
    return full_prob, torch.stack(probs), torch.stack(removed), (torch.stack(correct) if correct else None), full_correct


def _target(target, predictor: Predictor, mask) -> tuple[Tensor | None, Tensor]:
    """Target ids ``[batch]`` (None: use the prediction) and prediction positions ``[batch]``."""
    batch = mask.shape[0]
    if isinstance(target, Target):
        if target.is_contrast:
            raise ValueError("Faithfulness tracks one output's probability; pass Target(ids=...) without a foil.")
        ids = target.columns(batch)[:, 0].cpu()
        positions = target.prediction_positions(mask).cpu() if target.positions is not None else None
    elif target is None:
        ids, positions = None, None
    else:
        ids = torch.as_tensor(target).long().reshape(-1).cpu()
        ids = ids.expand(batch) if ids.shape[0] == 1 else ids
        if ids.shape[0] != batch:
            raise ValueError(f"{ids.shape[0]} target ids for {batch} sequences.")
    if positions is None:
        positions = predictor.prediction_positions(mask)
    if not mask[torch.arange(batch), positions].all():
        raise ValueError(f"Prediction positions {positions.tolist()} include padding; check the mask or Target.positions.")
    return ids, positions


__all__ = ["ERASER_KS", "PAPER_KS", "PerturbationCurve", "comprehensiveness", "default_replacement", "sufficiency"]
