"""On trained weights, the circuit tools agree on how the zoo's recall models copy the cue value.

``experiments/circuits.py`` measured the figures on the first 200 held-out recall examples
(``results/circuits_recall_summary.csv``); here they are checked, with margin, on the next 60.
"""

import sys
from pathlib import Path

import pandas as pd
import pytest

import mechnorm
from mechnorm import tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import circuits  # noqa: E402

HELD_OUT = slice(200, 260)  # the experiment used test(200)


@pytest.fixture(scope="module", params=["gpt2-agree-recall", "llama-agree-recall"])
def measured(request):
    examples = tasks.get_task("recall").test(HELD_OUT.stop)[HELD_OUT]
    model = mechnorm.load_model(f"zoo:{request.param}")
    return circuits.recall_circuit(model, examples)


def test_the_head_with_the_largest_dla_is_the_one_patching_ranks_first(measured):
    _, heads = measured
    by_dla = heads.sort_values("dla_mean", ascending=False)
    by_patching = heads.sort_values("patching_mean", ascending=False)
    assert by_dla["head"].iloc[0] == by_patching["head"].iloc[0]
    first, second = by_patching["patching_mean"].iloc[:2]
    assert first > 1.3 * second, f"patching does not single the head out: {first:.3f} vs {second:.3f}"


def test_that_head_attends_from_the_last_position_to_the_cue_value(measured):
    _, heads = measured
    top = heads.sort_values("dla_mean", ascending=False).iloc[0]
    assert top["pattern_peaks_on_value"] >= 0.9 and top["attention_on_value_mean"] >= 0.8
    assert top["hta_peaks_on_value"] >= 0.85  # its source-token attribution peaks on the value


def test_each_examples_top_dla_head_reads_the_value(measured):
    frame, _ = measured
    assert frame["pattern_peaks_on_value"].mean() >= 0.95
    assert frame["hta_peaks_on_value"].mean() >= 0.95
    assert (frame["clean_metric"] > 0).all() and (frame["corrupted_metric"] < 0).all()  # the corruption flips the answer


def test_attribution_patching_ranks_heads_like_activation_patching(measured):
    frame, heads = measured
    assert heads["attribution_patching_mean"].corr(heads["patching_mean"], method="spearman") >= 0.9
    assert frame["spearman_attr_vs_act"].median() >= 0.9
    assert isinstance(frame, pd.DataFrame) and len(frame) == HELD_OUT.stop - HELD_OUT.start
