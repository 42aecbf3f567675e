"""evaluate.run: one tidy frame whose numbers equal the single-metric functions, invariant to
padding and batch size; the metric registry and the summary table."""

from __future__ import annotations

import pytest
import torch

import mechnorm
from mechnorm import evaluate, tasks

METHODS = ["normxlogit", "embedding_norm", "random"]
TEXTS = ["the keys to the old cabinet", "the key", "a dog near the red tables runs and"]
CUES = [[2], [2], [2, 5]]  # positions with BOS included, as in mechnorm.tasks



def dataset(model, side="right"):
    batch = mechnorm.tokenize(model, TEXTS, padding_side=side)
    shift = (~batch.attention_mask).sum(-1) if side == "left" else torch.zeros(3, dtype=torch.long)
    cues = [[p + int(s) for p in row] for row, s in zip(CUES, shift)]
    return {"tokens": batch.tokens, "attention_mask": batch.attention_mask, "cue_positions": cues,
            "labels": torch.tensor([14, 13, 20])}


@pytest.fixture(scope="module")
def frame(model_dirs):
    model = mechnorm.load_model(model_dirs["gpt2"])
    return model, evaluate.run(model, dataset(model), METHODS, ks=(0.2, 0.5), n_seeds=2, progress=False)


def test_frame_equals_the_single_metric_functions(frame):
    model, frame = frame
    assert list(frame.columns) == ["method", "layer", "metric", "k", "value"]
    data = evaluate.as_eval_data(dataset(model))
    target = evaluate.predict(evaluate.Predictor(model), data)
    attr = evaluate.attributions(model, data, ["normxlogit"], target)["normxlogit"]
    curve = evaluate.comprehensiveness(model, data.tokens, data.attention_mask, attr, ks=(0.2, 0.5), labels=data.labels)
    rows = frame[(frame.method == "normxlogit") & (frame.metric == "comprehensiveness")]
    assert rows.k.dropna().tolist() == [0.2, 0.5]
    assert rows.value.tolist() == pytest.approx([*curve.confidence_drop.mean(-1).tolist(), curve.aopc])
    acc = frame[(frame.method == "normxlogit") & (frame.metric == "comprehensiveness_accuracy")]
    assert acc.value.tolist() == pytest.approx([*curve.accuracy.tolist(), curve.accuracy_aopc])
    ap = frame[(frame.method == "normxlogit") & (frame.metric == "average_precision")]
    assert ap.layer.tolist() == [0, 1, 2]  # layer-wise: one row per layer
    protected = evaluate.Predictor(model).protected(data.tokens, data.attention_mask, target.positions)
    direct = evaluate.average_precision(attr, data.cue_mask, exclude=protected).nanmean(-1)
    assert ap.value.tolist() == pytest.approx(direct.tolist())
    hits = frame[(frame.method == "normxlogit") & (frame.metric == "hit_at_1")]
    assert hits.value.tolist() == pytest.approx(evaluate.hit_at_k(attr, data.cue_mask, exclude=protected).nanmean(-1).tolist())
    # the random baseline is the mean over its seeds
    suff = [evaluate.sufficiency(model, data.tokens, data.attention_mask, evaluate.random_attribution(data.attention_mask, s),
                                 ks=(0.2, 0.5)).aopc for s in (0, 1)]
    value = frame.query("method == 'random' and metric == 'sufficiency' and k != k").value.item()
    assert value == pytest.approx(sum(suff) / 2)
    cost = frame[frame.metric == "seconds_per_instance"]
    assert len(cost) == 3 and (cost.value > 0).all() and cost.layer.isna().all()


def test_padding_and_batch_size_do_not_change_the_frame(frame, model_dirs):
    model, reference = frame
    other = evaluate.run(model, dataset(model, "left"), METHODS, ks=(0.2, 0.5), n_seeds=2, batch_size=1, progress=False)
    keep = ~reference.metric.isin(["seconds_per_instance", "peak_mb"])
    a, b = reference[keep].reset_index(drop=True), other[~other.metric.isin(["seconds_per_instance", "peak_mb"])].reset_index(drop=True)
    assert a[["method", "metric"]].equals(b[["method", "metric"]])
    assert a.value.tolist() == pytest.approx(b.value.tolist(), abs=1e-5)


def test_metric_registry_and_table(frame):
    _, frame = frame
    registry = evaluate.list_metrics().set_index("name")
    assert set(frame.metric) <= set(registry.index)
    assert registry.loc["sufficiency", "lower_is_better"] and not registry.loc["comprehensiveness", "lower_is_better"]
    summary = evaluate.table(frame, sort_by="sufficiency")
    assert summary["sufficiency ↓"].is_monotonic_increasing
    by_comp = evaluate.table(frame, arrows=False)
    assert by_comp["comprehensiveness"].is_monotonic_decreasing
    assert by_comp.loc["normxlogit", "average_precision"] == pytest.approx(
        frame.query("method == 'normxlogit' and metric == 'average_precision' and layer == 2").value.item())


def test_bad_input_is_named(frame):
    model, _ = frame
    data = dataset(model)
    with pytest.raises(KeyError, match="No method named 'normxlogitt'"):
        evaluate.run(model, data, ["normxlogitt"], progress=False)
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluate.run(model, data, ["random"], metrics=["aopc"], progress=False)
    with pytest.raises(ValueError, match="need cue positions"):
        evaluate.run(model, {"tokens": data["tokens"], "attention_mask": data["attention_mask"]}, ["random"], progress=False)
    with pytest.raises(ValueError, match="beyond its"):
        evaluate.run(model, {**data, "cue_positions": [[2], [2], [40]]}, ["random"], progress=False)
    with pytest.raises(KeyError, match="No metric named"):
        evaluate.get_metric("aopc")


def test_task_examples_run_end_to_end(tmp_path):
    """A tiny untrained GPT-2 over the task vocabulary evaluates mechnorm.tasks examples directly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = tasks.vocabulary()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path)
    tasks.tokenizer("lm").save_pretrained(tmp_path)
    model = mechnorm.load_model(tmp_path)
    examples = tasks.get_task("recall").test(6)
    frame = evaluate.run(model, examples, ["logat", "random"], metrics=["comprehensiveness", "average_precision"],
                         ks=(0.5,), n_seeds=1, progress=False)
    assert set(frame.metric) == {"comprehensiveness", "comprehensiveness_accuracy", "average_precision"}
    ap = frame.query("method == 'random' and metric == 'average_precision'").value.item()
    assert 0 < ap <= 1


def test_peak_memory_and_budget_extrapolation():
    def small_tensors(megabytes):  # 16 KB each: heap allocations, not separate mappings
        return [torch.ones(4096) for _ in range(megabytes * 64)]

    kept = small_tensors(60)
    del kept  # the heap grew and was freed: measure must not let the next call hide in it
    _, seconds, peak = evaluate.measure(lambda: small_tensors(40))
    assert 38 * 2**20 < peak < 60 * 2**20 and seconds > 0
    assert 60 * 2**20 < evaluate.measure(lambda: torch.ones(16 * 2**20))[2] < 80 * 2**20  # 64 MB
    # peak(b) = 300 MB + 50 MB · b  →  (8192 − 300) / 50 = 157.8 → 157 in 8 GiB
    fit = evaluate.max_batch({4: 500 * 2**20, 16: 1100 * 2**20, 10: 800 * 2**20}, 8 * 2**30)
    assert fit == pytest.approx({"mb_per_instance": 50.0, "fixed_mb": 300.0, "max_batch": 157})
    assert evaluate.max_batch({4: 2**20, 16: 2**20}, 2**30)["max_batch"] == float("inf")
    with pytest.raises(ValueError, match="two or more batch sizes"):
        evaluate.max_batch({4: 2**20}, 2**30)
