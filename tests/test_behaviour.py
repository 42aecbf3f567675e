"""Behavioural check on trained weights: does NormXLogit's top token find the subject noun?"""

import pytest

import mechnorm
from mechnorm import evaluate, tasks


@pytest.mark.parametrize("name", ["gpt2-agree-recall", "llama-agree-recall"])
def test_normxlogit_top_token_is_the_subject_in_a_clear_majority_of_agreement_examples(name):
    data = tasks.collate(tasks.get_task("agreement").test(300))
    model = mechnorm.load_model(f"zoo:{name}")
    attr = mechnorm.attribute(model, mechnorm.Batch(data.tokens, data.attention_mask), methods=("normxlogit",))["normxlogit"]
    not_ranked = evaluate.Predictor(model).protected(data.tokens, data.attention_mask, data.positions)  # [BOS], prediction
    share = float(evaluate.hit_at_k(attr.row(-1), data.cue_positions, data.attention_mask, exclude=not_ranked).mean())
    # a clear majority: two thirds (measured .81 GPT-2, .76 Llama; every method: experiments/behaviour_check.py)
    assert share >= 2 / 3, f"subject ranked first in only {share:.0%} of examples"
