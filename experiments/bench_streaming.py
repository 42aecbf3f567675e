"""Peak memory and time of streaming vs caching, of saliency with and without checkpointing, and
of integrated gradients with all steps in one batch vs under a ``max_memory`` budget.

Each configuration runs in a fresh subprocess on SmolLM2-135M (one thread): the model is
loaded, a 16-token warm-up runs the same call, then the process's peak resident set size is
reset (``/proc/self/clear_refs``) and the measured call runs once. Reported: wall seconds,
the process's peak RSS during the call (``VmHWM``: model weights and libraries included), and
the rise above the RSS before the call; ratios are to the plain forward pass of the same run.

    OMP_NUM_THREADS=1 python experiments/bench_streaming.py [--pos 2000] [--long 8000] [--kind hooked]
    (--configs forward,lens_streamed --long 0 --append: the logit lens streamed, appended to the CSV)
    (--log rows.jsonl appends each row; --merge a.jsonl b.jsonl summarises rows of separate runs)
    (--configs forward,ig_all_steps,ig_budget_1gb,ig_budget_4gb --pos 512 --long 0 --append: IG's budget)

Results: experiments/results/streaming.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

CACHE_ONLY = ("normxlogit", "logat", "embedding_norm", "rollout")  # the default methods that read a cache
IG_STEPS, IG_BUDGETS = 8, ("1GB", "4GB")  # integrated gradients: steps; budgets for one pass's saved activations
CONFIGS = {
    "forward": "plain forward pass (full logits, no cache)",
    "cached": "attribute(cache-only defaults, stream=False)",
    "streamed": "attribute(cache-only defaults, stream=True)",
    "saliency_plain": "saliency, checkpoint=False (every block's activations kept for backward)",
    "saliency_checkpoint": "saliency, checkpoint=True (the default from 1,024 tokens)",
    "lens_streamed": "run_streamed(['logit_lens']) then logit_lens(cache) at the prediction position",
    "lens_cached": "run_with_cache(hooks_for('logit_lens')) then logit_lens(cache) at the prediction position",
    "dla_streamed": "run_streamed(['dla']) then direct_logit_attribution(cache)",
    "ig_all_steps": f"integrated_gradients, {IG_STEPS} steps in one batch (internal_batch_size={IG_STEPS})",
    **{f"ig_budget_{size.lower()}": f"integrated_gradients, {IG_STEPS} steps, max_memory='{size}' (steps per pass from "
       "the budget)" for size in IG_BUDGETS},
}
RESULTS = Path(__file__).resolve().parent / "results" / "streaming.csv"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _call(config: str, model, tokens):
    import torch

    import mechnorm

    if config == "forward":
        with torch.inference_mode():
            return model(tokens)
    if config in ("cached", "streamed"):
        return mechnorm.attribute(model, tokens, methods=CACHE_ONLY, stream=config == "streamed")
    if config in ("lens_streamed", "lens_cached", "dla_streamed"):
        from mechnorm.inputs import Batch

        batch = Batch(tokens, torch.ones_like(tokens, dtype=torch.bool))
        if config == "lens_cached":
            logits, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logit_lens"))
            target = mechnorm.predicted(logits, batch.attention_mask)
            del logits
        else:
            target, cache = mechnorm.run_streamed(model, batch, ["dla" if config == "dla_streamed" else "logit_lens"])
        if config == "dla_streamed":
            return mechnorm.direct_logit_attribution(cache, model, target)
        return mechnorm.logit_lens(cache, model, target)
    if config == "ig_all_steps":
        return mechnorm.integrated_gradients(model, tokens, n_steps=IG_STEPS, internal_batch_size=IG_STEPS)
    if config.startswith("ig_budget_"):
        return mechnorm.integrated_gradients(model, tokens, n_steps=IG_STEPS, max_memory=config.removeprefix("ig_budget_").upper())
    return mechnorm.saliency(model, tokens, checkpoint=config == "saliency_checkpoint")


def child(config: str, pos: int, kind: str | None) -> dict:
    """One configuration, measured in this (fresh) process."""
    import warnings

    import torch

    import mechnorm

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = mechnorm.load_model("smollm2-135m", **({"kind": kind} if kind else {}))
    vocab = int(model.cfg.d_vocab)
    tokens = torch.randint(100, vocab - 100, (1, pos))
    _call(config, model, tokens[:, :16])  # warm-up: lazy imports and first-call allocations
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    _call(config, model, tokens)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    return {"config": config, "pos": pos, "kind": type(model).__name__, "seconds": round(seconds, 2),
            "peak_MB": round(peak / 2**20), "rise_MB": round((peak - before) / 2**20), "before_MB": round(before / 2**20)}


def measure_all(configs: list[tuple[str, int]], kind: str | None, log: Path | None = None) -> list[dict]:
    """Each configuration in a fresh subprocess; one JSON row per line appended to ``log``."""
    rows = []
    for config, pos in configs:
        command = [sys.executable, __file__, "--child", config, "--pos", str(pos)] + (["--kind", kind] if kind else [])
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["killed"]
            rows.append({"config": config, "pos": pos, "error": f"exit {done.returncode}: {tail[0][:200]}"})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
        if log is not None:
            with log.open("a") as handle:
                handle.write(json.dumps(rows[-1]) + "\n")
    return rows


def summarise(rows: list[dict]) -> pd.DataFrame:
    """The rows with ratios to the plain forward pass at the same length: the one of the same
    ``run`` where it has one, else the first measured (``reference`` names which)."""
    table = pd.DataFrame(rows)
    if "run" not in table:
        table["run"] = "run"
    forwards = table[(table["config"] == "forward") & table.get("seconds", pd.Series(dtype=float)).notna()]
    for index, row in table.iterrows():
        same = forwards[(forwards["pos"] == row["pos"]) & (forwards["run"] == row["run"])]
        ref = same if len(same) else forwards[forwards["pos"] == row["pos"]]
        if not len(ref) or pd.isna(row.get("seconds")):
            continue
        table.loc[index, "reference"] = ref["run"].iloc[0]
        for column in ("seconds", "peak_MB", "rise_MB"):
            table.loc[index, f"{column}_vs_forward"] = round(row[column] / float(ref[column].iloc[0]), 3)
    table["what"] = table["config"].map(CONFIGS)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pos", type=int, default=2000)
    parser.add_argument("--long", type=int, default=8000, help="length for the streamed long run (0 skips it)")
    parser.add_argument("--kind", default=None, help="hooked or bridge (load_model's default when omitted)")
    # integrated gradients' rows are asked for by name, at 512 tokens (all 8 steps at once need ~12 GB there)
    parser.add_argument("--configs", default=",".join(name for name in CONFIGS if not name.startswith("ig_")))
    parser.add_argument("--log", default=None, help="append each measured row (JSON) to this file")
    parser.add_argument("--merge", nargs="*", default=None, help="summarise rows from --log files instead of measuring")
    parser.add_argument("--append", action="store_true", help="append the rows to the results CSV instead of replacing it")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.pos, args.kind)))
        return
    if args.merge:  # JSON rows of earlier runs (their --log files), summarised together
        rows = [{**json.loads(line), "run": Path(path).stem} for path in args.merge
                for line in Path(path).read_text().splitlines() if line.strip()]
    else:
        configs = [(name, args.pos) for name in args.configs.split(",")]
        if args.long:
            configs += [("forward", args.long), ("streamed", args.long)]
        rows = measure_all(configs, args.kind, Path(args.log) if args.log else None)
    table = summarise(rows)
    RESULTS.parent.mkdir(exist_ok=True)
    if args.append and RESULTS.exists():
        table = pd.concat([pd.read_csv(RESULTS), table], ignore_index=True)
    table.to_csv(RESULTS, index=False)
    print(table.drop(columns=["what"]).to_string(index=False))


if __name__ == "__main__":
    main()
