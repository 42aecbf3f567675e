"""Integrated gradients' non-convergence warning gives advice that fits the model's architecture."""

import warnings

import pytest

import mechnorm


def _warnings(model, text, **options):
    batch = mechnorm.tokenize(model, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mechnorm.integrated_gradients(model, batch, reduce="sum", **options)
    return [str(w.message) for w in caught if "did not converge" in str(w.message)]


@pytest.mark.parametrize("kind", ["bridge"] + (["hooked"] if mechnorm.models.hooked_available() else []))
def test_gpt2_with_a_position_table_is_told_to_raise_steps_not_about_the_norm_singularity(kind):
    model = mechnorm.load_model("zoo:gpt2-agree-recall", kind=kind)
    assert model.cfg.positional_embedding_type == "standard"  # GPT-2 sums a position table
    messages = _warnings(model, "the keys to the old cabinet", n_steps=2)
    assert len(messages) == 1
    assert "position table" in messages[0] and "n_steps (e.g. to 8)" in messages[0]
    assert "singularity" not in messages[0] and "Llama" not in messages[0]


def test_a_converged_run_is_silent_and_a_mean_baseline_is_not_advised_twice():
    model = mechnorm.load_model("zoo:gpt2-agree-recall")
    assert _warnings(model, "the keys to the old cabinet", n_steps=300, baseline="mean") == []
    messages = _warnings(model, "the keys to the old cabinet", n_steps=2, baseline="mean")
    assert len(messages) == 1 and "baseline='mean'" not in messages[0]


def test_a_rotary_model_is_told_about_the_norm_singularity():
    model = mechnorm.load_model("zoo:llama-agree-recall")
    assert model.cfg.positional_embedding_type == "rotary"
    messages = _warnings(model, "the keys to the old cabinet", n_steps=2)
    assert len(messages) == 1 and "singularity" in messages[0] and "baseline='mean'" in messages[0]
