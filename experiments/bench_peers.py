"""Peer speed: mechnorm against the routes a researcher would otherwise take, same weights.

A GPT-2-small-shaped model (12 layers, d_model 768, vocab 50257, random weights) is saved
once in HF format, so plain transformers, ``HookedTransformer`` (transformer-lens 3.x only)
and ``TransformerBridge`` all load the same weights. Measured with repeats interleaved, in
one run (min and median seconds):

* saliency and gradient × input: mechnorm's, on each TransformerLens model, against captum's
  ``Saliency`` / ``InputXGradient`` on the plain transformers model through
  ``inputs_embeds`` (the word embeddings, what mechnorm differentiates through
  ``hook_embed``); the scores are checked equal before anything is timed;
* integrated gradients (``--ig-steps``, same internal batch) against captum's;
* forward + cache + all-layer NormXLogit against the plain transformers forward pass
  (its default attention), the fastest forward pass of these weights.

inseq is not measured: its wheel requires CUDA runtime packages and ``typeguard<=2.13.3``,
which conflicts with jaxtyping's and TransformerLens's typeguard; its attribution methods
are captum's on the same ``inputs_embeds`` route, which is measured here.

Usage:
    python experiments/bench_peers.py [--batch 8] [--pos 128] [--repeats 5] [--ig-batch 2] [--ig-steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import mechnorm  # noqa: E402

IG_TOKENS_PER_PASS = 1024  # mechnorm's default internal batch: passes of ~1024 tokens


def save_gpt2_small_shaped(folder: Path, seed: int = 0) -> Path:
    """Random GPT-2-small-shaped weights in HF format (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> pd.DataFrame:
    """Min and median seconds of each callable, repeats interleaved (A, B, C, A, B, C, …)."""
    for fn in candidates.values() if warmup else ():  # warm-up: imports, first backward, allocator
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return pd.DataFrame(
        [{"what": n, "min_s": min(t), "median_s": statistics.median(t)} for n, t in times.items()]
    )


class CaptumRoute:
    """captum on a plain transformers causal LM: the target logit at the last position,
    differentiated with respect to ``inputs_embeds`` (the word embeddings)."""

    def __init__(self, hf_model, tokens):
        self.model, self.tokens = hf_model, tokens
        with torch.no_grad():
            self.embeds = hf_model.get_input_embeddings()(tokens)
            self.target = hf_model(tokens).logits[:, -1].argmax(-1)

    def forward(self, embeds):
        repeats = embeds.shape[0] // self.tokens.shape[0]
        logits = self.model(inputs_embeds=embeds).logits[:, -1]
        return logits.gather(-1, self.target.repeat(repeats)[:, None])[:, 0]

    def saliency(self):
        from captum.attr import Saliency

        return Saliency(self.forward).attribute(self.embeds.clone().requires_grad_(True), abs=False).abs().sum(-1)

    def grad_x_input(self):
        from captum.attr import InputXGradient

        return InputXGradient(self.forward).attribute(self.embeds.clone().requires_grad_(True)).abs().sum(-1)

    def integrated_gradients(self, n_steps: int, internal_batch_size: int):
        from captum.attr import IntegratedGradients

        return IntegratedGradients(self.forward).attribute(
            self.embeds, baselines=torch.zeros_like(self.embeds), n_steps=n_steps, internal_batch_size=internal_batch_size
        ).abs().sum(-1)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ig-batch", type=int, default=2)
    parser.add_argument("--ig-steps", type=int, default=50, help="0 skips integrated gradients")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_peers.csv"))
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    import warnings

    warnings.simplefilter("ignore")  # IG's convergence warning on random weights is beside the point here
    with tempfile.TemporaryDirectory(prefix="mechnorm-bench-") as tmp:
        folder = save_gpt2_small_shaped(Path(tmp) / "gpt2-small-shaped")
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        kinds = ["hooked", "bridge"] if mechnorm.models.hooked_available() else ["bridge"]
        models = {kind: mechnorm.load_model(folder, kind=kind) for kind in kinds}
    torch.manual_seed(0)
    tokens = torch.randint(0, hf.config.vocab_size, (args.batch, args.pos))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    peer = CaptumRoute(hf, tokens)

    candidates: dict[str, Callable[[], object]] = {
        "captum saliency (transformers)": peer.saliency,
        "captum grad_x_input (transformers)": peer.grad_x_input,
    }
    for kind, model in models.items():
        reference = peer.saliency()
        ours = mechnorm.saliency(model, tokens, mask).scores[0]
        torch.testing.assert_close(ours, reference, rtol=2e-3, atol=1e-5)  # same numbers before any timing
        candidates[f"mechnorm saliency ({kind})"] = lambda m=model: mechnorm.saliency(m, tokens, mask)
        candidates[f"mechnorm grad_x_input ({kind})"] = lambda m=model: mechnorm.grad_x_input(m, tokens, mask)
    rows = [interleaved(candidates, args.repeats).assign(batch=f"{args.batch}x{args.pos}")]

    names = mechnorm.hooks_for("normxlogit")
    forward_runs: dict[str, Callable[[], object]] = {"transformers forward": torch.inference_mode()(lambda: hf(tokens))}
    for kind, model in models.items():
        head = mechnorm.UnembedHead(model)

        @torch.inference_mode()
        def normxlogit(model=model, head=head):
            logits, cache = mechnorm.run_with_cache(model, mechnorm.Batch(tokens, mask), names)
            return mechnorm.normxlogit(cache, head, mechnorm.predicted(logits, mask))

        forward_runs[f"{kind} forward"] = torch.inference_mode()(lambda m=model: m(tokens))
        forward_runs[f"{kind} forward+cache+normxlogit"] = normxlogit
    rows.append(interleaved(forward_runs, args.repeats).assign(batch=f"{args.batch}x{args.pos}"))

    if args.ig_steps:
        ig_tokens, ig_mask = tokens[: args.ig_batch], mask[: args.ig_batch]
        internal = args.ig_batch * min(args.ig_steps, max(1, IG_TOKENS_PER_PASS // (args.ig_batch * args.pos)))
        ig_peer = CaptumRoute(hf, ig_tokens)
        ig_runs = {"captum integrated_gradients (transformers)": lambda: ig_peer.integrated_gradients(args.ig_steps, internal)}
        for kind, model in models.items():
            ig_runs[f"mechnorm integrated_gradients ({kind})"] = lambda m=model: mechnorm.integrated_gradients(
                m, ig_tokens, ig_mask, n_steps=args.ig_steps, hold_first=False, internal_batch_size=internal
            )
        rows.append(interleaved(ig_runs, max(1, args.repeats // 2), warmup=False).assign(batch=f"{args.ig_batch}x{args.pos}"))

    frame = pd.concat(rows, ignore_index=True)
    frame["peer"] = frame["what"].map(_peer_of)
    by_name = frame.set_index("what")
    frame["vs_peer_min"] = [
        round(row.min_s / by_name.loc[row.peer, "min_s"], 3) if isinstance(row.peer, str) else None for row in frame.itertuples()
    ]
    frame["vs_peer_median"] = [
        round(row.median_s / by_name.loc[row.peer, "median_s"], 3) if isinstance(row.peer, str) else None for row in frame.itertuples()
    ]
    print(f"GPT-2-small-shaped, {torch.get_num_threads()} threads, transformer-lens {_tl_version()}")
    print(frame.to_string(index=False))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.assign(transformer_lens=_tl_version()).to_csv(out, index=False)
    print(f"wrote {out}")
    return frame


def _peer_of(what: str) -> str | None:
    """The peer row a mechnorm row is compared with."""
    for method in ("saliency", "grad_x_input", "integrated_gradients"):
        if what.startswith(f"mechnorm {method}"):
            return f"captum {method} (transformers)"
    if what.endswith("forward+cache+normxlogit") or what in ("hooked forward", "bridge forward"):
        return "transformers forward"
    return None


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
