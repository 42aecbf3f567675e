"""``mechnorm run`` and ``mechnorm evaluate --data/--out-dir``: whole datasets through the runner.

Examples:
    mechnorm run --model zoo:gpt2-agree-recall --data texts.jsonl --methods normxlogit logat --out-dir runs/a
    torchrun --nproc_per_node 2 -m mechnorm.cli run --model smollm2-135m --data texts.parquet --out-dir runs/b
    accelerate launch -m mechnorm.cli run --model smollm2-135m --data texts.csv --out-dir runs/c
    mechnorm evaluate --model zoo:gpt2-agree-recall --data eval.jsonl --out-dir runs/eval
    mechnorm evaluate --model zoo:gpt2-agree-recall --task agreement --n 512 --out-dir runs/agree

Run the same command again to resume: finished shards are kept and skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    """Add the ``run`` subcommand to the ``mechnorm`` subparsers.

    Example:
        >>> parser = argparse.ArgumentParser(); add_parser(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["run", "--model", "m", "--data", "d.jsonl", "--out-dir", "o"]).shard_size
        64
    """
    run = sub.add_parser("run", help="attribute a whole dataset into resumable Parquet shards "
                                     "(many processes under torchrun / accelerate launch)")
    run.add_argument("--model", required=True, help="zoo:NAME, a fetched name or an HF folder")
    run.add_argument("--data", required=True, help="a .jsonl, .csv or .parquet file, or a datasets.save_to_disk folder")
    run.add_argument("--methods", nargs="+", default=None, help="methods to run (see list-methods)")
    run.add_argument("--out-dir", required=True, help="output folder; run again on it to resume")
    run.add_argument("--kind", choices=("hooked", "bridge"), default=None, help="TransformerLens model class")
    run.add_argument("--evaluate", action="store_true", help="write faithfulness rows per shard instead of scores")
    add_runner_arguments(run)


def add_runner_arguments(parser: argparse.ArgumentParser, evaluate: bool = False) -> None:
    """The options the runner shares between ``run`` and ``evaluate`` (``--data`` and
    ``--out-dir`` added to ``evaluate`` here, since ``run`` declares them itself).

    Example:
        >>> parser = argparse.ArgumentParser(); add_runner_arguments(parser, evaluate=True)
        >>> parser.parse_args(["--data", "d.csv"]).text_column
        'text'
    """
    if evaluate:
        parser.add_argument("--data", default=None, help="evaluate on this .jsonl/.csv/.parquet file or datasets "
                                                         "folder (target = gold answer) through the sharded runner")
        parser.add_argument("--out-dir", default=None, help="run through the sharded, resumable runner into this folder")
    parser.add_argument("--text-column", default="text", help="the column of texts (default: text)")
    parser.add_argument("--split", default=None, help="the split of a saved DatasetDict folder")
    parser.add_argument("--shard-size", type=int, default=64, help="rows per Parquet shard (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--padding-side", choices=("left", "right"), default="right")
    parser.add_argument("--options", default=None, help='per-method options as JSON, e.g. \'{"integrated_gradients": '
                                                        '{"n_steps": 20}}\'')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    """Run ``mechnorm run``: the dataset into ``--out-dir``; prints a summary on the main process.

    Example:
        >>> from mechnorm.cli import main
        >>> main(["run", "--model", "zoo:gpt2-agree-recall", "--data", "d.jsonl", "--out-dir", "o"])  # doctest: +SKIP
        0
    """
    from .runner import run_dataset

    report = run_dataset(args.model, args.data, args.methods, args.out_dir, evaluate=args.evaluate, kind=args.kind,
                         head=_zoo_head(args.model), **_common(args))
    _summary(report)
    if args.evaluate and report.process_index == 0:
        _write_evaluation(report.out)
    return 0


def evaluate_through_runner(args) -> bool:
    """``mechnorm evaluate`` with ``--data`` or ``--out-dir``: evaluate through the runner, write
    ``<out-dir>/faithfulness.csv`` and ``.html`` and print the table; False when neither is given.

    Example:
        >>> evaluate_through_runner(argparse.Namespace(data=None, out_dir=None, task="agreement"))
        False
    """
    data, out_dir = getattr(args, "data", None), getattr(args, "out_dir", None)
    if data is None and out_dir is None:
        if getattr(args, "task", None) is None:
            raise ValueError("mechnorm evaluate needs --task NAME or --data FILE.")
        return False
    if (data is None) == (getattr(args, "task", None) is None):
        raise ValueError("Give mechnorm evaluate one of --task and --data.")
    if out_dir is None:
        raise ValueError("--data runs through the sharded runner: give --out-dir too.")
    from . import tasks
    from .runner import run_dataset

    dataset = data if data is not None else tasks.get_task(args.task).test(args.n)
    methods = None if args.methods is None else tuple(args.methods)
    report = run_dataset(args.model, dataset, methods, out_dir, evaluate=True, head=_zoo_head(args.model),
                         **_common(args))
    _summary(report)
    if report.process_index == 0:
        _write_evaluation(report.out)
    return True


def _common(args) -> dict:
    try:
        options = None if args.options is None else json.loads(args.options)
    except json.JSONDecodeError as error:
        raise ValueError(f"--options is not valid JSON ({error.msg}); e.g. '{{\"rollout\": {{\"head_fusion\": \"max\"}}}}'.") from None
    return dict(text_column=args.text_column, split=args.split, shard_size=args.shard_size, batch_size=args.batch_size,
                padding_side=args.padding_side, options=options, progress=not args.no_progress)


def _zoo_head(name: str):
    from .cli import _zoo_head as zoo_head

    return zoo_head(name)


def _summary(report) -> None:
    if report.process_index == 0:
        print(f"{report.out}: {report.n_rows} rows in {report.n_shards} shards ({len(report.skipped)} finished before, "
              f"{report.n_shards - len(report.skipped)} computed by {report.num_processes} process(es)) "
              f"in {report.seconds:.1f} s")


def _write_evaluation(out: Path) -> None:
    from . import evaluate, plot
    from .runner import read_evaluation

    frame = read_evaluation(out)
    frame.to_csv(out / "faithfulness.csv", index=False)
    print(evaluate.table(frame).to_string())
    written = [out / "faithfulness.csv"]
    if frame["metric"].isin(["comprehensiveness", "sufficiency"]).any():
        plot.faithfulness_curves(frame).write_html(out / "faithfulness.html", include_plotlyjs=True)
        written.append(out / "faithfulness.html")
    print("wrote " + " and ".join(map(str, written)))
