"""Speed and memory of NormXLogit on a GPT-2-small-shaped model (random weights), CPU.

(a) ``run_with_cache`` with ``hooks_for("normxlogit")`` + all-layer NormXLogit, against one
    plain forward pass (goal: at most 1.10x);
(b) all-layer LogAt against the naive route: ``cache.accumulated_resid()`` through the final
    norm, ``@ W_U``, then indexing the target, which materialises ``[layer, batch, pos, vocab]``.

(c) every baseline (logit lens, rollout, attention, saliency, grad x input, integrated
    gradients) against the same forward pass, through ``bench_baselines``.

Every figure comes from one run, with repeats interleaved. Usage:

    python experiments/bench_core.py [--batch 8] [--pos 128] [--repeats 5] [--ig-steps 50] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import mechnorm  # noqa: E402
from bench_baselines import bench_baselines  # noqa: E402
from benchutil import compare, table  # noqa: E402


def gpt2_small_shaped(seed: int = 0):
    """12 layers, d_model 768, 12 heads, vocab 50257, LayerNorm; random weights.

    A HookedTransformer where transformer-lens has one (3.x); on 4.x, which removed it, a random
    HF GPT-2 of the same shape through the TransformerBridge.
    """
    if not mechnorm.models.hooked_available():
        import tempfile

        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory(prefix="mechnorm-bench-") as tmp:
            GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_inner=3072, vocab_size=50257,
                                       n_positions=1024, activation_function="gelu_new")).save_pretrained(tmp)
            return mechnorm.load_model(tmp, kind="bridge")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257, n_ctx=1024,
        act_fn="gelu_new", normalization_type="LN", seed=seed, device="cpu",
    )
    return HookedTransformer(cfg).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--parts", default="abc", help="which parts to run, e.g. 'a' or 'ab' (default abc)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = gpt2_small_shaped()
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.pos))
    names = mechnorm.hooks_for("normxlogit")
    head = mechnorm.UnembedHead(model)
    frozen_head = mechnorm.UnembedHead(model, ln="frozen")

    @torch.inference_mode()
    def plain_forward():
        return model(tokens)

    @torch.inference_mode()
    def forward_and_normxlogit():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
        return mechnorm.normxlogit(cache, head, mechnorm.predicted(logits))

    print(f"GPT-2-small-shaped model, batch {args.batch} x {args.pos} tokens, {torch.get_num_threads()} threads")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measured_a = compare({"forward": plain_forward, "forward+cache+normxlogit": forward_and_normxlogit}, args.repeats)
    part_a = table(measured_a, "forward")
    print(part_a.to_string(index=False))
    part_a.to_csv(out / "bench_core_forward.csv", index=False)
    if "b" not in args.parts and "c" not in args.parts:
        return

    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens)  # full cache: the naive route needs every resid_pre
        target = mechnorm.predicted(logits)

    @torch.inference_mode()
    def naive_lens_then_index():
        # accumulated_resid(apply_ln=True) only centres and divides by the final scale (it assumes
        # fold_ln), so on unprocessed weights the model's own ln_final is applied here instead.
        stack = model.ln_final(cache.accumulated_resid())  # [layer, batch, pos, d_model]
        full = stack @ model.W_U + model.b_U  # [layer, batch, pos, vocab]
        index = target.ids.view(1, -1, 1, 1).expand(full.shape[0], -1, full.shape[2], 1)
        return full.gather(-1, index)[..., 0]

    @torch.inference_mode()
    def logat_recompute():
        return mechnorm.logat(cache, head, target)

    @torch.inference_mode()
    def logat_frozen():
        return mechnorm.logat(cache, frozen_head, target)

    torch.testing.assert_close(naive_lens_then_index(), logat_recompute().scores, rtol=1e-3, atol=1e-3)
    part_b = table(
        compare({"naive accumulated_resid @ W_U": naive_lens_then_index, "logat (ln=recompute)": logat_recompute, "logat (ln=frozen)": logat_frozen}, args.repeats),
        "naive accumulated_resid @ W_U",
    )
    print(part_b.to_string(index=False))
    part_b.to_csv(out / "bench_core_logat.csv", index=False)
    print(f"wrote {out}/bench_core_forward.csv and bench_core_logat.csv")
    if "c" not in args.parts:
        return
    del cache
    forward, with_normxlogit = measured_a
    part_c = pd.DataFrame(
        bench_baselines(model, tokens, forward.seconds, forward.peak_bytes, with_normxlogit.seconds, args.ig_steps, live_peak=True)
    )
    print(part_c.to_string(index=False))
    part_c.to_csv(out / "bench_baselines.csv", index=False)
    print(f"wrote {out}/bench_baselines.csv")


if __name__ == "__main__":
    main()
