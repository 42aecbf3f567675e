"""The logit lens's engine: every layer's head logits, streamed over the vocabulary in one pass.

The rows of every layer asked for are stacked into one ``[N, d] = [layers · R, d]`` matrix
(``R`` = reported positions, the final layer last), so each vocabulary chunk costs one
matmul of that matrix with a contiguous block of ``W_U`` and one set of whole-chunk
reductions for every layer at once. The bookkeeping per chunk is a fixed number of passes
over the ``[N, chunk]`` logits (block maxima, ``exp``, two products, a comparison); the
top-k reads only the ``k`` blocks whose maxima lead (the k largest entries of a chunk lie in
the k blocks with the largest maxima), so no full ``topk`` pass runs. On large lenses those
passes run as one compiled kernel (:mod:`~mechnorm.methods.lens_fused`). With the default
target, the final layer's rows go first (for their argmax) and are kept for the main pass.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..heads import AffineHead, Head
from ..residual import at_positions, is_post_norm, require_finite, resid_hook
from .lens_fused import BLOCK as _BLOCK
from .lens_fused import fused_chunk_sums

#: default elements per chunk of logits, all layers together: ~16 MB of float32 on CPU (stays
#: in the last-level cache across the passes), 128 MB on a GPU (fewer, larger kernels)
_STEP_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 25}
#: the final layer's logits and the prepared weight blocks of the default target's argmax pass
#: are kept for the main pass (instead of computed again) up to this size in all
KEEP_FINAL_BYTES = 1 << 29


def default_chunk(n_rows: int, device: torch.device) -> int:
    """Vocabulary columns per chunk for ``n_rows`` stacked rows: a multiple of the top-k block.

    Example:
        >>> default_chunk(13 * 1024, "cpu")  # GPT-2-small's 13 layers x 1024 positions
        304
    """
    budget = _STEP_ELEMENTS.get(torch.device(device).type, _STEP_ELEMENTS["cpu"])
    return max(256, budget // max(n_rows, 1) // _BLOCK * _BLOCK)


class Readout:
    """Head logits of the stacked rows ``[layers · R]``, one vocabulary slice at a time.

    Rows are the reported (sequence, position) pairs, flattened (``R = batch · pos``), layer by
    layer in the order of ``layers`` (the final layer last). An affine head (``UnembedHead``,
    ``LinearHead``) is normalised once per layer and each vocabulary slice of its weight is
    copied to a contiguous block once (a strided slice of ``W_U`` makes the matmul several
    times slower), in the matmul ``dtype``; any other head is evaluated in full (few outputs).
    Everything runs on the device of the final layer's residual.

    Example:
        >>> readout = Readout(head, cache, index, layers=[0, 12], dtype=torch.bfloat16)  # doctest: +SKIP
        >>> readout.chunk(0, 512).shape  # [2 · R, 512]                # doctest: +SKIP
    """

    def __init__(self, head: Head, cache, index: Int[Tensor, "batch pos"], layers: list[int],
                 dtype: torch.dtype = torch.float32, real: Bool[Tensor, "batch pos"] | None = None):
        self.head, self.cache, self.index, self.layers, self.dtype, self.real = head, cache, index, list(layers), dtype, real
        self.affine = isinstance(head, AffineHead)
        self.rows = index.numel()
        self.device = index.device
        self._all: Tensor | None = None  # [N, d] float32 (affine: normalised; else all outputs)
        self._matmul: Tensor | None = None  # the same rows in the matmul dtype
        self._final: dict[int, Tensor] = {}  # chunk start -> the final layer's logits there, computed ahead
        self._blocks: dict[int, tuple] = {}  # chunk start -> its prepared weights, kept with them
        bias = head.bias_out if self.affine else None
        # an all-zero bias (TransformerLens's b_U of a model without one) costs a pass per chunk: dropped
        self.bias = None if bias is None or not bool(bias.any()) else bias.to(self.device, torch.float32)

    def _input(self, layer: int) -> Float[Tensor, "R d"]:
        """The normalised residual (affine head) or all outputs (other heads) of each row."""
        hook = resid_hook(layer, is_post_norm(self.cache))
        resid = require_finite(self.cache[hook], hook, self.real).float()  # NaN/inf: a clear error
        # normalise before gathering positions: a frozen norm reads per-position scales
        out = self.head.normalise(resid, self.cache) if self.affine else self.head(resid, None, cache=self.cache)
        return at_positions(out, self.index.to(out.device)).flatten(0, 1).to(self.device)

    def stacked(self) -> Float[Tensor, "N d"]:
        """Every layer's rows, float32, stacked (computed once)."""
        if self._all is None:
            self._all = torch.cat([self._input(layer) for layer in self.layers])
        return self._all

    def weights(self, start: int, stop: int) -> tuple:
        """What :meth:`chunk` needs for columns ``start:stop``: (weight block, bias) or the bounds."""
        if not self.affine:
            return start, stop
        if start in self._blocks:  # prepared by argmax's pass for this one
            return self._blocks[start]
        block = self.head.weight_out[:, start:stop].to(self.device, self.dtype).contiguous()
        return block, None if self.bias is None else self.bias[start:stop]

    def chunk(self, start: int, stop: int, final_only: bool = False, raw: bool = False) -> Float[Tensor, "N chunk"]:
        """Float32 logits of columns ``start:stop``, every row (or the final layer's).

        A low-precision product is converted once: every later pass reads float32 (a mixed-dtype
        op would cast the chunk again on each pass). With ``raw``, a product that nothing is
        applied to afterwards (no bias, no soft-cap) comes back in the matmul dtype, for a
        reader that converts as it goes (the fused kernel, a max). The final layer's rows come
        from :meth:`argmax`'s pass where it kept them."""
        if not self.affine:
            x = self.stacked()
            return (x[-self.rows:] if final_only else x)[:, start:stop].clone()
        if self._matmul is None:
            self._matmul = self.stacked().to(self.dtype)
        kept = None if final_only else self._final.pop(start, None)
        if kept is None:
            return self._product(self._matmul[-self.rows:] if final_only else self._matmul, start, stop, raw)
        if self._plain(raw):  # the other layers' product written straight next to the kept rows
            out = torch.empty(len(self._matmul), stop - start, dtype=kept.dtype, device=self.device)
            torch.mm(self._matmul[:-self.rows], self.weights(start, stop)[0], out=out[:-self.rows])
            out[-self.rows:] = kept
        else:
            out = torch.cat([self._product(self._matmul[:-self.rows], start, stop, raw), kept])
        del self._blocks[start]  # read by both passes; not needed again
        return out

    def _plain(self, raw: bool) -> bool:
        """Whether a chunk is the matmul's output as it is (nothing added, converted or capped)."""
        return self.bias is None and self.head.softcap is None and (raw or self.dtype == torch.float32)

    def _product(self, x: Tensor, start: int, stop: int, raw: bool) -> Tensor:
        block, bias = self.weights(start, stop)
        if self.dtype == torch.float32:
            out = x @ block if bias is None else torch.addmm(bias, x, block)
        else:  # a bias is added in float32, after the product's rounding to dtype
            out = x @ block
            if self._plain(raw):
                return out
            out = out.float()
            out = out if bias is None else out.add_(bias)
        return self.head.cap(out)  # a soft-capped head (Gemma 2) caps after the affine map

    def at(self, ids: Int[Tensor, " R"]) -> Float[Tensor, " N"]:
        """The float32 logit of column ``ids[r]`` at row r of every layer."""
        x = self.stacked()
        ids = ids.repeat(len(self.layers))
        if not self.affine:
            return x.gather(-1, ids[:, None])[:, 0]
        out = torch.linalg.vecdot(x, self.head.weight_out.T[ids.to(self.head.weight_out.device)].to(self.device, torch.float32))
        bias = self.head.bias_out
        return self.head.cap(out if bias is None else out + bias.to(self.device, torch.float32)[ids])

    def argmax(self, chunks: list[tuple[int, int]], raw: bool = False) -> Int[Tensor, " R"]:
        """Each row's most likely column at the final layer (first of ties), streamed over ``chunks``.

        Where the final layer's logits fit in :data:`KEEP_FINAL_BYTES` (affine heads), each
        chunk is kept, as :meth:`chunk` with ``raw`` returns it, with its prepared weight block,
        for the main pass over the same ``chunks``: the lens with the default target then
        costs no extra unembedding."""
        keep = False  # other heads' outputs are all at hand anyway
        if self.affine:
            itemsize = self.dtype.itemsize if self._plain(raw) else 4  # a converted chunk is float32
            keep = (self.rows * itemsize + self.head.weight_out.shape[0] * self.dtype.itemsize) * self.head.n_outputs \
                <= KEEP_FINAL_BYTES
        best = best_ids = None
        for start, stop in chunks:
            if keep:
                self._blocks[start] = self.weights(start, stop)
            logits = self.chunk(start, stop, final_only=True, raw=raw or not keep)
            if keep:
                self._final[start] = logits
            values, ids = logits.max(-1)
            values = values.float()
            if best is None:
                best, best_ids = values, ids
                continue
            better = values > best
            best = torch.where(better, values, best)
            best_ids = torch.where(better, ids + start, best_ids)
        return best_ids


class Stream:
    """Running sums over vocabulary chunks for the stacked rows, kept relative to a running max.

    ``sum_exp = Σ exp(g − max)`` and ``sum_exp_logit = Σ exp(g − max)·g`` give the
    log-normaliser and the entropy; ``cross = Σ exp(f − max_f)·g`` (f: the final layer's
    logits at the same position, the last group of rows) gives the KL divergence from the
    final layer; ``above`` counts tokens whose logit beats the target's; the top-k is merged
    chunk by chunk. The top-k merge and the rank count only touch the rows whose chunk
    maximum can change them.

    Example:
        >>> stream = Stream(5, n_groups=2, target_ids=ids, target_logit=readout.at(ids))  # doctest: +SKIP
        >>> stream.update(readout.chunk(0, 512), start=0)               # doctest: +SKIP
    """

    def __init__(self, k: int, n_groups: int, target_ids: Int[Tensor, " R"], target_logit: Float[Tensor, " N"],
                 fused: bool = False):
        rows, device = len(target_logit), target_logit.device
        self.fused = fused
        self.n_groups, self.group = n_groups, rows // n_groups
        self.max = torch.full((rows,), float("-inf"), device=device)
        self.sum_exp, self.sum_exp_logit, self.cross = (torch.zeros(rows, device=device) for _ in range(3))
        self.above = torch.zeros(rows, dtype=torch.int32, device=device)
        self.target_ids, self.target_logit = target_ids.repeat(n_groups), target_logit
        self.top_values = torch.full((rows, k), float("-inf"), device=device)
        self.top_ids = torch.zeros(rows, k, dtype=torch.long, device=device)

    def update(self, logits: Float[Tensor, "N chunk"], start: int) -> None:
        """Fold in the logits of columns ``start:start + chunk`` (left unchanged; any float dtype,
        read as float32): through the compiled kernel when ``fused`` and the chunk splits into
        blocks, else eagerly."""
        width, k = logits.shape[-1], self.top_values.shape[-1]
        blocked = width % _BLOCK == 0 and width // _BLOCK > k
        sums = None
        if self.fused and blocked:
            running = (self.max, self.sum_exp, self.sum_exp_logit, self.cross)
            sums = fused_chunk_sums(logits, running, self.target_logit, self.n_groups)
        if sums is None:
            return self._update_eager(logits.float(), start, blocked)
        block_max, chunk_max, new_max, self.sum_exp, self.sum_exp_logit, self.cross, above = sums
        self._merge_top(logits, block_max, chunk_max, start)
        self.above += above - self._own_above(logits, _ALL, start)
        self.max = new_max

    def _update_eager(self, logits: Float[Tensor, "N chunk"], start: int, blocked: bool) -> None:
        """:meth:`update` in a fixed number of whole-chunk passes (in place where it can)."""
        block_max = None
        width = logits.shape[-1]
        if blocked:  # block j: columns j, j + nb, j + 2·nb, …
            block_max = logits.view(len(logits), _BLOCK, width // _BLOCK).amax(1)
            chunk_max = block_max.amax(-1)
        else:
            chunk_max = logits.amax(-1)
        self._merge_top(logits, block_max, chunk_max, start)
        self._count_above(logits, chunk_max, start)
        new_max = torch.maximum(self.max, chunk_max)
        rescale = torch.exp(self.max - new_max)
        weights = torch.sub(logits, new_max[:, None]).exp_()
        self.sum_exp = self.sum_exp * rescale + weights.sum(-1)
        final_weights = weights[-self.group:].clone() if self.n_groups > 1 else None
        self.sum_exp_logit = self.sum_exp_logit * rescale + weights.mul_(logits).sum(-1)
        if final_weights is None:
            self.cross = self.sum_exp_logit
        else:  # the weights buffer is free again: reuse it for exp(f − max_f)·g
            products = torch.mul(logits.view(self.n_groups, self.group, width), final_weights, out=weights.view(self.n_groups, self.group, width))
            self.cross = self.cross * rescale[-self.group:].repeat(self.n_groups) + products.sum(-1).flatten()
        self.max = new_max

    def _merge_top(self, logits: Tensor, block_max: Tensor | None, chunk_max: Tensor, start: int) -> None:
        rows = _rows_where(chunk_max > self.top_values[:, -1])
        if rows is None:
            return
        k = self.top_values.shape[-1]
        if block_max is None:
            values, ids = _take(logits, rows).float().topk(min(k, logits.shape[-1]), dim=-1)
        else:  # the chunk's k largest entries lie in the k blocks with the largest maxima
            lead = _take(block_max, rows).topk(k, dim=-1).indices
            n_blocks = block_max.shape[-1]
            cols = (lead[..., None] + n_blocks * torch.arange(_BLOCK, device=logits.device)).flatten(1)  # [n, k·block]
            candidates = logits.gather(1, cols) if rows is _ALL else logits[rows[:, None], cols]
            values, pick = candidates.float().topk(k, dim=-1)
            ids = cols.gather(1, pick)
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
        count = (_take(logits, rows) > _take(self.target_logit, rows)[:, None]).sum(-1, dtype=torch.int32)
        count -= self._own_above(logits, rows, start)
        if rows is _ALL:
            self.above += count
        else:
            self.above.index_add_(0, rows, count)

    def _own_above(self, logits: Tensor, rows, start: int) -> Int[Tensor, " row"]:
        """1 where the target's own column lies in this chunk and reads above the (float32)
        target logit: the target is not "above" itself, whatever its last bit says."""
        width = logits.shape[-1]
        local = _take(self.target_ids, rows) - start
        inside = (local >= 0) & (local < width)
        own = _take(logits, rows).gather(-1, local.clamp(0, width - 1)[:, None])[:, 0]
        return (inside & (own > _take(self.target_logit, rows))).int()

    def log_z(self) -> Tensor:
        """``logsumexp`` of all logits seen, per row."""
        return self.max + self.sum_exp.log()

    def grouped(self, values: Tensor) -> Tensor:
        """``[N, *]`` -> ``[groups, R, *]``."""
        return values.unflatten(0, (self.n_groups, self.group))


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
