"""attribute(): one cached pass per batch, every method as if called alone, and rank agreement."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import KINDS, TEXTS

import mechnorm
import mechnorm.compare as compare

pytestmark = [
    pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning"),
    pytest.mark.filterwarnings("ignore:Integrated gradients did not converge"),
]
FAST = {"integrated_gradients": {"n_steps": 4}}


def _direct(model, batch, methods, target=None):
    """Each method called on its own, on a full cache, for the whole batch."""
    logits, cache = mechnorm.run_with_cache(model, batch)
    target = target or mechnorm.predicted(logits, batch.attention_mask, tokenizer=model.tokenizer)
    head = mechnorm.UnembedHead(model)
    mask = batch.attention_mask
    calls = {
        "normxlogit": lambda: mechnorm.normxlogit(cache, head, target, attention_mask=mask),
        "logat": lambda: mechnorm.logat(cache, head, target, attention_mask=mask),
        "embedding_norm": lambda: mechnorm.embedding_norm(cache, attention_mask=mask),
        "rollout": lambda: mechnorm.attention_rollout(cache, attention_mask=mask, target=target),
        "attention": lambda: mechnorm.attention_weights(cache, attention_mask=mask, target=target),
        "saliency": lambda: mechnorm.saliency(model, batch, target=target),
        "grad_x_input": lambda: mechnorm.grad_x_input(model, batch, target=target),
        "integrated_gradients": lambda: mechnorm.integrated_gradients(model, batch, target=target, n_steps=4),
    }
    return {name: calls[name]() for name in methods}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_every_method_equals_calling_it_alone(load, kind, side):
    model = load("gpt2", kind)
    methods = (*compare.DEFAULT_METHODS, "attention")
    comp = mechnorm.attribute(model, TEXTS, methods=methods, batch_size=2, padding_side=side, options=FAST)
    batch = mechnorm.tokenize(model, TEXTS, padding_side=side)
    assert comp.methods == list(methods) and torch.equal(comp.batch.tokens, batch.tokens)
    for name, expected in _direct(model, batch, methods).items():
        got = comp[name]
        assert got.method == name and got.layers == expected.layers
        torch.testing.assert_close(got.scores, expected.scores, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert got.tokens == batch.strings and got.target_labels == expected.target_labels


def test_one_forward_pass_per_batch_with_the_union_of_hooks(load, monkeypatch):
    model = load("llama")
    calls = []

    def counting(model, batch, names_filter=None):
        calls.append(names_filter)
        return mechnorm.run_with_cache(model, batch, names_filter=names_filter)

    monkeypatch.setattr(compare, "run_with_cache", counting)
    comp = mechnorm.attribute(model, TEXTS, methods=("normxlogit", "rollout"), batch_size=2, stream=False)
    assert len(calls) == 2  # 3 texts in batches of 2
    assert calls[0] == mechnorm.hooks_for("normxlogit", "rollout")
    assert len(comp) == 2
    # gradient methods start from the cached hook_embed: the model's forward is not run again for it
    calls.clear()
    forwards = []
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: forwards.append(1) or type(model).run_with_cache(model, *a, **k))
    comp = mechnorm.attribute(model, TEXTS, methods=("rollout", "saliency"), batch_size=2, stream=False)
    assert len(calls) == 2 and calls[0](mechnorm.residual.token_embed_hook(model)) and len(forwards) == 2


def test_batching_and_input_forms_do_not_change_scores(load):
    model = load("neox", "bridge")
    methods = ("normxlogit", "rollout", "grad_x_input")
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    whole = mechnorm.attribute(model, TEXTS, methods=methods, batch_size=8, padding_side="left")
    singles = mechnorm.attribute(model, batch, methods=methods, batch_size=1)
    ids = mechnorm.attribute(model, batch.tokens, methods=methods, attention_mask=batch.attention_mask, batch_size=2)
    for name in methods:
        torch.testing.assert_close(singles[name].scores, whole[name].scores, atol=1e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(ids[name].scores, whole[name].scores, atol=1e-5, rtol=1e-5, equal_nan=True)
    one = mechnorm.attribute(model, TEXTS[0], methods=("normxlogit",))
    torch.testing.assert_close(one["normxlogit"].scores[:, 0], whole["normxlogit"].scores[:, 0, -one.batch.tokens.shape[1]:])


def test_given_target_is_used_by_every_method(load):
    model = load("gpt2")
    target = mechnorm.token_target(" cabinet", model)
    methods = ("logat", "grad_x_input")
    comp = mechnorm.attribute(model, TEXTS, methods=methods, target=target, batch_size=2)
    batch = mechnorm.tokenize(model, TEXTS)
    for name, expected in _direct(model, batch, methods, target=target).items():
        torch.testing.assert_close(comp[name].scores, expected.scores, atol=1e-5, rtol=1e-5, equal_nan=True)
    per_sequence = mechnorm.token_target([5, 6, 7])
    comp = mechnorm.attribute(model, TEXTS, methods=("logat",), target=per_sequence, batch_size=2)
    expected = _direct(model, batch, ("logat",), target=per_sequence)["logat"]
    torch.testing.assert_close(comp["logat"].scores, expected.scores, equal_nan=True)


def _comparison(rows: dict[str, torch.Tensor], mask: torch.Tensor) -> mechnorm.Comparison:
    attrs = {name: mechnorm.Attribution(scores=s[None], layers=(0,), mask=mask, method=name) for name, s in rows.items()}
    return mechnorm.Comparison(attrs, mechnorm.Batch(torch.zeros(mask.shape, dtype=torch.long), mask))


def test_agreement_analytic_cases():
    mask = torch.tensor([[True, True, True, True, False], [False, True, True, True, True]])
    a = torch.tensor([[1.0, 2, 3, 4, 99], [0, 5, 1, 3, 2]])
    comp = _comparison({"a": a, "same_order": a * 10 + 1, "reversed": -a, "constant": torch.ones(2, 5)}, mask)
    table = comp.agreement()
    assert table.loc["a", "same_order"] == pytest.approx(1.0)
    assert table.loc["a", "reversed"] == pytest.approx(-1.0)
    assert np.isnan(table.loc["a", "constant"])  # no usable sequence
    assert (np.diag(table.values) == 1).all() and table.equals(table.T)


def test_agreement_equals_pandas_spearman_averaged(load):
    model = load("gpt2")
    comp = mechnorm.attribute(model, TEXTS, methods=("normxlogit", "rollout", "saliency"), padding_side="left")
    mask = comp.batch.attention_mask
    table = comp.agreement()
    def spearman(a, b, layer, i):
        x, y = comp[a].row(layer)[i][mask[i]].numpy(), comp[b].row(layer)[i][mask[i]].numpy()
        return pd.Series(x).corr(pd.Series(y), method="spearman")

    rho = [spearman("normxlogit", "saliency", -1, i) for i in range(len(TEXTS))]
    assert table.loc["normxlogit", "saliency"] == pytest.approx(np.mean(rho))
    # an earlier layer of the layer-wise methods; single-row methods keep their row
    early = comp.agreement(layer=1)
    rho = [spearman("normxlogit", "rollout", 1, i) for i in range(len(TEXTS))]
    assert early.loc["normxlogit", "rollout"] == pytest.approx(np.mean(rho))
    assert early.loc["normxlogit", "saliency"] != pytest.approx(table.loc["normxlogit", "saliency"])


def test_to_frame_stacks_every_method(load):
    model = load("llama", "bridge")
    comp = mechnorm.attribute(model, TEXTS, methods=("normxlogit", "embedding_norm", "integrated_gradients"), options=FAST)
    frame = comp.to_frame()
    n_real = int(comp.batch.attention_mask.sum())
    counts = frame.groupby("method").size()
    assert counts["normxlogit"] == (model.cfg.n_layers + 1) * n_real
    assert counts["embedding_norm"] == counts["integrated_gradients"] == n_real
    assert list(frame.columns) == ["method", "layer", "batch", "pos", "token", "score", "protected"]
    assert set(comp.seconds) == {"forward", "normxlogit", "embedding_norm", "integrated_gradients"}
    assert comp["integrated_gradients"].metadata["convergence_delta"].shape == (len(TEXTS),)


def test_progress_bar_only_for_long_runs(load, capsys):
    model = load("gpt2")
    mechnorm.attribute(model, TEXTS * 2, methods=("embedding_norm",), batch_size=1)
    assert "mechnorm.attribute" in capsys.readouterr().err
    mechnorm.attribute(model, TEXTS, methods=("embedding_norm",), batch_size=1)
    assert "mechnorm.attribute" not in capsys.readouterr().err


def test_errors_name_the_fix(load, monkeypatch):
    model = load("gpt2")
    with pytest.raises(KeyError, match="Known methods"):
        mechnorm.attribute(model, TEXTS, methods=("normxlogits",))
    with monkeypatch.context() as patched:  # a readout is refused before any forward pass
        for runner in ("run_streamed", "run_with_cache"):
            patched.setattr(f"mechnorm.compare.{runner}", lambda *a, **k: pytest.fail("the model ran"))
        with pytest.raises(TypeError, match="LensResult.*mechnorm.logit_lens.*run_streamed"):
            mechnorm.attribute(model, TEXTS, methods=("normxlogit", "logit_lens"), stream=True)
    with pytest.raises(ValueError, match="options given for methods not run"):
        mechnorm.attribute(model, TEXTS, methods=("rollout",), options=FAST)
    with pytest.raises(ValueError, match="does not take options"):
        mechnorm.attribute(model, TEXTS, methods=("rollout",), options={"rollout": {"n_steps": 3}})
    with pytest.raises(ValueError, match="batch_size"):
        mechnorm.attribute(model, TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="entries but there are 3 sequences"):
        mechnorm.attribute(model, TEXTS, methods=("logat",), target=mechnorm.token_target([5, 6]))
    with pytest.raises(KeyError, match="has \\['rollout'\\]"):
        mechnorm.attribute(model, TEXTS, methods=("rollout",))["saliency"]
