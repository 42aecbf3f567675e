"""experiments/train_zoo.py: training is deterministic for a seed, and a saved folder reloads with
the accuracy its model card states (short runs; the full retrain is in the zoo's model cards)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import train_zoo  # noqa: E402


def short(name: str, steps: int = 8) -> train_zoo.Spec:
    return dataclasses.replace(train_zoo.SPECS[name], steps=steps, batch_size=32)


@pytest.mark.parametrize("name", ["llama-agree-recall", "bert-lexicon"])
def test_training_is_deterministic_for_a_seed(name):
    quiet = lambda *_: None  # noqa: E731
    first = train_zoo.train(name, short(name), seed=0, log=quiet).state_dict()
    again = train_zoo.train(name, short(name), seed=0, log=quiet).state_dict()
    other = train_zoo.train(name, short(name), seed=1, log=quiet).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_saved_folder_states_what_plain_transformers_measures(tmp_path, monkeypatch):
    monkeypatch.setattr(train_zoo, "N_TEST", 200)
    spec = short("gpt2-agree-recall", steps=30)
    model = train_zoo.train("gpt2-agree-recall", spec, seed=0, log=lambda *_: None)
    meta = train_zoo.save("gpt2-agree-recall", spec, model, tmp_path, seed=0, seconds=1.0, command="python experiments/train_zoo.py")
    from transformers import AutoModelForCausalLM

    from mechnorm import tasks

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for task in spec.tasks:
        with torch.no_grad():  # one unpadded sequence at a time, independent of the script's batching
            hits = [reloaded(input_ids=torch.tensor([e.tokens])).logits[0, -1].argmax().item() == e.answer
                    for e in tasks.get_task(task).test(200)]
        assert meta["accuracy"][task] == pytest.approx(sum(hits) / len(hits))
    assert json.loads((tmp_path / "metadata.json").read_text())["accuracy"] == meta["accuracy"]
    assert f"{meta['accuracy']['recall']:.2%}" in (tmp_path / "README.md").read_text()
