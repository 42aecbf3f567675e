"""Every registered method on a low-precision model (bfloat16, float16) and on CUDA, against float32.

The model is loaded in each dtype; the float32 model's prediction is the target every run
explains, so the runs compare the same quantity. Results must come back on the CPU in
float32, and stay within a tolerance set by the dtype's unit roundoff ``u`` (bfloat16
2^-8, float16 2^-11): a relative L2 error of at most 16·u for the methods that read one
forward pass, 64·u for integrated gradients (a sum over the path of gradients, each
carrying its own rounding), and the same top token wherever float32's top two are clearly
apart. CPU kernels exist for every op in both dtypes in torch 2.x, so nothing is upcast.
The ``cuda`` cases run the low-precision model on a GPU and are skipped where none exists.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import KINDS, TEXTS

import mechnorm

pytestmark = pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning")

METHODS = [name for name in mechnorm.list_methods().name if name != "logit_lens"]  # the lens: its own test below
ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
CASES = [("gpt2-agree-recall", kind) for kind in KINDS] + [("llama-agree-recall", "bridge")]
_RUNS: dict = {}


def _run(zoo: str, kind: str, dtype: torch.dtype, device: str, target=None):
    """(Comparison of every method, lens, target) for the zoo model in ``dtype`` on ``device``; memoised."""
    key = (zoo, kind, dtype, device)
    if key not in _RUNS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mechnorm.load_model(mechnorm.zoo.path(zoo), kind=kind, dtype=dtype, device=device)
        batch = mechnorm.tokenize(model, TEXTS[:2])
        if target is None:
            with torch.inference_mode():
                logits = model(batch.tokens.to(device), attention_mask=batch.attention_mask.long().to(device))
            target = mechnorm.predicted(logits, batch.attention_mask)
        with warnings.catch_warnings():  # 8 IG steps do not converge; the dtypes are compared, not IG
            warnings.simplefilter("ignore")
            comp = mechnorm.attribute(model, batch, methods=METHODS, target=target, stream=False,
                                      options={"integrated_gradients": {"n_steps": 8}})
        _, cache = mechnorm.run_with_cache(model, batch, mechnorm.hooks_for("logit_lens"))
        lens = mechnorm.logit_lens(cache, mechnorm.UnembedHead(model), target=target, positions="all",
                                   attention_mask=batch.attention_mask, dtype=dtype)  # the unembedding in dtype too
        _RUNS[key] = comp, lens, target
    return _RUNS[key]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("zoo,kind", CASES)
def test_every_method_in_low_precision_matches_float32(zoo, kind, dtype, device):
    reference, _, target = _run(zoo, kind, torch.float32, "cpu")
    low, _, _ = _run(zoo, kind, dtype, device, target)
    u = ROUNDOFF[dtype]
    for name in METHODS:
        ref, got = reference[name], low[name]
        assert got.scores.device.type == "cpu" and got.scores.dtype == torch.float32, name
        assert torch.equal(got.mask, ref.mask), name
        real = ref.mask
        x, y = ref.scores[:, real], got.scores[:, real]  # every layer, real positions
        assert torch.isfinite(y).all(), name
        tolerance = (64 if name == "integrated_gradients" else 16) * u
        assert float((y - x).norm() / x.norm()) <= tolerance, (name, float((y - x).norm() / x.norm()), tolerance)
        # the top token agrees wherever float32's top two are apart by more than the tolerance
        for row in range(ref.scores.shape[1]):
            scores = ref.scores[-1, row][real[row]]
            top2 = scores.topk(2).values
            if top2[0] - top2[1] > 2 * tolerance * scores.abs().max():
                assert got.scores[-1, row][real[row]].argmax() == scores.argmax(), (name, row)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_logit_lens_in_low_precision_matches_float32(dtype, device):
    zoo, kind = CASES[0]
    _, reference, target = _run(zoo, kind, torch.float32, "cpu")
    _, lens, _ = _run(zoo, kind, dtype, device, target)
    assert lens.entropy.device.type == "cpu" and lens.entropy.dtype == torch.float32
    real = reference.mask
    u = ROUNDOFF[dtype]
    for name in ("target_prob", "entropy"):
        x, y = getattr(reference, name)[:, real], getattr(lens, name)[:, real]
        assert float((y - x).norm() / x.norm()) <= 16 * u, name
    # KL from the final layer: absolute, as it is 0 at the final layer
    assert (lens.kl[:, real] - reference.kl[:, real]).abs().max() <= 16 * u * reference.entropy[:, real].abs().max()


def test_load_model_passes_device_map_and_n_devices_to_transformer_lens(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    seen = {}
    boot = TransformerBridge.boot_transformers

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return boot(*args, **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", spy)
    path = mechnorm.zoo.path("llama-agree-recall")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mechnorm.load_model(path, kind="bridge", device_map="cpu")
    assert seen["device_map"] == "cpu" and seen["device"] is None  # the bridge takes one or the other
    assert next(model.parameters()).device.type == "cpu"
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mechnorm.load_model(path, kind="bridge", n_devices=1)
    assert seen["n_devices"] == 1 and model.cfg.n_devices == 1


if "hooked" in KINDS:  # transformer-lens 4.x has no HookedTransformer: nothing to generate there

    def test_hooked_model_takes_n_devices_and_refuses_device_map():
        path = mechnorm.zoo.path("gpt2-agree-recall")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mechnorm.load_model(path, kind="hooked", n_devices=1)
        assert model.cfg.n_devices == 1
        with pytest.raises(ValueError, match="kind='bridge'"):
            mechnorm.load_model(path, kind="hooked", device_map="auto")


def test_bench_gpu_dry_run_writes_its_table(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    script = Path(__file__).parents[1] / "experiments" / "bench_gpu.py"
    out = tmp_path / "gpu.csv"
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--lengths", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    frame = pd.read_csv(out)
    assert set(frame.method) == {"normxlogit", "logit_lens", "saliency", "integrated_gradients"}
    assert (frame.seq_len == 8).all() and sorted(frame.batch.unique()) == [1, 2]  # doubling up to the dry run's cap
    # tokens/s is batch · length / seconds (both rounded in the table)
    assert ((frame.tokens_per_s - frame.batch * frame.seq_len / frame.seconds).abs() <= 1e-2 * frame.tokens_per_s).all()
    largest = frame[frame.largest]
    assert len(largest) == 4 and (largest.batch == 2).all() and (largest.stopped == "cap").all()
