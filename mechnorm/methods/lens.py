"""The logit lens (nostalgebraist, 2020), memory-bounded: what each layer would predict.

Each layer's residual at the positions asked for goes through the model's head-on-top
(final norm recomputed, then ``W_U``), and the full-vocabulary distribution is summarised:
the target's logit, probability and rank, the top-k tokens, the entropy, and the KL
divergence from the final layer's distribution. The vocabulary is streamed in chunks with
online-softmax accumulators, so memory stays at ``[layer · batch · pos, chunk]`` per step and
a ``[layer, batch, pos, vocab]`` tensor is never built (the engine: :mod:`.lens_stream`).

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

from ..heads import FINAL_SCALE_HOOK, Head
from ..residual import INPUT_HOOK, RESID_PATTERNS, check_mask, is_post_norm, n_blocks, require_hooks, resid_hook, resolve_layers
from ..result import token_strings
from ..targets import Target, last_positions
from .arguments import prepare
from .lens_fused import use_fused
from .lens_stream import Readout, Stream, default_chunk
from .registry import HookFilter, register
from ..persist import ResultIO

Positions = Literal["prediction", "all"]
_METRICS = ("target_logit", "target_prob", "target_rank", "entropy", "kl")


@dataclass
class LensResult(ResultIO):
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

    def plot(self, **kwargs):
        """Layers × positions heatmap (:func:`mechnorm.plot.lens_heatmap`; keywords go there).

        Example:
            >>> lens.plot(value="target_rank")                              # doctest: +SKIP
        """
        from ..plot import lens_heatmap

        return lens_heatmap(self, **kwargs)



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
    head: Head | None = None,
    target: Target | int | str | Sequence | None = None,
    positions: Positions = "prediction",
    top_k: int = 5,
    attention_mask=None,
    layers: int | Sequence[int] | None = None,
    tokens=None,
    tokenizer=None,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    fused: bool | None = None,
) -> LensResult:
    """The logit lens at every layer, streamed over the vocabulary in chunks.

    Args:
        cache: an ``ActivationCache`` with the residual hooks (``mechnorm.hooks_for("logit_lens")``).
        head: the head-on-top, e.g. ``mechnorm.UnembedHead(model)`` (final norm recomputed
            on each layer's residual: the classic logit lens).
        target: the token to follow, one per sequence (``token_target``, ``predicted``);
            by default the final layer's own argmax at each reported position (the final
            layer's logits are then computed first and, with the head's weight blocks, kept
            for the other layers' pass up to 512 MB, so this costs no extra unembedding). A contrast
            is not supported: follow the two tokens separately.
        positions: ``"prediction"`` — each sequence's prediction position (``target.positions``
            when set, else its last real token); ``"all"`` — every position.
        top_k: how many of the most probable tokens to keep.
        attention_mask: ``[batch, pos]``, False at padding.
        layers: None for all layers 0…L, an int or a list; negatives count from L.
        tokens: ``[batch, pos]`` ids, to label the reported positions.
        tokenizer: to name the top-k tokens; defaults to the cache's model's tokenizer.
        chunk_size: vocabulary columns per step (all layers are read together at each step);
            by default sized to keep each step at about 16 MB of float32 logits on a CPU
            (128 MB on a GPU).
        dtype: the precision of the unembedding matmul. ``torch.bfloat16`` roughly halves the
            time on hardware with bf16 units (recent x86 CPUs, GPUs) at about 1e-2 error in
            each logit; the sums over the vocabulary stay in float32. The float32 default is
            exact to rounding.
        fused: run the sums over each vocabulary chunk (normaliser, entropy, KL, rank, top-k
            candidates) as one kernel compiled by ``torch.compile`` instead of a dozen eager
            passes, which on a CPU cost as much as a bf16 matmul. None (default): fused for
            large lenses on a CPU (at least 2^28 logits in all: the kernel's first build takes
            a few seconds), eager otherwise and on GPUs (not measured there; True opts in). Both give the same numbers to float32 rounding; where
            ``torch.compile`` cannot build the kernel, the lens warns once and runs eagerly.

    Returns:
        A :class:`LensResult`.

    Example:
        >>> logits, cache = model.run_with_cache(tokens, names_filter=mechnorm.hooks_for("logit_lens"))  # doctest: +SKIP
        >>> lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), positions="all")  # doctest: +SKIP
        >>> lens.row("target_rank")                                                          # doctest: +SKIP
    """
    cache, head, target, attention_mask, tokens = prepare(cache, head, target, attention_mask, tokens, need_target=False)
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
    width = index.shape[1]
    streamed = sorted({*layer_ids, n_layers})  # the final layer last: the KL reads its rows
    readout = Readout(head, cache, index, streamed, dtype, real=seq_mask)

    def split(size: int) -> list[tuple[int, int]]:
        return [(start, min(start + size, head.n_outputs)) for start in range(0, head.n_outputs, size)]

    chunks = split(chunk_size or default_chunk(len(streamed) * batch * width, device))
    fused = use_fused(fused, readout.rows * len(streamed), head.n_outputs, device)
    if target is None:  # the final layer first, over the same chunks: kept for the main pass where it fits
        target_ids = readout.argmax(chunks, raw=fused)  # [R]
    else:
        target.check(head.n_outputs, batch)
        target_ids = target.to(device).columns(batch)[:, :1].expand(batch, width).reshape(-1)

    # One pass over the vocabulary: each chunk's weight block is prepared once and multiplied
    # with every layer's rows at once; the sums for all layers are taken together.
    stream = Stream(top_k, len(streamed), target_ids, readout.at(target_ids), fused=fused)
    for start, stop in chunks:
        stream.update(readout.chunk(start, stop, raw=fused), start)
    picked = torch.tensor([streamed.index(layer) for layer in layer_ids], device=device)

    def stack(values: Tensor) -> Tensor:  # [N, *] stacked rows -> [layer, batch, pos, *] for layer_ids
        return stream.grouped(values)[picked].unflatten(1, (batch, width))

    log_z_all = stream.log_z()
    log_z = stack(log_z_all)
    target_logit = stack(stream.target_logit)
    top_ids = stack(stream.top_ids)
    entropy = log_z - stack(stream.sum_exp_logit / stream.sum_exp)
    # KL(final ‖ layer) = Σ p_f·f − logZ_f − (Σ p_f·g − logZ_g), with p_f = exp(f − max_f) / sum_exp_f
    final = slice(-batch * width, None)
    final_term = (stream.sum_exp_logit[final] / stream.sum_exp[final] - log_z_all[final]).repeat(len(streamed))
    kl = stack(final_term - stream.cross / stream.sum_exp[final].repeat(len(streamed))) + log_z
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
        target_rank=(stack(stream.above) + 1).cpu(),
        top_ids=top_ids.cpu(),
        top_probs=torch.exp(stack(stream.top_values) - log_z[..., None]).cpu(),
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
