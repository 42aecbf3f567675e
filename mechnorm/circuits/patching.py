"""Activation patching (batched) and attribution patching on a clean/corrupted pair of inputs.

Activation patching (Meng et al. 2022; Wang et al. 2023, "IOI"; Heimersheim & Nanda 2024,
"How to use and interpret activation patching") runs the *corrupted* input and replaces one
activation a (a residual at one position, one head's output, …) by its value on the *clean*
input; the metric m is the target's logit (or target − foil for a ``contrast``) at the
prediction position, reported normalised

    score = (m(corrupted; a ← a_clean) − m(corrupted)) / (m(clean) − m(corrupted)),

so 1 means the patch restores the clean behaviour and 0 means it does nothing.
Attribution patching (Nanda 2023; Syed et al. 2023, "Attribution patching outperforms
automated circuit discovery") replaces every re-run by a first-order Taylor expansion at the
corrupted run, from one forward and one backward pass:

    m(corrupted; a ← a_clean) − m(corrupted) ≈ (a_clean − a_corrupted) · ∂m/∂a |_corrupted.

Patch runs are batched: the corrupted input is repeated along the batch axis and each row
patches a different unit (layer and position or head) through one hook per hook point. The
forward pass stops at the final residual and only the prediction position is unembedded.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..inputs import (UNEMBED_IN_HOOK, Batch, finite_padded_rows, is_encoder, model_device, prediction_positions,
                      require_no_dropout, run_until, tokenize)
from ..residual import at_positions, check_mask
from ..targets import Target, id_labels
from .patching_result import PatchingResult, Units, units_for

Where = Literal["resid_pre", "attn_out", "mlp_out", "head_out", "head_pos", "pattern"]
_TOKENS_PER_PASS = 8192  # default rows per patch pass: rows × pos near this many tokens


def activation_patching(
    model,
    clean,
    corrupted,
    target: Target | None = None,
    where: Where = "resid_pre",
    layers: int | Sequence[int] | None = None,
    positions: str | Sequence[int] = "all",
    batch_size: int | None = None,
    progress: bool = True,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, one unit at a time, many units per pass.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` (causal LM) in eval mode.
        clean, corrupted: texts, a :class:`~mechnorm.Batch` or ``[batch, pos]`` token ids; pair
            i is ``(clean[i], corrupted[i])``, and both must tokenise to the same length.
        target: the metric's output: a :class:`~mechnorm.Target` (``contrast`` for target − foil,
            ids per pair allowed); None takes the clean run's prediction.
        where: what a unit patches — ``"resid_pre"`` (residual after ``layer`` blocks at one
            position, layers 0…L), ``"attn_out"`` / ``"mlp_out"`` (a block's output at one
            position), ``"head_out"`` (one head's ``hook_z``, all positions), ``"head_pos"`` (one
            head at one position) or ``"pattern"`` (one head's attention pattern, all queries).
        layers: layers (``resid_pre``) or blocks to patch; None for all, negatives count from the end.
        positions: ``"all"`` or positions counted from each sequence's first real token
            (negatives from its last), so padding does not move them.
        batch_size: patch runs per forward pass; None keeps a pass near 8192 tokens.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`PatchingResult`: normalised scores with labelled axes, the patched metric in
        ``raw``, and the clean and corrupted metrics.

    Example:
        >>> result = mechnorm.activation_patching(model, "a 3 b 7 c 1 b", "a 3 b 5 c 1 b",  # doctest: +SKIP
        ...     mechnorm.contrast("7", "5", model), where="head_out")
        >>> result.plot()                                                                 # doctest: +SKIP
    """
    pair = _prepare(model, clean, corrupted, target, where, layers, positions)
    units, hooks, clean_acts = pair.units, pair.units.hook_names, pair.clean_acts
    with torch.no_grad():
        pair.corrupted_metric = _metric(model, pair.corrupted, pair.mask, pair.positions, pair.target, [])
    run_units = [(b, u) for b in range(pair.batch) for u in range(len(units)) if units.valid[b, u]]
    if batch_size is None:
        batch_size = max(1, _TOKENS_PER_PASS // pair.clean.shape[1])
    patched = torch.full((pair.batch, len(units)), float("nan"))
    with torch.no_grad():
        for start in tqdm(range(0, len(run_units), batch_size), desc=f"patching {where}", disable=not progress):
            chunk = run_units[start:start + batch_size]
            rows_b = torch.tensor([b for b, _ in chunk])
            fwd_hooks = [(name, _patch_hook(units, chunk, clean_acts[name], name)) for name in hooks
                         if any(units.hook[u] == name for _, u in chunk)]
            metric = _metric(model, pair.corrupted[rows_b], pair.mask[rows_b], pair.positions[rows_b],
                             pair.target_rows(rows_b), fwd_hooks)
            for row, (b, u) in enumerate(chunk):
                patched[b, u] = metric[row]
    return PatchingResult.build(pair, patched, "activation patching", where)


def attribution_patching(
    model,
    clean,
    corrupted,
    target: Target | None = None,
    where: Where = "resid_pre",
    layers: int | Sequence[int] | None = None,
    positions: str | Sequence[int] = "all",
    batch_size: int | None = None,
    progress: bool = False,
) -> PatchingResult:
    """The linear approximation of :func:`activation_patching` from one forward + backward pass.

    ``estimate(unit) = Σ (a_clean − a_corrupted) · ∂m/∂a`` over the unit's entries, with the
    gradient taken at the corrupted run; ``raw`` holds ``m(corrupted) + estimate``. Arguments
    as for :func:`activation_patching` (``batch_size`` and ``progress`` are accepted for a
    common signature; all pairs go through one pass).

    Example:
        >>> approx = mechnorm.attribution_patching(model, clean, corrupted, target, where="head_out")  # doctest: +SKIP
        >>> approx.compare(mechnorm.activation_patching(model, clean, corrupted, target, where="head_out"))  # doctest: +SKIP
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attribution_patching needs gradients; call it outside torch.inference_mode().")
    pair = _prepare(model, clean, corrupted, target, where, layers, positions)
    units, hooks, clean_acts = pair.units, pair.units.hook_names, pair.clean_acts
    deltas: dict[str, Tensor] = {}
    corrupted_acts: dict[str, Tensor] = {}

    def add_delta(name):
        def hook(act, hook):
            corrupted_acts[name] = act.detach()
            deltas[name] = torch.zeros_like(act, requires_grad=True)  # ∂m/∂delta = ∂m/∂act
            return act + deltas[name]

        return hook

    fwd_hooks = [(name, add_delta(name)) for name in hooks]
    fwd_hooks += [(name, finite_padded_rows) for name in model.hook_dict if name.endswith("attn.hook_attn_scores")]
    with torch.enable_grad():
        metric = _metric(model, pair.corrupted, pair.mask, pair.positions, pair.target, fwd_hooks, grad=True)
        grads = torch.autograd.grad(metric.sum(), [deltas[name] for name in hooks], allow_unused=True)
    pair.corrupted_metric = metric.detach().cpu()
    estimate = torch.full((pair.batch, len(units)), float("nan"))
    for name, grad in zip(hooks, grads):
        grad = torch.zeros_like(deltas[name]) if grad is None else grad
        effect = ((clean_acts[name] - corrupted_acts[name]).float() * grad.float()).detach().cpu()
        for u in (u for u in range(len(units)) if units.hook[u] == name):
            estimate[:, u] = effect[(slice(None), *units.index[u])].reshape(pair.batch, -1).sum(-1)
    estimate = estimate.masked_fill(~units.valid, float("nan"))
    return PatchingResult.build(pair, pair.corrupted_metric[:, None] + estimate, "attribution patching", where)


class _Pair:
    """Clean and corrupted tokens of the same shape, the target and the units to patch."""

    def __init__(self, model, clean: Batch, corrupted: Batch, target, units: Units):
        self.clean, self.corrupted, self.mask = clean.tokens, corrupted.tokens, clean.attention_mask
        self.strings, self.corrupted_strings, self.units = clean.strings, corrupted.strings, units
        self.batch = self.clean.shape[0]
        self.positions = prediction_positions(model, self.mask) if target is None else target.prediction_positions(self.mask)
        self.clean_acts: dict[str, Tensor] = {}  # the clean run's activations at the units' hooks
        with torch.no_grad():
            keep = [(name, _keep(self.clean_acts, name)) for name in units.hook_names]
            clean_logits = _logits(model, self.clean, self.mask, self.positions, keep)
        if target is None:
            ids = clean_logits.argmax(-1)
            target = Target(ids=ids, labels=id_labels(ids, getattr(model, "tokenizer", None)))
        target.check(clean_logits.shape[-1], self.batch)
        self.target = target
        self.clean_metric = _reduce(target, clean_logits)
        self.corrupted_metric: Tensor | None = None  # set by the patching function's own corrupted run

    def target_rows(self, rows: Tensor) -> Target:
        """The target of each repeated row (pair ``rows[i]``)."""
        columns = self.target.columns(self.batch)[rows]
        return Target(ids=columns[:, 0], foil=columns[:, 1] if self.target.is_contrast else None)


def _prepare(model, clean, corrupted, target, where, layers, positions) -> _Pair:
    require_no_dropout(model, "patching")
    if target is not None and not isinstance(target, Target):
        raise TypeError(f"target must be a Target (predicted, token_target, contrast) or None, got {type(target).__name__}.")
    if is_encoder(model):
        raise ValueError("Patching reads a causal LM's own next-token logits; this is a bidirectional encoder, "
                         "whose prediction goes through a separate classifier head, which patching does not take yet.")
    clean, corrupted = _as_batch(model, clean, "clean"), _as_batch(model, corrupted, "corrupted")
    _check_same_length(clean, corrupted)
    units = units_for(model, where, layers, positions, clean.attention_mask)
    return _Pair(model, clean, corrupted, target, units)


def _as_batch(model, value, name: str) -> Batch:
    device = model_device(model)
    if isinstance(value, (str, list, tuple)) and value and isinstance(value if isinstance(value, str) else value[0], str):
        value = tokenize(model, value)
    if isinstance(value, Batch):
        tokens, mask, strings = value.tokens, value.attention_mask, value.strings
    else:
        tokens = torch.as_tensor(value)
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim != 2:
            raise ValueError(f"{name} must be text(s), a mechnorm.Batch or [batch, pos] token ids; got shape {tuple(tokens.shape)}.")
        mask, strings = None, None
    mask = check_mask(mask, *tokens.shape)
    if strings is None:
        from ..result import token_strings

        strings = token_strings(getattr(model, "tokenizer", None), tokens)
    return Batch(tokens.to(device), mask.to(device), strings)


def _check_same_length(clean: Batch, corrupted: Batch) -> None:
    if len(clean) != len(corrupted):
        raise ValueError(f"clean has {len(clean)} sequences but corrupted has {len(corrupted)}; give one corrupted input per clean one.")
    for i in range(len(clean)):
        a, b = clean.attention_mask[i], corrupted.attention_mask[i]
        if a.shape != b.shape or not torch.equal(a.cpu(), b.cpu()):
            show = lambda batch: [batch.strings[i][p] for p in batch.attention_mask[i].nonzero().flatten().tolist()] if batch.strings else batch.tokens[i][batch.attention_mask[i]].tolist()  # noqa: E731
            raise ValueError(
                f"Pair {i}: clean and corrupted must tokenise to the same length (and the same padding) so that "
                f"positions correspond, but clean has {int(a.sum())} tokens {show(clean)} and corrupted has "
                f"{int(b.sum())} tokens {show(corrupted)}. Reword the corrupted text so each token has a counterpart."
            )


def _keep(store: dict, name: str):
    """A hook storing a copy of its activation under ``name`` (a bridge's ``hook.name`` may be an alias's)."""

    def hook(act, hook):
        store[name] = act.detach().clone()

    return hook


def _patch_hook(units: Units, chunk: list[tuple[int, int]], clean: Tensor, name: str):
    """One hook for every row of the chunk that patches at ``name``: row r gets pair b's clean value."""
    rows = [(row, b, units.index[u]) for row, (b, u) in enumerate(chunk) if units.hook[u] == name]

    def hook(act, hook):
        for row, b, index in rows:
            act[(row, *index)] = clean[(b, *index)].to(act.dtype)
        return act

    return hook


def _logits(model, tokens, mask, positions, fwd_hooks, grad: bool = False) -> Float[Tensor, "batch vocab"]:
    """All output logits at ``positions``; the forward pass stops at the final residual."""
    out, can_stop = run_until(model, tokens, UNEMBED_IN_HOOK, mask, fwd_hooks)
    rows = at_positions(out, positions)[:, None]
    logits = model.unembed(rows)[:, 0] if can_stop else rows[:, 0]
    return logits.float() if grad else logits.detach().float().cpu()


def _metric(model, tokens, mask, positions, target: Target, fwd_hooks, grad: bool = False) -> Tensor:
    return _reduce(target, _logits(model, tokens, mask, positions, fwd_hooks, grad))


def _reduce(target: Target, logits: Tensor) -> Tensor:
    columns = target.columns(logits.shape[0]).to(logits.device)
    return target.reduce(logits.gather(-1, columns))


__all__ = ["activation_patching", "attribution_patching"]
