"""RepMatch experiments on the shipped tasks and models (issue #17). CPU, small step counts.

    python experiments/repmatch.py                 # everything (~5-10 CPU minutes on 2 cores)
    python experiments/repmatch.py --only speed    # one part: datasets, speed, representative,
                                                   # heuristics, speed, smollm, cka

Writes experiments/results/repmatch_*.{csv,json,html}. Small on purpose: adapters get
60-150 AdamW steps, the zoo models are tiny, SmolLM2-135M gets 20 steps on 64 sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pandas as pd
import torch

import mechnorm
from mechnorm import repmatch, tasks
from mechnorm.repmatch.adapters import with_adapter

OUT = Path(__file__).resolve().parent / "results"
GPT2, BERT = "zoo:gpt2-agree-recall", "zoo:bert-lexicon"
LM_STEPS, CLS_STEPS, REF_STEPS = 60, 60, 150


def log(*args) -> None:
    print(*args, flush=True)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def negated(example) -> bool:
    return bool(example.meta["negator_positions"])


# ----------------------------------------------------------------------------- dataset-to-dataset


def datasets() -> dict:
    """φ between subsets that should be alike and subsets that should not, beside seed-to-seed φ."""
    results = {}
    agreement, recall = tasks.get_task("agreement").train(512), tasks.get_task("recall").train(256)
    gpt2 = repmatch.load_base(GPT2)
    kw = dict(rank=4, steps=LM_STEPS, lr=1e-2)
    lm = {
        "agreement A (seed 0)": repmatch.train_adapter(gpt2, agreement[:256], seed=0, **kw),
        "agreement A (seed 1)": repmatch.train_adapter(gpt2, agreement[:256], seed=1, **kw),
        "agreement B (seed 0)": repmatch.train_adapter(gpt2, agreement[256:], seed=0, **kw),
        "recall (seed 0)": repmatch.train_adapter(gpt2, recall, seed=0, **kw),
    }
    results["gpt2"] = repmatch.similarity_matrix(lm)

    lexicon = tasks.get_task("lexicon").train(1500)
    plain, neg = [e for e in lexicon if not negated(e)], [e for e in lexicon if negated(e)]
    n = min(len(plain) // 2, len(neg), 300)
    bert = repmatch.load_base(BERT)
    kw = dict(rank=4, steps=CLS_STEPS, lr=1e-2)
    cls = {
        "no negation A (seed 0)": repmatch.train_adapter(bert, plain[:n], seed=0, **kw),
        "no negation A (seed 1)": repmatch.train_adapter(bert, plain[:n], seed=1, **kw),
        "no negation B (seed 0)": repmatch.train_adapter(bert, plain[n : 2 * n], seed=0, **kw),
        "with negation (seed 0)": repmatch.train_adapter(bert, neg[:n], seed=0, **kw),
    }
    results["bert"] = repmatch.similarity_matrix(cls)
    rows = []
    for model, sims in results.items():
        frame = sims.mean()
        frame.to_csv(OUT / f"repmatch_datasets_{model}.csv")
        sims.plot(title=f"RepMatch φ between data subsets ({model})").write_html(
            OUT / f"repmatch_datasets_{model}.html", include_plotlyjs="cdn")
        names = list(frame.index)
        rows += [dict(model=model, a=names[i], b=names[j], phi=frame.iloc[i, j])
                 for i in range(len(names)) for j in range(i + 1, len(names))]
        log(f"\n{model}: mean φ\n{frame.round(3).to_string()}")
    table = pd.DataFrame(rows)
    table.to_csv(OUT / "repmatch_datasets.csv", index=False)
    return {"gpt2": results["gpt2"], "gpt2_adapters": lm, "table": table}


# ----------------------------------------------------------------------------- representative subsets


def representative(bert=None, pool=None, reference=None) -> pd.DataFrame:
    """Train on the top-k instances by RepMatch score vs random k; held-out accuracy."""
    bert = bert or repmatch.load_base(BERT)
    pool = pool or tasks.get_task("lexicon").train(1000)
    reference = reference or repmatch.train_adapter(bert, pool, rank=4, steps=REF_STEPS, lr=1e-2, seed=0)
    scores = repmatch.instance_similarity(bert, pool, reference, progress=True).score.numpy()
    test = tasks.get_task("lexicon").test(500)
    order = np.argsort(-scores, kind="stable")
    labels = np.array([e.answer for e in pool])
    rows = []
    for k in (16, 32, 64):
        balanced = np.concatenate([order[labels[order] == c][: k // 2] for c in (0, 1)])
        subsets = {"top-k": order[:k], "top-k class-balanced": balanced}
        for seed in range(3):
            subsets[f"random {seed}"] = np.random.default_rng(seed).choice(len(pool), k, replace=False)
        for name, index in subsets.items():
            for seed in range(2 if name.startswith("top") else 1):
                adapter = repmatch.train_adapter(bert, [pool[i] for i in index], rank=4, steps=CLS_STEPS, lr=1e-2,
                                                 seed=seed, batch_size=16)
                acc = repmatch.accuracy(bert, with_adapter(bert, adapter), test)
                rows.append(dict(k=k, subset=name.split(" ")[0] if name.startswith("random") else name,
                                 subset_seed=name, train_seed=seed, accuracy=acc,
                                 positive_fraction=float(labels[index].mean())))
                log(f"k={k:3d} {name:22s} train seed {seed}: accuracy {acc:.3f}")
    frame = pd.DataFrame(rows)
    frame.to_csv(OUT / "repmatch_representative.csv", index=False)
    summary = frame.groupby(["k", "subset"])["accuracy"].agg(["mean", "std", "count"]).round(3)
    log(f"\n{summary.to_string()}")
    summary.to_csv(OUT / "repmatch_representative_summary.csv")
    return frame


# ----------------------------------------------------------------------------- heuristics


def heuristics() -> dict:
    """Do instance scores separate the examples whose label a negator decides from the rest?"""
    bert = repmatch.load_base(BERT)
    lexicon = tasks.get_task("lexicon").train(1600)
    plain = [e for e in lexicon if not negated(e)]
    reference = repmatch.train_adapter(bert, plain[:600], rank=4, steps=REF_STEPS, lr=1e-2, seed=0)
    probe = tasks.get_task("lexicon", seed=1).train(600)
    groups = ["negator decides" if negated(e) else "no negator" for e in probe]
    scores = repmatch.instance_similarity(bert, probe, reference)
    is_neg = np.array([g == "negator decides" for g in groups])
    by_layer = scores.by_layer()
    out = {"n": {g: int(sum(x == g for x in groups)) for g in set(groups)},
           "mean_score": {g: float(scores.score.numpy()[is_neg == (g == "negator decides")].mean()) for g in set(groups)},
           "auroc_overall": auroc(scores.score.numpy()[is_neg], scores.score.numpy()[~is_neg]),
           "auroc_by_layer": {int(l): auroc(by_layer[l].to_numpy()[is_neg], by_layer[l].to_numpy()[~is_neg]) for l in by_layer},
           "auroc_by_matrix": {f"{l}.{m}": auroc(scores.values[:, k].numpy()[is_neg], scores.values[:, k].numpy()[~is_neg])
                               for k, (l, m) in enumerate(scores.matrices)}}
    scores.plot(groups=groups, title="Instance scores vs an adapter trained without negation").write_html(
        OUT / "repmatch_heuristics.html", include_plotlyjs="cdn")
    frame = scores.to_frame()
    frame["group"] = [groups[i] for i in frame["instance"]]
    frame.to_csv(OUT / "repmatch_heuristics.csv", index=False)
    log(f"\nheuristics: {json.dumps(out, indent=1)}")
    return out


# ----------------------------------------------------------------------------- speed


def speed() -> dict:
    """Vectorised instance scores for 1,000 instances vs the reload-and-step loop (timed on 100, extrapolated)."""
    bert = repmatch.load_base(BERT)
    pool = tasks.get_task("lexicon").train(1000)
    reference = repmatch.train_adapter(bert, pool, rank=4, steps=REF_STEPS, lr=1e-2, seed=0)
    n_loop = 100
    fast_times, loop_times = [], []
    for _ in range(2):  # interleaved repeats; report the faster of each
        t = time.perf_counter()
        fast = repmatch.instance_similarity(bert, pool, reference)
        fast_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        slow = repmatch.instance_similarity_loop(bert, pool[:n_loop], reference)
        loop_times.append(time.perf_counter() - t)
    diff = (fast.values[:n_loop] - slow.values).abs()
    out = dict(n=len(pool), threads=torch.get_num_threads(), vectorised_s=min(fast_times),
               loop_s_per_instance=min(loop_times) / n_loop, loop_s_extrapolated=min(loop_times) / n_loop * len(pool),
               max_abs_diff_phi=float(diff.max()), mean_abs_diff_phi=float(diff.mean()),
               spearman_fast_vs_loop=float(pd.Series(fast.score[:n_loop].numpy()).corr(pd.Series(slow.score.numpy()), method="spearman")))
    out["speedup"] = out["loop_s_extrapolated"] / out["vectorised_s"]
    log(f"\nspeed: {json.dumps(out, indent=1)}")
    return out, bert, pool, reference


# ----------------------------------------------------------------------------- SmolLM2


def smollm() -> dict:
    """LoRA on SmolLM2-135M's q/v projections: two agreement halves vs recall, and instance scores."""
    base = repmatch.load_base("smollm2-135m")
    text = lambda e: f"{e.text} {e.answer_text}"  # noqa: E731
    agreement = [text(e) for e in tasks.get_task("agreement").train(64)]
    recall = [text(e) for e in tasks.get_task("recall").train(32)]
    kw = dict(rank=4, steps=20, lr=1e-3, batch_size=8)
    t = time.perf_counter()
    adapters = {"agreement A": repmatch.train_adapter(base, agreement[:32], seed=0, **kw),
                "agreement B": repmatch.train_adapter(base, agreement[32:], seed=0, **kw),
                "agreement A (seed 1)": repmatch.train_adapter(base, agreement[:32], seed=1, **kw),
                "recall": repmatch.train_adapter(base, recall, seed=0, **kw)}
    train_s = (time.perf_counter() - t) / len(adapters)
    sims = repmatch.similarity_matrix(adapters)
    sims.mean().to_csv(OUT / "repmatch_smollm2.csv")
    sims.plot(title="RepMatch φ on SmolLM2-135M (q/v, rank 4, 20 steps)").write_html(OUT / "repmatch_smollm2.html", include_plotlyjs="cdn")
    t = time.perf_counter()
    scores = repmatch.instance_similarity(base, agreement[:16] + recall[:16], adapters["agreement A"], chunk_size=8)
    inst_s = time.perf_counter() - t
    s = scores.score.numpy()
    out = dict(train_s_per_adapter=train_s, instance_scores_s_for_32=inst_s, phi=sims.mean().round(4).to_dict(),
               instance_score_mean={"agreement": float(s[:16].mean()), "recall": float(s[16:].mean())},
               auroc_agreement_vs_recall=auroc(s[:16], s[16:]), n_matrices=len(sims.matrices))
    log(f"\nsmollm2: {json.dumps(out, indent=1)}")
    return out


# ----------------------------------------------------------------------------- CKA tie-in


def cka(adapters: dict | None = None) -> pd.DataFrame:
    """Linear CKA (mechnorm.layer_similarity) between models fine-tuned on two subsets, beside φ."""
    from mechnorm.similarity import similarity_hooks

    gpt2 = repmatch.load_base(GPT2)
    if adapters is None:
        agreement, recall = tasks.get_task("agreement").train(512), tasks.get_task("recall").train(256)
        kw = dict(rank=4, steps=LM_STEPS, lr=1e-2)
        adapters = {"agreement A (seed 0)": repmatch.train_adapter(gpt2, agreement[:256], seed=0, **kw),
                    "agreement B (seed 0)": repmatch.train_adapter(gpt2, agreement[256:], seed=0, **kw),
                    "recall (seed 0)": repmatch.train_adapter(gpt2, recall, seed=0, **kw)}
    probe = tasks.collate(tasks.get_task("agreement").test(64) + tasks.get_task("recall").test(64))
    batch = mechnorm.Batch(probe.tokens, probe.attention_mask)
    kind = "hooked" if mechnorm.models.hooked_available() else "bridge"
    caches, deltas = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, adapter in adapters.items():
            folder = Path(tmp) / name.replace(" ", "_").replace("(", "").replace(")", "")
            repmatch.merged(gpt2, adapter).save_pretrained(folder)
            gpt2.tokenizer.save_pretrained(folder)
            model = mechnorm.load_model(str(folder), kind=kind)
            _, caches[name] = mechnorm.run_with_cache(model, batch, names_filter=similarity_hooks(model.cfg.n_layers))
    names = list(adapters)
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            sim = mechnorm.layer_similarity(caches[names[i]], caches[names[j]], attention_mask=probe.attention_mask)
            phi = repmatch.subspace_similarity(adapters[names[i]], adapters[names[j]])
            rows.append(dict(a=names[i], b=names[j], phi=phi.mean, cka_diagonal_mean=float(sim.diagonal().mean()),
                             cka_final_layer=float(sim.diagonal()[-1]), kind=kind))
    frame = pd.DataFrame(rows)
    frame.to_csv(OUT / "repmatch_cka.csv", index=False)
    log(f"\nCKA vs φ:\n{frame.round(4).to_string(index=False)}")
    return frame


PARTS = ("datasets", "speed", "representative", "heuristics", "smollm", "cka")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    summary_file = OUT / "repmatch_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    start = time.perf_counter()
    shared = {}
    for part in args.only:
        t = time.perf_counter()
        if part == "datasets":
            result = datasets()
            shared["gpt2_adapters"] = {k: v for k, v in result["gpt2_adapters"].items() if "seed 1" not in k}
            summary["datasets"] = result["table"].round(4).to_dict(orient="records")
        elif part == "speed":
            summary["speed"], *shared["bert"] = speed()
        elif part == "representative":
            frame = representative(*shared.get("bert", ()))
            summary["representative"] = frame.groupby(["k", "subset"])["accuracy"].mean().round(4).reset_index().to_dict(orient="records")
        elif part == "heuristics":
            summary["heuristics"] = heuristics()
        elif part == "smollm":
            try:
                summary["smollm2"] = smollm()
            except FileNotFoundError as error:  # not fetched: say so, run the rest
                log(f"smollm2 skipped: {error}")
        elif part == "cka":
            summary["cka"] = cka(shared.get("gpt2_adapters")).round(4).to_dict(orient="records")
        summary.setdefault("seconds", {})[part] = round(time.perf_counter() - t, 1)
        log(f"[{part}: {time.perf_counter() - t:.0f} s]")
    summary["settings"] = dict(lm_steps=LM_STEPS, cls_steps=CLS_STEPS, ref_steps=REF_STEPS, rank=4, instance_rank=1,
                               threads=1, torch=torch.__version__)
    summary_file.write_text(json.dumps(summary, indent=1))
    log(f"total {time.perf_counter() - start:.0f} s; wrote {summary_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
