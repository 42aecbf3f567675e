"""mechnorm.zoo: the shipped models load from their files with plain transformers and through
mechnorm.load_model (hooked and bridge) with the same logits, and still solve their tasks."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForMaskedLM

import mechnorm
from mechnorm import tasks, zoo
from mechnorm.tasks import vocab

from conftest import KINDS

LMS = ("gpt2-agree-recall", "llama-agree-recall")
CLASSIFIER = "bert-lexicon"
N_ACCURACY = 400
ATOL = 1e-4
_CACHE: dict = {}


def loaded(name: str, kind: str):
    """mechnorm.load_model("zoo:<name>", kind), memoised for the session."""
    if (name, kind) not in _CACHE:
        _CACHE[name, kind] = mechnorm.load_model(f"zoo:{name}", kind=kind)
    return _CACHE[name, kind]


def lm_batch(name: str, n: int = 16):
    examples = [e for task in zoo.info(name).tasks for e in tasks.get_task(task).test(n // 2)]
    return tasks.collate(examples)


def classifier_logits(hidden_cls: torch.Tensor) -> torch.Tensor:
    """The shipped classifier applied to HF's final [CLS] state, by hand from the file."""
    with safe_open(zoo.path(CLASSIFIER) / "classifier.safetensors", "pt") as f:
        return hidden_cls @ f.get_tensor("weight").T + f.get_tensor("bias")


def test_listing_and_paths():
    assert zoo.names() == sorted([*LMS, CLASSIFIER])
    for model in zoo.list():
        assert model.path == zoo.path(model.name) and model.description
        assert model.tasks and all(t in tasks.list_tasks() for t in model.tasks)
        assert min(model.accuracy.values()) >= 0.95
        assert model.name in str(model)
    with pytest.raises(KeyError, match="gpt2-agree-recall"):
        zoo.path("no-such-model")
    with pytest.raises(KeyError):
        zoo.path("../zoo")


@pytest.mark.parametrize("name", [*LMS, CLASSIFIER])
def test_shipped_files(name):
    folder = zoo.path(name)
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (folder / file).is_file(), file
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
    assert sum(p.stat().st_size for p in folder.iterdir()) < 4_000_000
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "gpt2":
        assert config["n_ctx"] == config["n_positions"]
    card = (folder / "README.md").read_text()
    assert f"--only {name}" in card and "accuracy" in card


@pytest.mark.parametrize("name", [*LMS, CLASSIFIER])
def test_shipped_tokenizer_matches_tasks(name):
    tok = AutoTokenizer.from_pretrained(zoo.path(name))
    assert tok.vocab == vocab.vocabulary()
    assert tok.pad_token == vocab.PAD
    for task in zoo.info(name).tasks:
        for e in tasks.get_task(task).test(20):
            assert tuple(tok(e.text)["input_ids"]) == e.tokens


@pytest.mark.parametrize("name", LMS)
def test_lm_held_out_accuracy(name):
    model = AutoModelForCausalLM.from_pretrained(zoo.path(name)).eval()
    for task in zoo.info(name).tasks:
        batch = tasks.collate(tasks.get_task(task).test(N_ACCURACY))
        with torch.no_grad():
            logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask.long()).logits
        predicted = logits[torch.arange(len(batch)), batch.positions].argmax(-1)
        accuracy = (predicted == batch.answers).float().mean().item()
        assert accuracy >= 0.95, f"{name} on {task}: {accuracy:.3f}"


def test_classifier_held_out_accuracy():
    body = BertForMaskedLM.from_pretrained(zoo.path(CLASSIFIER)).eval()
    batch = tasks.collate(tasks.get_task("lexicon").test(N_ACCURACY))
    with torch.no_grad():
        hidden = body.bert(input_ids=batch.tokens, attention_mask=batch.attention_mask.long()).last_hidden_state
    accuracy = (classifier_logits(hidden[:, 0]).argmax(-1) == batch.answers).float().mean().item()
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", LMS)
def test_lm_loads_with_same_logits(name, kind):
    hf = AutoModelForCausalLM.from_pretrained(zoo.path(name)).eval()
    model = loaded(name, kind)
    batch = lm_batch(name)
    mask = batch.attention_mask
    with torch.no_grad():
        expected = hf(input_ids=batch.tokens, attention_mask=mask.long()).logits
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=mask.long())
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits[mask], expected[mask], atol=ATOL, rtol=0)
    n_layers = hf.config.num_hidden_layers
    assert "blocks.0.hook_resid_pre" in cache
    assert all(f"blocks.{i}.hook_resid_post" in cache for i in range(n_layers))
    example = batch.examples[-1]
    assert model.to_tokens(example.text)[0].tolist() == list(example.tokens)  # [BOS] once, not twice


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_loads_with_same_logits(kind):
    hf = BertForMaskedLM.from_pretrained(zoo.path(CLASSIFIER)).eval()
    model = loaded(CLASSIFIER, kind)
    batch = tasks.collate(tasks.get_task("lexicon").test(16))
    mask = batch.attention_mask
    with torch.no_grad():
        out = hf(input_ids=batch.tokens, attention_mask=mask.long(), output_hidden_states=True)
        if kind == "hooked":
            logits, cache = model.run_with_cache(batch.tokens, one_zero_attention_mask=mask.long())
        else:
            logits, cache = model.run_with_cache(batch.tokens, attention_mask=mask.long())
    torch.testing.assert_close(logits[mask], out.logits[mask], atol=ATOL, rtol=0)  # the (untrained) MLM head

    n_layers = hf.config.num_hidden_layers
    assert "blocks.0.hook_resid_pre" in cache
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], out.hidden_states[0], atol=ATOL, rtol=0)
    final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][:, 0]
    expected = classifier_logits(out.hidden_states[-1][:, 0])
    torch.testing.assert_close(zoo.classifier_head(CLASSIFIER)(final[:, None, :])[:, 0], expected, atol=ATOL, rtol=0)
    assert expected.argmax(-1).eq(batch.answers).float().mean() >= 0.9
    example = batch.examples[0]
    tokens = model.to_tokens(example.text)
    tokens = tokens[0] if kind == "bridge" else tokens[0][0]  # HookedEncoder returns (tokens, types, mask)
    assert tokens.tolist() == list(example.tokens)


def test_classifier_head():
    head = zoo.classifier_head(CLASSIFIER)
    assert isinstance(head, mechnorm.LinearHead) and head.n_outputs == 2
    assert head.labels == tasks.get_task("lexicon").labels  # class id -> the task's class name
    from_folder = zoo.classifier_head(zoo.path(CLASSIFIER))  # a zoo-format folder given by path
    assert torch.equal(from_folder.weight_out, head.weight_out) and from_folder.labels == head.labels
    with pytest.raises(ValueError, match="bert-lexicon"):
        zoo.classifier_head("gpt2-agree-recall")
    with pytest.raises(ValueError, match="3 labels for a head with 2 outputs"):
        mechnorm.LinearHead(torch.zeros(2, 4), labels=("a", "b", "c"))


def test_attribute_names_the_class_each_sequence_is_explained_for():
    """The default target of a classifier is the head's class, named by the head's labels."""
    examples = tasks.get_task("lexicon").test(6)
    batch = tasks.collate(examples)
    model = mechnorm.load_model(f"zoo:{CLASSIFIER}")
    comparison = mechnorm.attribute(model, mechnorm.Batch(batch.tokens, batch.attention_mask), methods=("normxlogit",),
                                    head=zoo.classifier_head(CLASSIFIER))
    assert comparison["normxlogit"].target_labels == tuple(e.answer_text for e in examples)  # the model is right on these
