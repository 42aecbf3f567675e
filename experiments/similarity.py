"""GeLU vs SoLU: representation similarity and stitching of two small models (issue 7).

Two TransformerLens models, identical except ``act_fn="gelu"`` vs ``act_fn="solu_ln"``
(same config, same seed — hence the same initial weights — same data and order), are trained
as language models on a ``mechnorm.tasks`` task (default: number agreement, which a 3-layer
d_model-64 model learns in a few hundred CPU steps; key-value recall, ``--task recall``, needs
far longer than this script's budget to leave chance level). Then, on held-out sequences:

* linear CKA layer x layer within each model and across the two (also debiased, last-token,
  RBF and Procrustes variants of the cross comparison), and the same cross CKA for the two
  *untrained* models as a reference for how much the shared initialisation explains;
* a control model (GeLU, seed + 1; ``--no-control`` to skip) gives the GeLU-vs-GeLU cross
  CKA and stitching gap that any GeLU/SoLU difference has to exceed;
* affine stitching at matched layers in both directions (GeLU→SoLU, SoLU→GeLU), trained on
  B's next-token loss: B's loss through the stitch against B alone, on every position and on
  the task's answer (e.g. ``is``/``are``).

Outputs in ``--out`` (default ``experiments/results``): ``similarity_layers.csv`` (tidy:
comparison, metric, layer_a, layer_b, value), ``similarity_stitching.csv``,
``similarity_training.csv``, ``similarity_summary.txt`` and ``similarity_cka.html``
(``similarity_cka.png`` too when kaleido finds a Chrome to export with).

Usage (CPU, about five minutes; deterministic for a seed)::

    python experiments/similarity.py [--task agreement] [--steps 1000] [--layers 3] [--no-control]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechnorm import tasks
from mechnorm.similarity import layer_similarity, similarity_hooks
from mechnorm.stitching import StitchData, stitch, stitched_loss
from mechnorm.tasks import vocab

PAD = vocab.token_id(vocab.PAD)


def build(act_fn: str, n_layers: int, seed: int) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=32,
        d_vocab=len(vocab.vocabulary()), act_fn=act_fn, normalization_type="LN", seed=seed,
    )
    return HookedTransformer(cfg)


def sequences(examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full training sequences (prompt, answer, continuation, [EOS]) padded right, and the
    position whose next token is the answer (the last prompt token)."""
    rows = [e.sequence() for e in examples]
    length = max(map(len, rows))
    tokens = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    answer_pos = torch.tensor([len(e.tokens) - 1 for e in examples])
    return tokens, mask, answer_pos


def lm_loss(model, tokens, mask) -> torch.Tensor:
    """Plain next-token loss on real tokens: the objective the stitches are trained on too.
    (An extra answer term, as in train_zoo.py, would make a stitch trained on the plain loss
    act as a fine-tune that trades the answer for the other positions.)"""
    logits = model(tokens, attention_mask=mask)
    sel = mask[:, :-1] & mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][sel], tokens[:, 1:][sel])


def train(model, examples, steps: int, batch_size: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps)
    )
    model.train()
    log = []
    for step in range(steps):
        tokens, mask, _ = sequences(examples[step * batch_size : (step + 1) * batch_size])
        loss = lm_loss(model, tokens, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append(loss.item())
    model.eval()
    return log


def answer_mask(mask: torch.Tensor, answer_pos: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(mask)
    out[torch.arange(len(mask)), answer_pos] = True
    return out


def cache(model, batch):
    with torch.inference_mode():
        _, c = model.run_with_cache(
            batch.tokens, attention_mask=batch.attention_mask, names_filter=similarity_hooks(model.cfg.n_layers)
        )
    return c


def tidy(sim, comparison: str) -> pd.DataFrame:
    frame = sim.to_frame().stack().rename("value").reset_index()
    frame.insert(0, "metric", sim.name + ("" if sim.tokens == "all" else f" ({sim.tokens} token)"))
    frame.insert(0, "comparison", comparison)
    frame["n_tokens"] = sim.n_tokens
    return frame


def fmt_matrix(sim) -> str:
    return sim.to_frame().round(3).to_string()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="agreement", choices=tasks.list_tasks())
    parser.add_argument("--steps", type=int, default=1000, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-eval", type=int, default=512, help="held-out prompts for CKA and stitch evaluation")
    parser.add_argument("--n-stitch", type=int, default=2048, help="training sequences for each stitch")
    parser.add_argument("--stitch-steps", type=int, default=200)
    parser.add_argument("--stitch-lr", type=float, default=1e-3)
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the GeLU model with seed+1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    task = tasks.get_task(args.task, seed=args.seed)
    if task.kind != "lm":
        parser.error(f"--task {args.task} is a classification task; pick a language-modelling task")
    train_ex = task.train(args.steps * args.batch_size)
    test_ex = task.test(args.n_eval)

    # ---- models: identical but for the activation; the control differs only by seed
    specs = {"gelu": ("gelu", args.seed), "solu": ("solu_ln", args.seed)}
    if args.control:
        specs["gelu_seed+1"] = ("gelu", args.seed + 1)
    models, untrained, history = {}, {}, []
    for name, (act, seed) in specs.items():
        model = build(act, args.layers, seed)
        untrained[name] = build(act, args.layers, seed).eval()
        t = time.time()
        log = train(model, train_ex, args.steps, args.batch_size, args.lr)
        models[name] = model.eval()
        history += [  # mean over windows of 10 steps, to keep the CSV small
            {"model": name, "step": i + len(log[i : i + 10]), "loss": sum(log[i : i + 10]) / len(log[i : i + 10])}
            for i in range(0, len(log), 10)
        ]
        say(f"trained {name} ({act}, seed {seed}): final train loss {sum(log[-50:]) / 50:.3f} in {time.time() - t:.0f}s")
    assert torch.equal(untrained["gelu"].W_E, untrained["solu"].W_E), "same seed should give the same init"
    pd.DataFrame(history).to_csv(args.out / "similarity_training.csv", index=False)

    # ---- held-out data: prompts for CKA, full sequences for stitching
    prompts = tasks.collate(test_ex)
    tokens, mask, pos = sequences(test_ex)
    eval_answer = StitchData(tokens, mask, answer_mask(mask, pos))
    eval_all = StitchData(tokens, mask)
    st_tokens, st_mask, _ = sequences(task.train(args.n_stitch))  # a prefix of the models' training data
    say(f"task {args.task!r}: {len(train_ex)} training sequences, {len(test_ex)} held out; "
        f"{args.layers} layers, d_model 64; {args.steps} steps of batch {args.batch_size}")
    stitch_train = StitchData(st_tokens, st_mask)

    say()
    for name, model in models.items():
        loss, acc = stitched_loss(model, 0, model, 0, None, eval_answer)
        lm, _ = stitched_loss(model, 0, model, 0, None, eval_all)
        say(f"{name}: held-out answer accuracy {acc:.3f}, answer loss {loss:.3f}, next-token loss {lm:.3f}")

    # ---- CKA and friends
    caches = {name: cache(m, prompts) for name, m in models.items()}
    caches_init = {name: cache(m, prompts) for name, m in untrained.items()}
    am = prompts.attention_mask
    sims = {
        ("gelu", "linear_cka"): layer_similarity(caches["gelu"], attention_mask=am),
        ("solu", "linear_cka"): layer_similarity(caches["solu"], attention_mask=am),
        ("gelu x solu", "linear_cka"): layer_similarity(caches["gelu"], caches["solu"], attention_mask=am),
        ("gelu x solu", "debiased"): layer_similarity(caches["gelu"], caches["solu"], attention_mask=am, debiased=True),
        ("gelu x solu", "last"): layer_similarity(caches["gelu"], caches["solu"], attention_mask=am, tokens="last"),
        ("gelu x solu", "rbf last"): layer_similarity(
            caches["gelu"], caches["solu"], attention_mask=am, tokens="last", metric="rbf_cka", bandwidth=0.8
        ),
        ("gelu x solu", "procrustes"): layer_similarity(caches["gelu"], caches["solu"], attention_mask=am, metric="procrustes"),
        ("gelu x solu (untrained)", "linear_cka"): layer_similarity(
            caches_init["gelu"], caches_init["solu"], attention_mask=am
        ),
    }
    if args.control:
        sims[("gelu x gelu_seed+1", "linear_cka")] = layer_similarity(caches["gelu"], caches["gelu_seed+1"], attention_mask=am)
        sims[("gelu x gelu_seed+1", "last")] = layer_similarity(
            caches["gelu"], caches["gelu_seed+1"], attention_mask=am, tokens="last"
        )
    pd.concat([tidy(s, comp) for (comp, _), s in sims.items()]).to_csv(args.out / "similarity_layers.csv", index=False)
    for (comp, kind), s in sims.items():
        say(f"\n{comp}: {s.name}{'' if s.tokens == 'all' else ', last token'} on {s.n_tokens} tokens (rows A, columns B)")
        say(fmt_matrix(s))

    # ---- stitching at matched layers, both directions
    pairs = [("gelu", "solu"), ("solu", "gelu")] + ([("gelu_seed+1", "gelu")] if args.control else [])
    rows = []
    for a, b in pairs:
        for layer in range(args.layers + 1):
            t = time.time()
            r = stitch(models[a], layer, models[b], layer, stitch_train, eval_dataset=eval_all,
                       steps=args.stitch_steps, lr=args.stitch_lr, seed=args.seed, init="lstsq")
            ans, ans_acc = stitched_loss(models[a], layer, models[b], layer, r.stitch, eval_answer)
            ans_b, ans_acc_b = stitched_loss(models[a], layer, models[b], layer, None, eval_answer)
            rows.append(dict(direction=f"{a}->{b}", **r.to_dict(), answer_loss=ans, answer_loss_b=ans_b,
                             answer_accuracy=ans_acc, answer_accuracy_b=ans_acc_b,
                             train_loss_last20=sum(r.train_losses[-20:]) / max(1, len(r.train_losses[-20:])),
                             seconds=time.time() - t))
    stitching = pd.DataFrame(rows)
    stitching.to_csv(args.out / "similarity_stitching.csv", index=False)
    say("\nstitching at matched layers (held-out sequences; lstsq init, then "
        f"{args.stitch_steps} Adam steps on B's next-token loss). loss = next-token loss on every "
        "position, answer_* on the answer only; *_b = B alone:")
    cols = ["direction", "layer_a", "loss_b", "loss_init", "loss", "loss_gap", "accuracy_b", "accuracy",
            "answer_loss_b", "answer_loss", "answer_accuracy_b", "answer_accuracy"]
    say(stitching[cols].round(3).to_string(index=False))

    # ---- figure
    figs = [
        sims[("gelu", "linear_cka")].plot(title="GeLU model: linear CKA between layers",
                                          xaxis_title="GeLU layer", yaxis_title="GeLU layer"),
        sims[("solu", "linear_cka")].plot(title="SoLU model: linear CKA between layers",
                                          xaxis_title="SoLU layer", yaxis_title="SoLU layer"),
        sims[("gelu x solu", "linear_cka")].plot(title="GeLU (rows) vs SoLU (columns): linear CKA",
                                                 xaxis_title="SoLU layer", yaxis_title="GeLU layer"),
        sims[("gelu x solu", "debiased")].plot(title="GeLU vs SoLU: debiased linear CKA",
                                               xaxis_title="SoLU layer", yaxis_title="GeLU layer"),
    ]
    html = "\n".join(f.to_html(full_html=False, include_plotlyjs="cdn" if i == 0 else False) for i, f in enumerate(figs))
    (args.out / "similarity_cka.html").write_text(f"<html><body>\n{html}\n</body></html>\n")
    try:
        figs[2].write_image(args.out / "similarity_cka.png", scale=2)
        png = "similarity_cka.png written"
    except Exception as exc:  # kaleido >= 1 needs a Chrome/Chromium; there is none offline
        png = f"PNG skipped ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"

    # ---- honest summary
    diag = lambda comp: sims[(comp, "linear_cka")].diagonal()  # noqa: E731
    say("\nsummary")
    say(f"  cross linear CKA at matched layers, trained GeLU vs SoLU: {fmt_list(diag('gelu x solu'))}")
    say(f"  same, untrained (shared init):                           {fmt_list(diag('gelu x solu (untrained)'))}")
    if args.control:
        say(f"  same, GeLU vs GeLU of another seed:                      {fmt_list(diag('gelu x gelu_seed+1'))}")
    say(f"  debiased cross CKA diagonal:                             {fmt_list(sims[('gelu x solu', 'debiased')].diagonal())}")
    say(f"  last-token cross CKA diagonal:                           {fmt_list(sims[('gelu x solu', 'last')].diagonal())}")
    for direction, g in stitching.groupby("direction", sort=False):
        say(f"  stitch {direction}: next-token loss gap by layer {fmt_list(g.loss_gap)} "
            f"(B alone {g.loss_b.iloc[0]:.3f}); answer gap {fmt_list(g.answer_loss - g.answer_loss_b)}, "
            f"answer accuracy {fmt_list(g.answer_accuracy)} vs B alone {g.answer_accuracy_b.iloc[0]:.3f}")
    gap = {d: g.set_index("layer_a").loss_gap for d, g in stitching.groupby("direction", sort=False)}
    say(f"  asymmetry, gap(gelu->solu) - gap(solu->gelu) by layer: {fmt_list(gap['gelu->solu'] - gap['solu->gelu'])}")
    init_gap = {d: list(g.loss_init - g.loss_b) for d, g in stitching.groupby("direction", sort=False)}
    say(f"  lstsq-only (before Adam) next-token gap, gelu->solu {fmt_list(init_gap['gelu->solu'])}, "
        f"solu->gelu {fmt_list(init_gap['solu->gelu'])}")
    say(f"  {png}; run time {time.time() - start:.0f}s")
    (args.out / "similarity_summary.txt").write_text("\n".join(lines) + "\n")


def fmt_list(values) -> str:
    return "[" + ", ".join(f"{float(v):.3f}" for v in values) + "]"


if __name__ == "__main__":
    main()
