"""One shard of a :func:`mechnorm.run_dataset` run: rows in, a tidy DataFrame out.

Attribution shards hold :meth:`Comparison.to_frame` rows (``batch`` replaced by the dataset row
id ``row``; ``pos`` counted from each sequence's first real token, so it does not depend on the
padding), with the explained ``target`` and, when the dataset gives cue positions, ``cue``.
Evaluation shards hold :func:`mechnorm.evaluate.run` rows for the shard's examples, each with
the count ``n`` of examples its value averages over, which :func:`combine_evaluation` weights
into the whole dataset's figures.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from .compare import attribute
from .dataset_io import DatasetRowError, Row
from .inputs import Batch, pad, tokenize
from .result import token_strings
from .targets import Target, contrast, token_target


def attribution_shard(model, rows: Sequence[Row], first_row: int, methods, *, head, batch_size, padding_side,
                      options) -> pd.DataFrame:
    """The tidy attribution rows of ``rows`` (dataset rows ``first_row …``).

    Example:
        >>> frame = attribution_shard(model, rows, 0, ["normxlogit"], head=None, batch_size=8,
        ...                           padding_side="right", options=None)      # doctest: +SKIP
    """
    batch, offsets = _batch(model, rows, padding_side)
    _check_cues(rows, batch)
    comparison = attribute(model, batch, methods, target=_target(model, rows, offsets, head), batch_size=batch_size,
                           padding_side=padding_side, head=head, options=options, progress=False)
    frames = []
    for name in comparison.methods:
        attr = comparison[name]
        frame = attr.to_frame()
        index = frame.pop("batch").to_numpy()
        frame["pos"] = frame["pos"].to_numpy() - offsets.numpy()[index]
        frame.insert(0, "row", first_row + index)
        if attr.target_labels is not None:
            frame["target"] = [attr.target_labels[i] for i in index]
        if rows[0].cue_positions is not None:
            cues = {(i, p) for i, row in enumerate(rows) for p in row.cue_positions}
            frame["cue"] = [(i, p) in cues for i, p in zip(index.tolist(), frame["pos"].tolist())]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def evaluation_shard(model, rows: Sequence[Row], first_row: int, methods, *, metrics, head, batch_size, padding_side,
                     options, ks, n_seeds) -> pd.DataFrame:
    """:func:`mechnorm.evaluate.run` on ``rows``, with the shard's first row and size ``n``.

    The dataset's ``target`` column is the gold answer (for the accuracies); foils are unused.

    Example:
        >>> frame = evaluation_shard(model, rows, 0, ["normxlogit"], metrics=("comprehensiveness",),
        ...     head=None, batch_size=8, padding_side="right", options=None, ks=(0.5,), n_seeds=1)  # doctest: +SKIP
    """
    from .evaluate.harness import run

    batch, offsets = _batch(model, rows, padding_side)
    _check_cues(rows, batch)
    data = {"tokens": batch.tokens, "attention_mask": batch.attention_mask}
    if rows[0].target is not None:
        data["labels"] = _ids(model, rows, "target", head)
    if rows[0].cue_positions is not None:
        data["cue_positions"] = [[p + int(o) for p in row.cue_positions] for row, o in zip(rows, offsets)]
    if rows[0].position is not None:
        data["positions"] = torch.tensor([row.position for row in rows]) + offsets
    frame = run(model, data, methods, metrics, head=head, batch_size=batch_size, ks=ks, n_seeds=n_seeds,
                options=options, progress=False, counts=True)
    frame.insert(0, "first_row", first_row)
    return frame


def combine_evaluation(frame: pd.DataFrame) -> pd.DataFrame:
    """Whole-dataset evaluation rows from per-shard ones: each value averaged over shards
    weighted by the count ``n`` of examples behind it (``peak_mb``: the maximum), in the
    harness's columns. Every value is a mean over examples, and a metric that skips examples
    (an alignment metric where a sequence has no cue left) counts only those it scored, so the
    result equals evaluating the whole dataset at once; a shard that scored none (value NaN,
    ``n`` 0) adds nothing.

    Example:
        >>> shards = pd.DataFrame({"first_row": [0, 2], "method": "m", "layer": 1.0, "metric": "x",
        ...                        "k": float("nan"), "value": [1.0, 4.0], "n": [2, 1]})
        >>> combine_evaluation(shards)["value"].tolist()
        [2.0]
    """
    keys = ["method", "layer", "metric", "k"]
    frame = frame.assign(weighted=(frame["value"] * frame["n"]).where(frame["n"] > 0, 0.0))
    grouped = frame.groupby(keys, dropna=False, sort=False)
    combined = (grouped["weighted"].sum() / grouped["n"].sum()).rename("value")
    peak = grouped["value"].max()
    is_peak = combined.index.get_level_values("metric") == "peak_mb"
    combined[is_peak] = peak[is_peak]
    return combined.reset_index()[keys + ["value"]]


def _batch(model, rows: Sequence[Row], padding_side: str) -> tuple[Batch, torch.Tensor]:
    """The rows tokenised and padded, and each row's offset (its first real position)."""
    if rows[0].tokens is not None:
        tokenizer = getattr(model, "tokenizer", None)
        pad_id = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
        tokens, mask = pad([row.tokens for row in rows], pad_id, padding_side)
        batch = Batch(tokens, mask, token_strings(tokenizer, tokens))
    else:
        batch = tokenize(model, [row.text for row in rows], padding_side=padding_side)
    offsets = batch.attention_mask.long().argmax(-1)
    return batch, offsets


def _check_cues(rows: Sequence[Row], batch: Batch) -> None:
    if rows[0].cue_positions is None:
        return
    lengths = batch.attention_mask.sum(-1).tolist()
    for row, length in zip(rows, lengths):
        bad = [p for p in row.cue_positions if p >= length]
        if bad:
            raise DatasetRowError(f"{row.where}: cue position(s) {bad} are beyond the text's {length} tokens "
                                  "(positions count from 0 and include BOS when the model prepends one).")


def _target(model, rows: Sequence[Row], offsets: torch.Tensor, head) -> Target | None:
    """The dataset's targets (and foils) as one Target; None to explain the model's prediction."""
    if rows[0].target is None:
        return None
    target = token_target(_ids(model, rows, "target", head), model)
    if all(row.foil is not None for row in rows):
        target = contrast(target, token_target(_ids(model, rows, "foil", head), model))
    if rows[0].position is not None:
        target = Target(target.ids, target.foil, torch.tensor([r.position for r in rows]) + offsets, target.labels)
    return target


def _ids(model, rows: Sequence[Row], field: str, head) -> torch.Tensor:
    """Each row's ``field`` as a token id: strings must be exactly one token, ids in range."""
    n_outputs = head.n_outputs if head is not None else int(model.cfg.d_vocab)
    ids = []
    for row in rows:
        value = getattr(row, field)
        if isinstance(value, str):
            try:
                value = int(token_target(value, model).ids[0])
            except ValueError as error:
                raise DatasetRowError(f"{row.where}: {field} {error}") from None
        if not 0 <= value < n_outputs:
            raise DatasetRowError(f"{row.where}: {field} id {value} is outside the {n_outputs} outputs of the "
                                  "head (vocabulary or classes).")
        ids.append(value)
    return torch.tensor(ids, dtype=torch.long)
