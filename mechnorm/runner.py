"""Whole datasets: :func:`run_dataset` writes Parquet shards, resumes, and runs data-parallel.

Row ``r`` of the dataset belongs to shard ``r // shard_size``. Each shard is computed by one
process (``accelerate``'s ``PartialState().split_between_processes`` over the pending shards,
under ``torchrun`` or ``accelerate launch``; one process otherwise) and written atomically
(a temporary file, then ``os.replace``). A shard file that exists is finished: a resumed run
skips it and never rewrites it. ``manifest.json`` records what the run computes (model, methods,
options, …); resuming into a folder made for something else is refused. :func:`read` joins the
shards in row order. Below this module nothing knows about shards or processes: each shard is
one call to :func:`mechnorm.attribute` or :func:`mechnorm.evaluate.run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from .dataset_io import DatasetRowError, Row, read_rows
from .runner_shard import attribution_shard, combine_evaluation, evaluation_shard
from .runner_store import (MANIFEST, check_or_write_manifest, describe_head, describe_model, finished_shards,
                           read_manifest, shard_path, write_shard)

__all__ = ["DatasetRowError", "RunReport", "combine_evaluation", "read", "read_evaluation", "run_dataset"]


@dataclass
class RunReport:
    """What one process of :func:`run_dataset` did.

    Attributes:
        out: the output folder. n_rows, n_shards: of the whole dataset.
        computed, skipped: shard ids this process computed / all shards found finished.
        process_index, num_processes: this process among the data-parallel ones.
        seconds: wall time of this process.
    """

    out: Path
    n_rows: int
    n_shards: int
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    process_index: int = 0
    num_processes: int = 1
    seconds: float = 0.0

    def read(self) -> pd.DataFrame:
        """The run's rows (:func:`read`)."""
        return read(self.out)


def run_dataset(
    model,
    data,
    methods: Sequence[str] | None = None,
    out: str | os.PathLike = "mechnorm-run",
    *,
    evaluate: bool = False,
    metrics: Sequence[str] | None = None,
    ks: Sequence[float] | None = None,
    n_seeds: int = 3,
    text_column: str = "text",
    split: str | None = None,
    shard_size: int = 64,
    batch_size: int = 8,
    padding_side: str = "right",
    head=None,
    options: dict[str, dict] | None = None,
    kind: str | None = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> RunReport:
    """Attribute (or evaluate) a whole dataset into Parquet shards, resumably and data-parallel.

    Launch the same script with ``torchrun --nproc_per_node N`` or ``accelerate launch`` to split
    the shards between N processes (one model copy each, on its own GPU where there are GPUs);
    run it plainly for one process. Run it again on the same ``out`` to resume.

    Args:
        model: a loaded model, or a name for :func:`mechnorm.load_model` (loaded on each
            process's device).
        data: a ``.jsonl``, ``.csv`` or ``.parquet`` file, a ``datasets.save_to_disk`` folder, a
            DataFrame, or a list of texts, dicts or :mod:`mechnorm.tasks` examples
            (see :func:`mechnorm.dataset_io.read_rows`: ``text``; optional ``target``, ``foil``,
            ``cue_positions``).
        methods: method names; default :data:`mechnorm.compare.DEFAULT_METHODS` (attribution) or
            the harness's (evaluation).
        out: the output folder (``manifest.json`` and ``shards/shard-000000.parquet`` …).
        evaluate: write :func:`mechnorm.evaluate.run` rows per shard instead of token scores;
            the dataset's ``target`` is then the gold answer. Read them with :func:`read_evaluation`.
        metrics, ks, n_seeds: for ``evaluate``; metrics default to comprehensiveness and
            sufficiency, plus average_precision, cue_mass and hit_at_1 when the rows have cues.
        text_column: the column of texts. split: the split of a saved ``DatasetDict``.
        shard_size: rows per shard (the unit of resumption and of the work split).
        batch_size, padding_side, head, options: as for :func:`mechnorm.attribute`.
        kind: ``"hooked"`` or ``"bridge"`` when ``model`` is a name.
        progress: a tqdm bar with ETA on the main process.
        on_shard: called with each shard id after it is written.

    Returns:
        A :class:`RunReport`; ``report.read()`` gives the rows of the whole dataset.

    Raises:
        DatasetRowError: a malformed row, naming its file and line; finished shards are kept.
        ValueError: ``out`` holds a run of another model, methods or settings.

    Example:
        >>> report = mechnorm.run_dataset("zoo:gpt2-agree-recall", "texts.jsonl", ["normxlogit"],
        ...                               out="runs/agree")                      # doctest: +SKIP
        >>> frame = mechnorm.runner.read("runs/agree")                           # doctest: +SKIP
    """
    clock = time.perf_counter()
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be at least 1 (got {shard_size}, {batch_size}).")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    rows = read_rows(data, text_column=text_column, split=split)
    state = process_state()
    name = str(model) if isinstance(model, (str, os.PathLike)) else None
    if name is not None:
        from .models import load_model

        device = state.device if state.device.type != "cpu" else "cpu"
        model = load_model(name, kind=kind, device=device)
    methods, compute = _job(rows, methods, evaluate, metrics, ks, n_seeds, head, batch_size, padding_side, options)
    identity = {
        "mode": "evaluate" if evaluate else "attribute", "model": describe_model(model), "methods": list(methods),
        "options": json.loads(json.dumps(options or {}, sort_keys=True, default=str)), "head": describe_head(head),
        "shard_size": shard_size, "text_column": text_column, "padding_side": padding_side,
        **({"metrics": list(compute.keywords["metrics"]), "ks": compute.keywords["ks"], "n_seeds": n_seeds}
           if evaluate else {}),
    }
    identity = json.loads(json.dumps(identity, default=str))  # as the manifest stores it: tuples become lists
    out = Path(out)
    check_or_write_manifest(out, identity, name, data, len(rows), state.is_main_process)
    state.wait_for_everyone()  # the folder and manifest exist before any process writes a shard
    n_shards = -(-len(rows) // shard_size)
    finished = finished_shards(out, rows, shard_size, n_shards)
    pending = [i for i in range(n_shards) if i not in finished]
    state.wait_for_everyone()  # every process splits the same pending list before any writes a shard
    report = RunReport(out, len(rows), n_shards, [], sorted(finished), state.process_index, state.num_processes)
    from tqdm.auto import tqdm

    with state.split_between_processes(pending) as mine:
        desc = "mechnorm.run" + (f" (process 0 of {state.num_processes})" if state.num_processes > 1 else "")
        bar = tqdm(mine, desc=desc, unit="shard", disable=not (progress and state.is_main_process))
        for shard in bar:
            start = shard * shard_size
            part = rows[start : start + shard_size]
            frame = compute(model, part, start)
            write_shard(out, shard, frame, identity, part, state.process_index)
            report.computed.append(shard)
            bar.set_postfix(rows=f"{start + len(part)}/{len(rows)}")
            if on_shard is not None:
                on_shard(shard)
    state.wait_for_everyone()
    missing = [i for i in range(n_shards) if not shard_path(out, i).exists()]
    if missing:  # cannot happen when every process ran to the end; said loudly if it does
        raise RuntimeError(f"{out}: shards {missing[:5]} were not written by any process; run again to compute them.")
    report.seconds = time.perf_counter() - clock
    return report


def read(out: str | os.PathLike, partial: bool = False) -> pd.DataFrame:
    """The rows of a run, shards joined in row order.

    Args:
        out: the run's folder.
        partial: return the finished shards of an unfinished run instead of raising.

    Example:
        >>> frame = mechnorm.runner.read("runs/agree")                           # doctest: +SKIP
        >>> frame.query("method == 'normxlogit' and layer == 2").head()          # doctest: +SKIP
    """
    import pyarrow.parquet as pq

    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{out} holds no mechnorm run ({MANIFEST} missing); run mechnorm.run_dataset first.")
    n_shards = -(-manifest["n_rows"] // manifest["identity"]["shard_size"])
    paths = [shard_path(out, i) for i in range(n_shards)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing and not partial:
        raise ValueError(f"{out} is unfinished: {len(missing)} of {n_shards} shards missing (first: {missing[:5]}); "
                         "run run_dataset again to resume, or read(..., partial=True).")
    frames = [pq.read_table(p).to_pandas() for p in paths if p.exists()]
    if not frames:
        raise ValueError(f"{out} has no finished shard yet.")
    return pd.concat(frames, ignore_index=True)


def read_evaluation(out: str | os.PathLike) -> pd.DataFrame:
    """The whole dataset's evaluation rows (method, layer, metric, k, value) of an
    ``evaluate=True`` run, ready for :func:`mechnorm.evaluate.table` (see :func:`combine_evaluation`).

    Example:
        >>> mechnorm.evaluate.table(mechnorm.runner.read_evaluation("runs/eval"))   # doctest: +SKIP
    """
    return combine_evaluation(read(out))


def process_state():
    """accelerate's ``PartialState`` (gloo on CPU, the GPU's backend on GPUs), or a one-process
    stand-in when accelerate is missing.

    Example:
        >>> process_state().num_processes          # a plain python process
        1
    """
    try:
        import torch
        from accelerate import PartialState
    except ImportError:
        return _OneProcess()
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


class _OneProcess:
    """What run_dataset uses of ``PartialState``, for one process."""

    process_index, num_processes, is_main_process = 0, 1, True

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    @contextlib.contextmanager
    def split_between_processes(self, items):
        yield items

    def wait_for_everyone(self) -> None:
        pass


def _job(rows: list[Row], methods, evaluate, metrics, ks, n_seeds, head, batch_size, padding_side, options):
    """The methods and the shard function (a partial of runner_shard's) for this run."""
    from functools import partial

    common = dict(head=head, batch_size=batch_size, padding_side=padding_side, options=options)
    if not evaluate:
        from .compare import DEFAULT_METHODS

        if metrics is not None or ks is not None:
            raise ValueError("metrics and ks are for evaluate=True runs.")
        methods = tuple(DEFAULT_METHODS if methods is None else ((methods,) if isinstance(methods, str) else methods))
        job = partial(attribution_shard, methods=methods, **common)
        return methods, lambda model, part, start: job(model, part, start)
    from .evaluate.faithfulness import PAPER_KS
    from .evaluate.harness import ALIGNMENT_METRICS, DEFAULT_METHODS as EVAL_METHODS

    methods = tuple(EVAL_METHODS if methods is None else ((methods,) if isinstance(methods, str) else methods))
    if metrics is None:
        metrics = ("comprehensiveness", "sufficiency") + (tuple(ALIGNMENT_METRICS) if rows[0].cue_positions else ())
    job = partial(evaluation_shard, methods=methods, metrics=tuple(metrics), ks=tuple(ks or PAPER_KS),
                  n_seeds=n_seeds, **common)
    return methods, job


