"""``mechnorm repmatch train | compare | instances``: RepMatch from the command line.

Examples:
    mechnorm repmatch train --model zoo:bert-lexicon --task lexicon --n 256 --out ad/lex_a
    mechnorm repmatch train --model zoo:bert-lexicon --task lexicon --n 256 --start 256 --out ad/lex_b
    mechnorm repmatch compare ad/lex_a ad/lex_b --html phi.html
    mechnorm repmatch instances --model zoo:bert-lexicon --task lexicon --n 500 --reference ad/lex_a --out scores.csv
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Add the ``repmatch`` subcommand (and its actions) to the ``mechnorm`` subparsers."""
    parser = sub.add_parser("repmatch", help="RepMatch: train LoRA adapters on data subsets and compare them")
    actions = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="zoo:NAME, smollm2-135m or an HF folder")
        p.add_argument("--task", required=True, help="task name (mechnorm.tasks.list_tasks())")
        p.add_argument("--n", type=int, default=256, help="number of training examples")
        p.add_argument("--start", type=int, default=0, help="skip this many examples first (another subset)")
        p.add_argument("--seed", type=int, default=0)

    train = actions.add_parser("train", help="fine-tune one adapter on a task subset; writes a peft adapter folder")
    data_args(train)
    train.add_argument("--rank", type=int, default=4)
    train.add_argument("--steps", type=int, default=60)
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--out", required=True, help="adapter folder to write")
    train.add_argument("--force", action="store_true", help="overwrite an existing adapter folder")

    compare = actions.add_parser("compare", help="φ between adapter folders, averaged over layers and matrices")
    compare.add_argument("adapters", nargs="+", help="peft adapter folders")
    compare.add_argument("--html", default=None, help="also write the heatmap here")
    compare.add_argument("--force", action="store_true", help="overwrite an existing --html file")

    inst = actions.add_parser("instances", help="instance-to-dataset scores against a reference adapter (CSV)")
    data_args(inst)
    inst.add_argument("--reference", required=True, help="the reference adapter folder")
    inst.add_argument("--out", default="repmatch_instances.csv")
    inst.add_argument("--force", action="store_true", help="overwrite an existing --out file")


def _examples(args):
    from .. import tasks

    if args.n < 1 or args.start < 0:
        raise ValueError(f"--n must be >= 1 and --start >= 0 (got {args.n}, {args.start}).")
    examples = tasks.get_task(args.task, seed=args.seed).train(args.start + args.n)[args.start :]
    if not args.model.startswith("zoo:") and tasks.get_task(args.task).kind == "lm":
        return [f"{e.text} {e.answer_text}" for e in examples]  # the model's own tokenizer reads the words
    return examples


def run(args) -> int:
    """Run the ``repmatch`` action ``args.action``."""
    from pathlib import Path

    from . import Adapter, instance_similarity, similarity_matrix, train_adapter

    if args.action == "train":
        adapter = train_adapter(args.model, _examples(args), rank=args.rank, steps=args.steps, lr=args.lr,
                                seed=args.seed, out=args.out, progress=True)
        print(f"wrote {args.out}: {adapter}")
    elif args.action == "compare":
        sims = similarity_matrix({str(Path(p)): Adapter.load(p) for p in args.adapters})
        print(sims.mean().round(4).to_string())
        if args.html:
            sims.plot().write_html(args.html, include_plotlyjs=True)
            print(f"wrote {args.html}")
    else:
        scores = instance_similarity(args.model, _examples(args), args.reference, seed=args.seed, progress=True)
        frame = scores.by_layer().add_prefix("layer_")
        frame.insert(0, "score", scores.score.numpy())
        frame.to_csv(args.out, index_label="instance")
        print(f"wrote {args.out}: {len(frame)} instances, mean score {frame['score'].mean():.4f}")
    return 0
