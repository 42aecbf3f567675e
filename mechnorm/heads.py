"""Heads: map residual vectors ``[..., d_model]`` to the logits of chosen output columns.

A head is the model's "head-on-top" that NormXLogit and the logit lens pass each token's
layer-l representation through: final norm + unembedding for a language model
(:class:`UnembedHead`), a linear classifier or probe (:class:`LinearHead`), or any module
(:class:`ModuleHead`). Heads gather only the columns asked for, so a ``[..., vocab]`` tensor
is built only when the caller asks for every column (``columns=None``).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .head_fidelity import UNIT_OFFSET_NORMS, _hf_model_type, _read_softcap, check_final_norm
from .warn import warn

LnMode = Literal["recompute", "frozen"]
FINAL_SCALE_HOOK = "ln_final.hook_scale"


@dataclass(frozen=True)
class FinalNorm:
    """The final normalisation of a model, with its parameters read out.

    ``kind`` is ``"layernorm"`` (centre, divide by the standard deviation, affine),
    ``"rmsnorm"`` (divide by the root mean square, scale) or ``"none"``. Weights folded
    away by TransformerLens's ``fold_ln`` appear as ``weight=None``.
    """

    kind: Literal["layernorm", "rmsnorm", "none"]
    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float = 1e-5

    @classmethod
    def from_model(cls, model) -> "FinalNorm":
        """Read the final norm of a ``HookedTransformer`` or ``TransformerBridge``.

        A bridge wraps the HF norm, whose stored weight is ``w`` where the norm scales by
        ``1 + w`` in the Gemma family: the offset is read from the HF config's ``model_type``
        (:data:`UNIT_OFFSET_NORMS`); TransformerLens's own Gemma conversion stores ``1 + w``.
        The result is checked against the model's own ``ln_final`` on random vectors, and a
        norm it does not reproduce is refused (:func:`check_final_norm`).

        Example:
            >>> FinalNorm.from_model(model).kind  # doctest: +SKIP
            'rmsnorm'
        """
        norm_type = getattr(model.cfg, "normalization_type", None)
        if norm_type is None:
            return cls("none")
        kind = "layernorm" if norm_type.startswith("LN") else "rmsnorm"
        module = model.ln_final
        hf_module = getattr(module, "original_component", None)
        if hf_module is not None:  # TransformerBridge: the wrapped HF norm holds the parameters
            weight = getattr(hf_module, "weight", None)
            if weight is not None and _hf_model_type(model) in UNIT_OFFSET_NORMS:
                weight = 1.0 + weight
            bias = getattr(hf_module, "bias", None)
            eps = getattr(hf_module, "eps", getattr(hf_module, "variance_epsilon", model.cfg.eps))
        else:
            weight, bias, eps = getattr(module, "w", None), getattr(module, "b", None), model.cfg.eps
        norm = cls(kind, _detached(weight), _detached(bias), float(eps))
        check_final_norm(norm, hf_module if hf_module is not None else module, getattr(model.cfg, "model_name", "model"))
        return norm

    def moments(
        self, x: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"] | None = None
    ) -> tuple[Float[Tensor, "... 1"] | None, Float[Tensor, "... 1"]]:
        """``(mean, divisor)`` this norm applies to ``x``: the mean it subtracts (LayerNorm only,
        else None) and the standard deviation or RMS (eps included), or the given ``scale``."""
        if self.kind == "none":
            return None, torch.ones_like(x[..., :1])
        if self.kind == "layernorm":
            var, mean = torch.var_mean(x, dim=-1, correction=0, keepdim=True)
            return mean, (var + self.eps).sqrt() if scale is None else scale
        if scale is None:
            scale = (torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow(2) / x.shape[-1] + self.eps).sqrt()
        return None, scale

    def __call__(
        self, x: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"] | None = None
    ) -> Float[Tensor, "... d_model"]:
        """Normalise ``x``; a given ``scale`` replaces the recomputed one (frozen norm)."""
        if self.kind == "none":
            return x
        mean, divisor = self.moments(x, scale)
        x = (x if mean is None else x - mean) / divisor
        if self.weight is not None:
            x = x * self.weight.to(x)
        if self.bias is not None:
            x = x + self.bias.to(x)
        return x


class Head(ABC):
    """Maps residual vectors to the logits of chosen output columns.

    Subclasses implement :meth:`__call__`. ``columns`` holds, for every sequence in the
    batch, the output indices to return (``[batch, k]``); the residual's batch axis is
    the second-to-last-but-one (``[*lead, batch, pos, d_model]``). ``columns=None`` returns
    every column.
    """

    #: hook names the head reads from the cache besides the residuals
    hooks: tuple[str, ...] = ()
    #: names of the output columns (a classifier's classes), shown for its predictions; or None
    labels: tuple[str, ...] | None = None

    def _set_labels(self, labels: Sequence[str] | None) -> None:
        if labels is not None and len(labels) != self.n_outputs:
            raise ValueError(f"{len(labels)} labels for a head with {self.n_outputs} outputs; give one name per output.")
        self.labels = None if labels is None else tuple(map(str, labels))

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Number of output columns (vocabulary size or number of classes)."""

    @abstractmethod
    def __call__(
        self,
        resid: Float[Tensor, "*lead batch pos d_model"],
        columns: Int[Tensor, "batch k"] | None = None,
        cache=None,
    ) -> Float[Tensor, "*lead batch pos k"]:
        """Logits of ``columns`` for every residual vector."""

    def log_normalizer(
        self, resid: Float[Tensor, "*lead batch pos d_model"], cache=None, chunk_size: int = 8192
    ) -> Float[Tensor, "*lead batch pos"]:
        """``logsumexp`` over all output columns, streamed in chunks of ``chunk_size``."""
        total = None
        for start in range(0, self.n_outputs, chunk_size):
            cols = torch.arange(start, min(start + chunk_size, self.n_outputs), device=resid.device)
            batch = resid.shape[-3]
            chunk = self(resid, cols.expand(batch, -1), cache=cache).logsumexp(-1)
            total = chunk if total is None else torch.logaddexp(total, chunk)
        return total


class AffineHead(Head):
    """A head of the form ``normalise(x) @ W[:, columns] + b[columns]``.

    Besides ``__call__`` it exposes its two steps, so that code streaming over the outputs
    (the log-normaliser, the logit lens) normalises once and then multiplies contiguous
    column blocks, with no per-sequence gather of the weight.
    """

    norm: Callable[..., Tensor] | None
    weight_out: Tensor  # [d_model, n_outputs]
    bias_out: Tensor | None  # [n_outputs]
    #: final-logit soft-cap ``c`` (Gemma 2): logits are ``tanh(z / c) · c`` of the affine map ``z``
    softcap: float | None = None

    @property
    def n_outputs(self) -> int:
        return self.weight_out.shape[-1]

    def normalise(self, resid: Float[Tensor, "*lead batch pos d_model"], cache=None) -> Float[Tensor, "*lead batch pos d_model"]:
        """The residual as the head's affine map reads it (after its norm), in float32."""
        resid = resid.float()
        return resid if self.norm is None else self.norm(resid)

    def block(self, normed: Float[Tensor, "... d_model"], start: int, stop: int) -> Float[Tensor, "... n"]:
        """Logits of the contiguous columns ``start:stop`` of already-normalised vectors."""
        out = normed @ self.weight_out[:, start:stop].float()
        return self.cap(out if self.bias_out is None else out + self.bias_out[start:stop].float())

    def cap(self, logits: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        """Apply the head's final-logit soft-cap ``tanh(z / c) · c`` (identity without one).

        Example:
            >>> head = LinearHead(torch.eye(2)); head.softcap = 2.0
            >>> head.cap(torch.tensor([0.0, 100.0]))
            tensor([0., 2.])
        """
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def frozen_scale(self, cache) -> Tensor | None:
        """The divisor read from the cache instead of recomputed (frozen norm), or None."""
        return None

    def __call__(self, resid, columns=None, cache=None):
        if columns is None:
            return self.block(self.normalise(resid, cache), 0, self.n_outputs)
        columns = _check_columns(columns, resid, self.n_outputs)
        picked = self.weight_out.float().T[columns]  # [batch, k, d_model]
        bias = torch.zeros(picked.shape[:2], device=picked.device) if self.bias_out is None else self.bias_out.float()[columns]
        if not isinstance(self.norm, FinalNorm):
            normed = self.normalise(resid, cache)
            return self.cap(torch.einsum("...bpd,bkd->...bpk", normed, picked) + bias[:, None, :])
        # Fold the norm's affine into the picked columns so the normalised residual is never
        # materialised: norm(x)·W_k = (x·(w⊙W_k) − mean·Σ(w⊙W_k)) / divisor + b·W_k.
        resid = resid.float()
        norm = self.norm
        folded = picked if norm.weight is None else picked * norm.weight.float()
        if norm.bias is not None:
            bias = bias + picked @ norm.bias.float()
        out = torch.einsum("...bpd,bkd->...bpk", resid, folded)
        if norm.kind == "none":
            return self.cap(out + bias[:, None, :])
        mean, divisor = norm.moments(resid, self.frozen_scale(cache))
        if mean is not None:
            out = out - mean * folded.sum(-1)[:, None, :]
        return self.cap(out / divisor + bias[:, None, :])

    def log_normalizer(self, resid, cache=None, chunk_size: int = 8192):
        normed = self.normalise(resid, cache)
        total = None
        for start in range(0, self.n_outputs, chunk_size):
            chunk = self.block(normed, start, min(start + chunk_size, self.n_outputs)).logsumexp(-1)
            total = chunk if total is None else torch.logaddexp(total, chunk)
        return total


class UnembedHead(AffineHead):
    """A language model's head-on-top: final norm, then the unembedding ``W_U`` (+ ``b_U``).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge``.
        ln: ``"recompute"`` (default) recomputes the final norm on every vector, as a logit
            lens does: the head is exactly what the model would apply to that vector.
            ``"frozen"`` divides by the scale the final norm applied at the *final* layer
            (read from ``ln_final.hook_scale``), which makes the head linear in the
            residual: the direct-logit-attribution convention.

    A model with final-logit soft-capping (Gemma 2: ``final_logit_softcapping`` in the HF
    config, ``output_logits_soft_cap`` in TransformerLens's) gets ``tanh(z / c) · c`` after
    the affine map, as the model applies it (so even ``ln="frozen"`` is then not linear).
    A model whose head scales its logits in another way (``logit_scale``,
    ``logits_scaling``, ...) is refused: wrap its own head in a :class:`ModuleHead`.

    Example:
        >>> head = mechnorm.UnembedHead(model)                      # doctest: +SKIP
        >>> head(cache["blocks.3.hook_resid_post"], columns=torch.tensor([[42]]))  # doctest: +SKIP
    """

    def __init__(self, model, ln: LnMode = "recompute"):
        if ln not in ("recompute", "frozen"):
            raise ValueError(f"ln must be 'recompute' or 'frozen', got {ln!r}.")
        warn_if_processed(model)
        self.model_name = getattr(model.cfg, "model_name", type(model).__name__)
        self.ln = ln
        self.softcap = _read_softcap(model, self.model_name)
        self.norm = FinalNorm.from_model(model)
        self.weight_out = _detached(model.W_U)
        self.bias_out = _detached(getattr(model, "b_U", None))
        self.hooks = (FINAL_SCALE_HOOK,) if ln == "frozen" and self.norm.kind != "none" else ()

    def normalise(self, resid, cache=None):
        return self.norm(resid.float(), scale=self.frozen_scale(cache))

    def frozen_scale(self, cache):
        if self.ln == "recompute" or self.norm.kind == "none":
            return None
        if cache is None:
            raise ValueError("UnembedHead(ln='frozen') needs the cache: pass cache=... to read ln_final.hook_scale.")
        from .residual import require_hooks

        require_hooks(cache, [FINAL_SCALE_HOOK], "UnembedHead(ln='frozen')")
        return cache[FINAL_SCALE_HOOK].float()

    def __repr__(self) -> str:
        return f"UnembedHead({self.model_name}, ln={self.ln!r}, norm={self.norm.kind}, vocab={self.n_outputs})"


class LinearHead(AffineHead):
    """A classifier or probe head: ``logits = norm(x) @ weight.T + bias``.

    Args:
        weight: ``[n_classes, d_model]``, as ``torch.nn.Linear`` stores it.
        bias: ``[n_classes]`` or None.
        norm: applied to the residual first: a :class:`FinalNorm`, any callable, or None.
        labels: the class names, one per row of ``weight`` (shown for predictions), or None.

    Example:
        >>> probe = LinearHead(torch.randn(2, 64), labels=("negative", "positive"))
        >>> probe.n_outputs, probe.labels
        (2, ('negative', 'positive'))
    """

    def __init__(self, weight: Float[Tensor, "n_classes d_model"], bias=None, norm=None, labels: Sequence[str] | None = None):
        if weight.ndim != 2:
            raise ValueError(f"LinearHead weight must be [n_classes, d_model], got shape {tuple(weight.shape)}.")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"LinearHead bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}.")
        self.weight_out = _detached(weight).T
        self.bias_out = _detached(bias)
        self.norm = norm
        self._set_labels(labels)

    def __repr__(self) -> str:
        return f"LinearHead(n_classes={self.n_outputs}, d_model={self.weight_out.shape[0]})"


class ModuleHead(Head):
    """Any ``torch.nn.Module`` mapping ``[..., d_model]`` to ``[..., n_outputs]``.

    The module computes every output; the chosen columns are then gathered, so use it for
    heads with few outputs (a classifier with a pooler, say), not for a vocabulary.
    ``labels`` names the outputs (a classifier's classes), as for :class:`LinearHead`.

    Example:
        >>> head = mechnorm.ModuleHead(torch.nn.Sequential(pooler, classifier), n_outputs=2)  # doctest: +SKIP
    """

    def __init__(self, module: torch.nn.Module, n_outputs: int, labels: Sequence[str] | None = None):
        self.module = module
        self._n_outputs = int(n_outputs)
        self._set_labels(labels)

    @property
    def n_outputs(self) -> int:
        return self._n_outputs

    def __call__(self, resid, columns=None, cache=None):
        dtype = next(self.module.parameters(), torch.empty(0)).dtype
        out = self.module(resid.to(dtype)).float()
        if columns is None:
            return out
        columns = _check_columns(columns, resid, self.n_outputs)
        index = columns[:, None, :].expand(*out.shape[:-1], columns.shape[-1])
        return out.gather(-1, index)


def _check_columns(columns: Tensor, resid: Tensor, n_outputs: int) -> Tensor:
    columns = torch.as_tensor(columns, device=resid.device, dtype=torch.long)
    if columns.ndim != 2 or columns.shape[0] != resid.shape[-3]:
        raise ValueError(
            f"columns must be [batch, k] with batch={resid.shape[-3]} (the residual's batch axis), "
            f"got shape {tuple(columns.shape)}."
        )
    if columns.numel() and (columns.min() < 0 or columns.max() >= n_outputs):
        raise ValueError(f"Target column out of range: the head has {n_outputs} outputs, got {columns.tolist()}.")
    return columns


def _detached(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


class ProcessedWeightsWarning(UserWarning):
    """The model's weights were processed by TransformerLens, so scores differ from the paper's."""


_WARNED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def weight_processing(model) -> dict[str, bool]:
    """Which TransformerLens weight processing a model shows, read from its weights.

    ``fold_ln``: the norms have no weights left (``LNPre``/``RMSPre``);
    ``center_unembed``: every row of ``W_U`` has mean zero over the vocabulary;
    ``center_writing_weights``: every token embedding has mean zero over ``d_model``.
    """
    norm_type = getattr(model.cfg, "normalization_type", None) or ""
    with torch.no_grad():
        w_u, w_e = model.W_U.float(), model.W_E.float()
        centred_unembed = w_u.mean(-1).abs().max() <= 1e-4 * w_u.abs().mean()
        centred_embed = w_e.mean(-1).abs().max() <= 1e-4 * w_e.abs().mean()
    return {
        "fold_ln": norm_type.endswith("Pre") or _bridge_folded_ln(model),
        "center_unembed": bool(centred_unembed),
        "center_writing_weights": bool(centred_embed),
    }


def _bridge_folded_ln(model) -> bool:
    """A TransformerBridge folds LayerNorm weights into the next layer but keeps its norm
    modules (identity affine) and ``normalization_type``; it records the request instead."""
    adapter = getattr(model, "adapter", None)
    return bool(getattr(model, "_weights_processed", False) and getattr(adapter, "_fold_ln_requested", False))


def warn_if_processed(model) -> None:
    """Warn once per model when TransformerLens weight processing changed the paper's quantities."""
    if model in _WARNED:
        return
    _WARNED.add(model)
    applied = [name for name, on in weight_processing(model).items() if on]
    if applied:
        warn(
            f"This model's weights were processed by TransformerLens ({', '.join(applied)}). "
            "center_unembed shifts every raw logit by a per-position constant and "
            "center_writing_weights centres the embeddings, so LogAt and embedding norms differ "
            "from the paper's definition. Load with mechnorm.load_model(...) (no processing by "
            "default) or HookedTransformer.from_pretrained_no_processing, or use space='logprob', "
            "which processing does not change.",
            ProcessedWeightsWarning,
        )
