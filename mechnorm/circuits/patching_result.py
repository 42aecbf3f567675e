"""What patching returns (:class:`PatchingResult`) and the units a ``where`` patches."""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..residual import resid_hook, resolve_layers
from ..targets import first_positions, last_positions
from ..warn import warn

# where -> (axes of a unit, hook template, whether the unit has a position)
_WHERE = {
    "resid_pre": (("layer", "pos"), None, True),
    "attn_out": (("block", "pos"), "blocks.{l}.hook_attn_out", True),
    "mlp_out": (("block", "pos"), "blocks.{l}.hook_mlp_out", True),
    "head_out": (("block", "head"), "blocks.{l}.attn.hook_z", False),
    "head_pos": (("block", "head", "pos"), "blocks.{l}.attn.hook_z", True),
    "pattern": (("block", "head"), "blocks.{l}.attn.hook_pattern", False),
}


@dataclass
class Units:
    """The units one patching call patches, in row-major order over ``dims``.

    ``hook[u]`` is the hook point of unit u, ``index[u]`` the index into that activation
    after its batch axis, ``valid[b, u]`` whether pair b has the unit (a real, selected position).
    """

    dims: tuple[str, ...]
    coords: dict[str, list[int]]
    hook: list[str]
    index: list[tuple]
    valid: Bool[Tensor, "batch unit"]

    @property
    def hook_names(self) -> list[str]:
        """The distinct hook points, in order of first use."""
        return list(dict.fromkeys(self.hook))

    def __len__(self) -> int:
        return len(self.hook)


def units_for(model, where: str, layers, positions, mask: Tensor) -> Units:
    """The units of ``where`` over ``layers`` and ``positions`` (see ``activation_patching``).

    Example:
        >>> units = units_for(model, "head_out", None, "all", batch.attention_mask)  # doctest: +SKIP
        >>> units.hook[0], units.index[0]                                              # doctest: +SKIP
        ('blocks.0.attn.hook_z', (slice(None, None, None), 0))
    """
    if where not in _WHERE:
        raise ValueError(f"where must be one of {sorted(_WHERE)}, got {where!r}.")
    dims, template, has_pos = _WHERE[where]
    n_layers = int(model.cfg.n_layers)
    if dims[0] == "layer":
        layer_list = resolve_layers(layers, n_layers)
        hook_of = resid_hook
    else:
        layer_list = _blocks(layers, n_layers)
        hook_of = lambda block: template.format(l=block)  # noqa: E731
    missing = sorted({hook_of(layer) for layer in layer_list} - set(model.hook_dict))
    if missing:
        raise ValueError(f"where={where!r} patches {missing}, which {type(model).__name__} does not hook; "
                         f"this model cannot patch {where!r} (try where='resid_pre' or 'attn_out').")
    if not has_pos and positions != "all":
        raise ValueError(f"where={where!r} patches every position at once; positions= applies to "
                         "'resid_pre', 'attn_out', 'mlp_out' and 'head_pos' only.")
    batch, n_pos = mask.shape
    selected = _selected_positions(positions, mask.cpu())  # [batch, pos]
    coords = {dims[0]: layer_list}
    if "head" in dims:
        coords["head"] = list(range(int(model.cfg.n_heads)))
    if has_pos:
        coords["pos"] = list(range(n_pos))
    hook, index, valid = [], [], []
    for combo in itertools.product(*coords.values()):
        unit = dict(zip(dims, combo))
        hook.append(hook_of(unit[dims[0]]))
        if where == "head_out":
            index.append((slice(None), unit["head"]))
        elif where == "head_pos":
            index.append((unit["pos"], unit["head"]))
        elif where == "pattern":
            index.append((unit["head"],))
        else:
            index.append((unit["pos"],))
        valid.append(selected[:, unit["pos"]] if has_pos else torch.ones(batch, dtype=torch.bool))
    return Units(dims, coords, hook, index, torch.stack(valid, dim=1))


def _blocks(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    requested = [layers] if isinstance(layers, int) else list(layers)
    blocks = [block + n_layers if block < 0 else block for block in requested]
    bad = [r for r, b in zip(requested, blocks) if not 0 <= b < n_layers]
    if bad or not blocks:
        raise ValueError(f"Block(s) {bad or requested} out of range: this model has blocks 0…{n_layers - 1}.")
    return blocks


def _selected_positions(positions, mask: Tensor) -> Bool[Tensor, "batch pos"]:
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"positions must be 'all' or a list of ints, got {positions!r}.")
        return mask.clone()
    offsets = [positions] if isinstance(positions, int) else list(positions)
    first, last = first_positions(mask), last_positions(mask)
    selected = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        for k in offsets:
            p = int(first[b]) + k if k >= 0 else int(last[b]) + 1 + k
            if not int(first[b]) <= p <= int(last[b]):
                raise ValueError(f"Position {k} is outside sequence {b}'s {int(mask[b].sum())} real tokens.")
            selected[b, p] = True
    return selected


@dataclass
class PatchingResult:
    """Patching scores with labelled axes, ``[dims[0], batch, *dims[2:]]`` like an Attribution.

    Attributes:
        scores: normalised ``(patched − corrupted) / (clean − corrupted)``; NaN where a unit was
            not patched (padding, unselected positions) or the pair's clean and corrupted metrics tie.
        raw: the patched metric itself (attribution patching: corrupted + the linear estimate).
        clean_metric, corrupted_metric: ``[batch]`` metrics of the unpatched runs.
        dims: axis names, e.g. ``("layer", "batch", "pos")`` or ``("block", "batch", "head")``.
        coords: the values along each axis except batch (layer/block indices, heads, positions).
        where, method: what was patched and how (``"activation patching"``, ``"attribution patching"``).
        tokens, corrupted_tokens: token strings of each pair; mask: ``[batch, pos]``.
        target_labels: the metric's output per pair (``"7 − 5"``), when known.

    Example:
        >>> result = mechnorm.activation_patching(model, clean, corrupted, target, where="head_out")  # doctest: +SKIP
        >>> result.top_k(3)                                                                          # doctest: +SKIP
    """

    scores: Float[Tensor, "..."]
    raw: Float[Tensor, "..."]
    clean_metric: Float[Tensor, "batch"]
    corrupted_metric: Float[Tensor, "batch"]
    dims: tuple[str, ...]
    coords: dict[str, list[int]]
    where: str
    method: str
    mask: Bool[Tensor, "batch pos"]
    tokens: list[list[str]] | None = None
    corrupted_tokens: list[list[str]] | None = None
    target_labels: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, pair, patched: Float[Tensor, "batch unit"], method: str, where: str) -> "PatchingResult":
        """Normalise ``patched`` metrics of a prepared pair and lay them out along the unit axes."""
        units = pair.units
        clean, corrupted = pair.clean_metric.cpu(), pair.corrupted_metric.cpu()
        gap = clean - corrupted
        tied = gap.abs() < 1e-6
        if tied.any():
            warn(f"Pair(s) {tied.nonzero().flatten().tolist()}: clean and corrupted give the same metric "
                 "({:.4g}), so there is nothing to restore; their normalised scores are NaN.".format(float(clean[tied][0])))
        patched = patched.masked_fill(~units.valid, float("nan"))
        normalised = (patched - corrupted[:, None]) / gap.masked_fill(tied, float("nan"))[:, None]
        shape = [len(v) for v in units.coords.values()]
        lay_out = lambda t: t.reshape(t.shape[0], *shape).movedim(0, 1).contiguous()  # noqa: E731
        labels = pair.target.labels
        return cls(lay_out(normalised), lay_out(patched), clean, corrupted, (units.dims[0], "batch", *units.dims[1:]),
                   units.coords, where, method, pair.mask.cpu(), pair.strings, pair.corrupted_strings,
                   tuple(labels) if labels else None)

    @property
    def batch_size(self) -> int:
        """Number of clean/corrupted pairs."""
        return self.scores.shape[1]

    def mean(self) -> Float[Tensor, "..."]:
        """Scores averaged over the pairs (NaN-aware), the batch axis removed."""
        return self.scores.nanmean(dim=1)

    def to_frame(self) -> pd.DataFrame:
        """Tidy scores, one row per (pair, unit) that was patched.

        Columns: method, where, batch, the unit axes (layer or block, head, pos), token (for
        positions), score, raw, clean, corrupted.
        """
        axes = [d for d in self.dims if d != "batch"]
        values = self.scores.movedim(1, 0)  # [batch, *units]
        raw = self.raw.movedim(1, 0)
        rows = []
        for index in itertools.product(*[range(n) for n in values.shape]):
            score = float(values[index])
            if np.isnan(float(raw[index])):
                continue
            row = {"method": self.method, "where": self.where, "batch": index[0]}
            row.update({axis: self.coords[axis][i] for axis, i in zip(axes, index[1:])})
            if "pos" in row and self.tokens is not None:
                row["token"] = self.tokens[index[0]][row["pos"]]
            row.update(score=score, raw=float(raw[index]), clean=float(self.clean_metric[index[0]]),
                       corrupted=float(self.corrupted_metric[index[0]]))
            rows.append(row)
        return pd.DataFrame(rows)

    def top_k(self, k: int = 5) -> pd.DataFrame:
        """The ``k`` units with the largest mean score over the pairs (signed, largest first)."""
        frame = self.to_frame()
        keys = [d for d in self.dims if d != "batch"]
        mean = frame.groupby(keys, as_index=False)["score"].mean()
        return mean.sort_values("score", ascending=False).head(k).reset_index(drop=True)

    def compare(self, other: "PatchingResult", k: int = 5) -> dict[str, float]:
        """Agreement with another result over the same units: Pearson and Spearman correlation
        of the pair-averaged scores, and the overlap of their top-``k`` units by |score|.

        Example:
            >>> attribution.compare(activation)   # doctest: +SKIP
            {'pearson': 0.98, 'spearman': 0.91, 'top_k_overlap': 0.8, 'k': 5, 'n_units': 12}
        """
        if self.dims != other.dims or tuple(self.scores.shape) != tuple(other.scores.shape):
            raise ValueError(f"Cannot compare {self.where} {tuple(self.scores.shape)} {self.dims} with "
                             f"{other.where} {tuple(other.scores.shape)} {other.dims}: patch the same units.")
        a, b = self.mean().flatten().numpy(), other.mean().flatten().numpy()
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        if a.size < 2:
            raise ValueError("Fewer than two units have scores in both results; nothing to correlate.")
        k = min(k, a.size)
        top = lambda x: set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())  # noqa: E731
        return {
            "pearson": float(pd.Series(a).corr(pd.Series(b))),
            "spearman": float(pd.Series(a).corr(pd.Series(b), method="spearman")),
            "top_k_overlap": len(top(a) & top(b)) / k,
            "k": k,
            "n_units": int(a.size),
        }

    def plot(self, batch: int | None = None, title: str | None = None):
        """Heatmap of the scores (the mean over pairs, or one pair); see ``mechnorm.plot.patching_heatmap``."""
        from .patching_plots import patching_heatmap

        return patching_heatmap(self, batch=batch, title=title)

    def __repr__(self) -> str:
        shape = " × ".join(f"{d}={self.scores.shape[i]}" for i, d in enumerate(self.dims))
        return f"PatchingResult({self.method}, where={self.where!r}, {shape})"

    def _repr_html_(self) -> str:
        header = (f"<div><b>{html.escape(self.method)}</b> of <code>{html.escape(self.where)}</code>, "
                  f"{self.batch_size} pair(s); mean clean metric {float(self.clean_metric.mean()):.3g}, "
                  f"corrupted {float(self.corrupted_metric.mean()):.3g}. Top units:</div>")
        return header + self.top_k(5).to_html(index=False, float_format=lambda v: f"{v:.3f}")


__all__ = ["PatchingResult", "Units", "units_for"]
