"""The logit lens (nostalgebraist, 2020), memory-bounded: what each layer would predict.

Each layer's residual at the positions asked for goes through the model's head-on-top
(final norm recomputed, then ``W_U``), and the full-vocabulary distribution is summarised:
the target's logit, probability and rank, the top-k tokens, the entropy, and the KL
divergence from the final layer's distribution. The vocabulary is streamed in chunks with
online-softmax accumulators, so memory stays at ``[batch, pos, chunk]`` per step and a
``[layer, batch, pos, vocab]`` tensor is never built.

It is a layer-wise readout of the *prediction*, not a token attribution: it returns a
:class:`LensResult`, not an :class:`~mechnorm.result.Attribution`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..heads import FINAL_SCALE_HOOK, AffineHead, Head
from ..residual import INPUT_HOOK, RESID_PATTERNS, at_positions, check_mask, is_post_norm, n_blocks, require_hooks, resid_hook, resolve_layers
from ..result import token_strings
from ..targets import Target, last_positions
from .registry import HookFilter, register

Positions = Literal["prediction", "all"]
_CHUNK_ELEMENTS = 1 << 19  # default chunk: ~2 MB of float32 logits per step, so each pass over it stays in cache
_METRICS = ("target_logit", "target_prob", "target_rank", "entropy", "kl")


@dataclass
class LensResult:
    """What the head reads from every layer, at the positions asked for.

    Tensors are ``[layer, batch, pos]`` (``pos`` indexes the reported positions, whose
    sequence indices are ``positions``); float metrics are NaN, ids and ranks -1 where
    ``mask`` is False (padding).

    Attributes:
        target_logit: the head's logit of the target token.
        target_prob: its softmax probability over the whole vocabulary.
        target_rank: 1 + the number of tokens with a strictly higher logit (1 = top).
        top_ids, top_probs: ``[layer, batch, pos, k]`` the k most probable tokens.
        entropy: of the layer's distribution, in nats.
        kl: ``KL(final ‖ layer)`` in nats (0 at the final layer).
        layers: layer index (blocks applied, 0…L) of each row.
        positions: ``[batch, pos]`` sequence position of each reported column.
        mask: ``[batch, pos]``, False at padding.
        target_ids: ``[batch, pos]`` the token each column explains.
        tokens: input token strings at the reported positions, when known.
        vocab: id -> string for every target and top-k id, when the tokenizer is known.

    Example:
        >>> lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model))   # doctest: +SKIP
        >>> lens.to_frame().query("batch == 0")                              # doctest: +SKIP
    """

    target_logit: Float[Tensor, "layer batch pos"]
    target_prob: Float[Tensor, "layer batch pos"]
    target_rank: Int[Tensor, "layer batch pos"]
    top_ids: Int[Tensor, "layer batch pos k"]
    top_probs: Float[Tensor, "layer batch pos k"]
    entropy: Float[Tensor, "layer batch pos"]
    kl: Float[Tensor, "layer batch pos"]
    layers: tuple[int, ...]
    positions: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    target_ids: Int[Tensor, "batch pos"]
    tokens: list[list[str]] | None = None
    vocab: dict[int, str] | None = None
    method: str = "logit_lens"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(int(layer) for layer in self.layers)
        shape = (len(self.layers), *self.mask.shape)
        for name in _METRICS:
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must be [layer, batch, pos] = {shape}, got {tuple(getattr(self, name).shape)}.")
        for name in ("top_ids", "top_probs"):
            value = getattr(self, name)
            if value.ndim != 4 or tuple(value.shape[:3]) != shape:
                raise ValueError(f"{name} must be [layer, batch, pos, k] with [layer, batch, pos] = {shape}, "
                                 f"got {tuple(value.shape)}.")
        for name in ("positions", "target_ids"):
            got = tuple(getattr(self, name).shape)
            if got != tuple(self.mask.shape):
                raise ValueError(f"{name} must be [batch, pos] = {tuple(self.mask.shape)}, got {got}.")
        if self.tokens is not None and [len(t) for t in self.tokens] != [shape[2]] * shape[1]:
            raise ValueError("tokens must hold one string per reported position for every sequence.")
        self.mask = self.mask.bool()
        pad = ~self.mask
        for name in ("target_logit", "target_prob", "entropy", "kl"):
            setattr(self, name, getattr(self, name).float().masked_fill(pad, float("nan")))
        self.top_probs = self.top_probs.float().masked_fill(pad[..., None], float("nan"))
        self.target_rank = self.target_rank.long().masked_fill(pad, -1)
        self.top_ids = self.top_ids.long().masked_fill(pad[..., None], -1)
        self.target_ids = self.target_ids.long().masked_fill(pad, -1)

    @property
    def k(self) -> int:
        """Number of top tokens kept per layer and position."""
        return self.top_ids.shape[-1]

    def row(self, metric: str, layer: int = -1) -> Tensor:
        """One metric (e.g. ``"kl"``) at one layer (an index from ``layers``, or -1 for the last)."""
        if metric not in (*_METRICS, "top_ids", "top_probs"):
            raise ValueError(f"Unknown metric {metric!r}; choose from {(*_METRICS, 'top_ids', 'top_probs')}.")
        if layer != -1 and layer not in self.layers:
            raise ValueError(f"Layer {layer} was not computed; this result has layers {self.layers}.")
        return getattr(self, metric)[-1 if layer == -1 else self.layers.index(layer)]

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (layer, sequence, real reported position).

        Columns: method, layer, batch, pos, token, target, target_logit, target_prob,
        target_rank, entropy, kl, then ``top1``…``topk`` (strings when known, else ids) and
        ``top1_prob``…``topk_prob``.
        """
        index = self.mask.nonzero()  # [n_real, 2]
        b, p = index[:, 0], index[:, 1]
        seq_pos = self.positions[b, p]
        frames = []
        for row, layer in enumerate(self.layers):
            columns = {
                "method": self.method,
                "layer": layer,
                "batch": b.numpy(),
                "pos": seq_pos.numpy(),
                "token": [self.tokens[i][j] if self.tokens else str(s) for i, j, s in zip(b.tolist(), p.tolist(), seq_pos.tolist())],
                "target": self._names(self.target_ids[b, p]),
            }
            for metric in _METRICS:
                columns[metric] = getattr(self, metric)[row, b, p].numpy()
            for j in range(self.k):
                columns[f"top{j + 1}"] = self._names(self.top_ids[row, b, p, j])
            for j in range(self.k):
                columns[f"top{j + 1}_prob"] = self.top_probs[row, b, p, j].numpy()
            frames.append(pd.DataFrame(columns))
        return pd.concat(frames, ignore_index=True)

    def _names(self, ids: Tensor) -> list:
        return [self.vocab.get(i, str(i)) for i in ids.tolist()] if self.vocab else ids.tolist()

    def __repr__(self) -> str:
        return (
            f"LensResult(layers={self.layers[0]}…{self.layers[-1]} ({len(self.layers)} rows), "
            f"batch={self.mask.shape[0]}, pos={self.mask.shape[1]}, k={self.k})"
        )


@register(
    "logit_lens",
    "Layer-wise readout, not a token attribution: each layer's prediction through the head "
    "(target logit/prob/rank, top-k, entropy, KL from the final layer); returns a LensResult.",
    HookFilter(frozenset({INPUT_HOOK, FINAL_SCALE_HOOK}), RESID_PATTERNS),
    layerwise=True,
)
@torch.inference_mode()
def logit_lens(
    cache,
    head: Head,
    target: Target | None = None,
    positions: Positions = "prediction",
    top_k: int = 5,
    attention_mask=None,
    layers: int | Sequence[int] | None = None,
    tokens=None,
    tokenizer=None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LensResult:
    """The logit lens at every layer, streamed over the vocabulary in chunks.

    Args:
        cache: an ``ActivationCache`` with the residual hooks (``mechnorm.hooks_for("logit_lens")``).
        head: the head-on-top, e.g. ``mechnorm.UnembedHead(model)`` (final norm recomputed
            on each layer's residual: the classic logit lens).
        target: the token to follow, one per sequence (``token_target``, ``predicted``);
            by default the final layer's own argmax at each reported position. A contrast
            is not supported: follow the two tokens separately.
        positions: ``"prediction"`` — each sequence's prediction position (``target.positions``
            when set, else its last real token); ``"all"`` — every position.
        top_k: how many of the most probable tokens to keep.
        attention_mask: ``[batch, pos]``, False at padding.
        layers: None for all layers 0…L, an int or a list; negatives count from L.
        tokens: ``[batch, pos]`` ids, to label the reported positions.
        tokenizer: to name the top-k tokens; defaults to the cache's model's tokenizer.
        chunk_size: vocabulary columns per step; by default sized to keep each step at
            about 2 MB of logits.
        dtype: the precision of the unembedding matmul. ``torch.bfloat16`` roughly halves the
            time on hardware with bf16 units (recent x86 CPUs, GPUs) at about 1e-2 error in
            each logit; the sums over the vocabulary stay in float32. The float32 default is
            exact to rounding.

    Returns:
        A :class:`LensResult`.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("logit_lens"))  # doctest: +SKIP
        >>> lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all")  # doctest: +SKIP
        >>> lens.row("target_rank")                                                          # doctest: +SKIP
    """
    if positions not in ("prediction", "all"):
        raise ValueError(f"positions must be 'prediction' or 'all', got {positions!r}.")
    if target is not None and not isinstance(target, Target):
        raise TypeError(f"target must be a mechnorm Target (token_target, predicted) or None, got {type(target).__name__}.")
    if target is not None and target.is_contrast:
        raise ValueError("logit_lens follows one token; a contrast target is not supported. Pass token_target(...) per token.")
    n_layers = n_blocks(cache)
    layer_ids = resolve_layers(layers, n_layers)
    post_norm = is_post_norm(cache)
    require_hooks(cache, [resid_hook(layer, post_norm) for layer in sorted({*layer_ids, n_layers})], "logit_lens")
    batch, pos = cache[resid_hook(n_layers, post_norm)].shape[:2]
    device = cache[resid_hook(n_layers, post_norm)].device
    seq_mask = check_mask(attention_mask, batch, pos, device=device)
    if not 1 <= top_k <= head.n_outputs:
        raise ValueError(f"top_k must be between 1 and the head's {head.n_outputs} outputs, got {top_k}.")

    if positions == "all":
        index = torch.arange(pos, device=device).expand(batch, pos)
        mask = seq_mask
    else:
        pred = last_positions(seq_mask) if target is None else target.prediction_positions(seq_mask)
        index, mask = pred.to(device)[:, None], torch.ones(batch, 1, dtype=torch.bool, device=device)
    readout = _Readout(head, cache, index, dtype)
    width = index.shape[1]
    rows = batch * width
    if chunk_size is None:
        chunk_size = max(256, _CHUNK_ELEMENTS // rows)
    chunks = [(start, min(start + chunk_size, head.n_outputs)) for start in range(0, head.n_outputs, chunk_size)]
    if target is None:
        target_ids = readout.argmax(n_layers, chunks)  # [R]
    else:
        target.check(head.n_outputs, batch)
        target_ids = target.to(device).columns(batch)[:, :1].expand(batch, width).reshape(-1)

    # One pass over the vocabulary: each chunk's weights are prepared once and read by every
    # layer; the final layer goes first so the others can fold its probabilities into the KL.
    streams = {layer: _Stream(top_k, target_ids, readout.at(layer, target_ids)) for layer in sorted({*layer_ids, n_layers})}
    for start, stop in chunks:
        weights = readout.weights(start, stop)
        final_weights = streams[n_layers].update(readout.chunk(n_layers, weights), start)
        for layer, stream in streams.items():
            if layer != n_layers:
                stream.update(readout.chunk(layer, weights), start, final_weights)
    final = streams[n_layers]
    final.cross = final.sum_exp_logit

    def stack(values) -> Tensor:  # [R, *] per layer -> [layer, batch, pos, *]
        return torch.stack(list(values)).unflatten(1, (batch, width))

    picked = [streams[layer] for layer in layer_ids]
    log_z = stack(s.log_z() for s in picked)
    target_logit = stack(s.target_logit for s in picked)
    top_ids = stack(s.top_ids for s in picked)
    entropy = log_z - stack(s.sum_exp_logit / s.sum_exp for s in picked)
    # KL(final ‖ layer) = Σ p_f·f − logZ_f − (Σ p_f·g − logZ_g), with p_f = exp(f − max_f) / sum_exp_f
    kl = stack((final.sum_exp_logit - s.cross) / final.sum_exp - final.log_z() for s in picked) + log_z
    target_ids = target_ids.view(batch, width)

    if tokenizer is None:
        tokenizer = getattr(getattr(cache, "model", None), "tokenizer", None)
    strings = token_strings(tokenizer, None if tokens is None else torch.as_tensor(tokens).to(device).gather(1, index).cpu())
    vocab = None
    if tokenizer is not None:
        vocab = {i: tokenizer.decode([i]) for i in torch.cat([top_ids.flatten(), target_ids.flatten()]).unique().tolist()}
    return LensResult(
        target_logit=target_logit.cpu(),
        target_prob=torch.exp(target_logit - log_z).cpu(),
        target_rank=(stack(s.above for s in picked) + 1).cpu(),
        top_ids=top_ids.cpu(),
        top_probs=torch.exp(stack(s.top_values for s in picked) - log_z[..., None]).cpu(),
        entropy=entropy.cpu(),
        kl=kl.cpu(),
        layers=tuple(layer_ids),
        positions=index.cpu(),
        mask=mask.cpu(),
        target_ids=target_ids.cpu(),
        tokens=strings,
        vocab=vocab,
        metadata={"head": repr(head), "positions": positions, "target": "final prediction" if target is None else "given"},
    )


class _Readout:
    """Head logits of the residuals at the reported positions, one vocabulary slice at a time.

    Rows are the reported (sequence, position) pairs, flattened: ``R = batch · pos``. An
    affine head (``UnembedHead``, ``LinearHead``) is normalised once per layer, and each
    vocabulary slice of its weight is copied to a contiguous block once and shared by every
    layer (a strided slice of ``W_U`` makes the matmul several times slower); any other head
    is evaluated in full (it has few outputs).
    """

    def __init__(self, head: Head, cache, index: Int[Tensor, "batch pos"], dtype: torch.dtype = torch.float32):
        self.head, self.cache, self.index, self.dtype = head, cache, index, dtype
        self.affine = isinstance(head, AffineHead)
        self._inputs: dict = {}  # layer -> float32 rows; (layer, dtype) -> the rows in ``dtype``

    def _input(self, layer: int) -> Float[Tensor, "R d"]:
        """The normalised residual (affine head) or all outputs (other heads) of each row."""
        if layer not in self._inputs:
            resid = self.cache[resid_hook(layer, is_post_norm(self.cache))].float()
            # normalise before gathering positions: a frozen norm reads per-position scales
            out = self.head.normalise(resid, self.cache) if self.affine else self.head(resid, None, cache=self.cache)
            self._inputs[layer] = at_positions(out, self.index).flatten(0, 1)
        return self._inputs[layer]

    def weights(self, start: int, stop: int) -> tuple:
        """What :meth:`chunk` needs for columns ``start:stop``: (weight block, bias) or the bounds."""
        if not self.affine:
            return start, stop
        bias = self.head.bias_out
        block = self.head.weight_out[:, start:stop].to(self.dtype).contiguous()
        return block, None if bias is None else bias[start:stop].float()

    def chunk(self, layer: int, weights: tuple) -> Float[Tensor, "R chunk"]:
        """Float32 logits of the columns ``weights`` was prepared for."""
        if not self.affine:
            start, stop = weights
            return self._input(layer)[:, start:stop].contiguous()
        block, bias = weights
        if self.dtype != torch.float32:
            if (layer, self.dtype) not in self._inputs:
                self._inputs[layer, self.dtype] = self._input(layer).to(self.dtype)
            out = (self._inputs[layer, self.dtype] @ block).float()
            return self.head.cap(out if bias is None else out.add_(bias))
        x = self._input(layer)
        # a soft-capped head (Gemma 2) caps after the affine map
        return self.head.cap(x @ block if bias is None else torch.addmm(bias, x, block))

    def at(self, layer: int, ids: Int[Tensor, " R"]) -> Float[Tensor, " R"]:
        """The logit of column ``ids[r]`` at row r, in float32."""
        x = self._input(layer)
        if not self.affine:
            return x.gather(-1, ids[:, None])[:, 0]
        out = torch.linalg.vecdot(x, self.head.weight_out.T[ids].float())
        bias = self.head.bias_out
        return self.head.cap(out if bias is None else out + bias.float()[ids])

    def argmax(self, layer: int, chunks: list[tuple[int, int]]) -> Int[Tensor, " R"]:
        """Each row's most likely column at ``layer`` (first of ties), streamed over ``chunks``."""
        best = best_ids = None
        for start, stop in chunks:
            values, ids = self.chunk(layer, self.weights(start, stop)).max(-1)
            if best is None:
                best, best_ids = values, ids
                continue
            better = values > best
            best = torch.where(better, values, best)
            best_ids = torch.where(better, ids + start, best_ids)
        return best_ids


class _Stream:
    """Running sums over vocabulary chunks for one layer's rows, kept relative to a running max.

    ``sum_exp = Σ exp(g − max)`` and ``sum_exp_logit = Σ exp(g − max)·g`` give the
    log-normaliser and the entropy; ``cross = Σ exp(f − max_f)·g`` (f: the final layer's
    logits at the same row, rescaled as its max moves) gives the KL divergence from the
    final layer; ``above`` counts tokens whose logit beats the target's; the top-k is merged
    chunk by chunk. The top-k merge and the rank count only touch the rows whose chunk
    maximum can change them: after the first chunks that is few rows, and this bookkeeping,
    not the matmul, is where a careless version spends its time.
    """

    def __init__(self, k: int, target_ids: Int[Tensor, " R"], target_logit: Float[Tensor, " R"]):
        rows, device = len(target_ids), target_logit.device
        self.max = torch.full((rows,), float("-inf"), device=device)
        self.sum_exp, self.sum_exp_logit, self.cross = (torch.zeros(rows, device=device) for _ in range(3))
        self.above = torch.zeros(rows, dtype=torch.int32, device=device)
        self.target_ids, self.target_logit = target_ids, target_logit
        self.top_values = torch.full((rows, k), float("-inf"), device=device)
        self.top_ids = torch.zeros(rows, k, dtype=torch.long, device=device)

    def update(self, logits: Float[Tensor, "R chunk"], start: int, final: tuple[Tensor, Tensor] | None = None):
        """Fold in the logits of columns ``start:start + chunk``.

        ``final`` is what the final layer's stream returned for the same chunk; the return
        value — this chunk's ``exp(g − max)`` and the factor that rescaled earlier sums — is
        that pair for this stream.
        """
        chunk_max = logits.amax(-1)
        new_max = torch.maximum(self.max, chunk_max)
        rescale = torch.exp(self.max - new_max)
        weights = torch.sub(logits, new_max[:, None]).exp_()
        self.sum_exp = self.sum_exp * rescale + weights.sum(-1)
        self.sum_exp_logit = self.sum_exp_logit * rescale + _dot(weights, logits)
        self.max = new_max
        if final is not None:
            final_weights, final_rescale = final
            self.cross = self.cross * final_rescale + _dot(final_weights, logits)
        self._merge_top(logits, chunk_max, start)
        self._count_above(logits, chunk_max, start)
        return weights, rescale

    def _merge_top(self, logits: Tensor, chunk_max: Tensor, start: int) -> None:
        rows = _rows_where(chunk_max > self.top_values[:, -1])
        if rows is None:
            return
        k = self.top_values.shape[-1]
        values, ids = _take(logits, rows).topk(min(k, logits.shape[-1]), dim=-1)
        merged, order = torch.cat([_take(self.top_values, rows), values], -1).topk(k, dim=-1)
        merged_ids = torch.cat([_take(self.top_ids, rows), ids + start], -1).gather(-1, order)
        if rows is _ALL:
            self.top_values, self.top_ids = merged, merged_ids
        else:
            self.top_values[rows], self.top_ids[rows] = merged, merged_ids

    def _count_above(self, logits: Tensor, chunk_max: Tensor, start: int) -> None:
        rows = _rows_where(chunk_max > self.target_logit, dense=0.5)
        if rows is None:
            return
        sub, value = _take(logits, rows), _take(self.target_logit, rows)[:, None]
        count = (sub > value).sum(-1, dtype=torch.int32)
        # the target's own column is not "above" itself, whatever its last bit says
        local = _take(self.target_ids, rows) - start
        inside = (local >= 0) & (local < logits.shape[-1])
        own = sub.gather(-1, local.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
        count -= (inside & (own > value[:, 0])).int()
        if rows is _ALL:
            self.above += count
        else:
            self.above.index_add_(0, rows, count)

    def log_z(self) -> Tensor:
        """``logsumexp`` of all logits seen."""
        return self.max + self.sum_exp.log()


_ALL = slice(None)


def _rows_where(selected: Bool[Tensor, " row"], dense: float = 1.0):
    """The rows to touch: None for none, ``_ALL`` when more than a ``dense`` share is selected
    (rows not selected are left unchanged by the update anyway, so computing every row costs
    less than indexing them out), else their indices."""
    count = int(selected.sum())
    if count == 0:
        return None
    return _ALL if count >= dense * len(selected) else selected.nonzero()[:, 0]


def _take(values: Tensor, rows) -> Tensor:
    return values if rows is _ALL else values[rows]


def _dot(a: Float[Tensor, "row n"], b: Float[Tensor, "row n"]) -> Float[Tensor, " row"]:
    """Row-wise dot product (faster on CPU than a batched [1, n] × [n, 1] matmul)."""
    return torch.linalg.vecdot(a, b)
