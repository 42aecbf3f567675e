"""mechnorm.tasks: determinism, disjoint splits, cue positions re-derived from the text,
the shared tokenizer, and batching."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from mechnorm import tasks
from mechnorm.tasks import vocab

N = 300
TOKENIZER_KIND = {"agreement": "lm", "recall": "lm", "lexicon": "cls"}
SINGULAR = {s for s, _ in vocab.NOUNS}
PLURAL = {p for _, p in vocab.NOUNS}


@pytest.fixture(scope="module", params=tasks.list_tasks())
def task(request):
    return tasks.get_task(request.param)


def test_registry():
    assert tasks.list_tasks() == ["agreement", "lexicon", "recall"]
    with pytest.raises(KeyError, match="available"):
        tasks.get_task("nope")


def test_deterministic_and_prefix_stable(task):
    first = task.train(N)
    assert first == tasks.get_task(task.name).train(N)
    assert task.train(20) == first[:20]
    assert [e.text for e in tasks.get_task(task.name, seed=1).train(N)] != [e.text for e in first]


def test_splits_disjoint_for_any_seeds(task):
    train_texts = {e.text for seed in (0, 1) for e in tasks.get_task(task.name, seed=seed).train(3000)}
    test_texts = {e.text for seed in (0, 2) for e in tasks.get_task(task.name, seed=seed).test(500)}
    assert train_texts and test_texts
    assert not train_texts & test_texts
    assert all(task.split_of(t) == "test" for t in test_texts)


def test_examples_are_well_formed(task):
    special = vocab.token_id(vocab.BOS if task.kind == "lm" else vocab.CLS)
    for e in task.test(N):
        assert e.task == task.name
        assert e.tokens[0] == special and len(e.tokens) == len(e.text.split()) + 1
        assert e.cue_positions and all(0 < p < len(e.tokens) for p in e.cue_positions)
        assert e.foil is not None and e.foil != e.answer
        if task.kind == "lm":
            assert vocab.token_id(e.answer_text) == e.answer and e.continuation[-1] == vocab.token_id(vocab.EOS)
        else:
            assert task.labels[e.answer] == e.answer_text and not e.continuation


def test_agreement_cues_from_text():
    """The subject is the first noun of the text; its number alone decides is/are."""
    for e in tasks.get_task("agreement").test(N):
        words = e.text.split()
        nouns = [i for i, w in enumerate(words) if w in SINGULAR | PLURAL]
        subject = nouns[0]
        assert e.cue_positions == (subject + 1,)  # + 1 for [BOS]
        assert e.answer_text == ("is" if words[subject] in SINGULAR else "are")
        assert e.foil == vocab.token_id("are" if e.answer_text == "is" else "is")
        other = PLURAL if words[subject] in SINGULAR else SINGULAR
        assert e.meta["attractor_positions"] == [i + 1 for i in nouns[1:] if words[i] in other]


def test_agreement_has_attractors():
    examples = tasks.get_task("agreement").test(1000)
    with_attractors = [e for e in examples if e.meta["attractor_positions"]]
    assert 0.3 < len(with_attractors) / len(examples) < 0.9
    assert {e.answer_text for e in with_attractors} == {"is", "are"}


def test_agreement_bare_subjects_train_only_and_the_verb_most_likely_next():
    task = tasks.get_task("agreement")
    train = task.train(5000)
    bare = {e.text for e in train if not e.meta["noun_positions"]}
    assert len(bare) == 2 * len(vocab.NOUNS)  # every bare subject, singular and plural, is trained on
    assert all(task.split_of(text) == "train" for text in bare)
    counts = Counter(len(e.meta["noun_positions"]) for e in task.test(2000))
    assert set(counts) == {1, 2} and abs(counts[1] - counts[2]) < 200
    # in the training stream the verb is the most likely word after the subject and after the first modifier
    verbs = set(vocab.ids([v for pair in vocab.VERBS for v in pair]))
    words = {i: w for w, i in vocab.vocabulary().items()}
    for depth in (0, 1):
        following = Counter()
        for e in train:
            if len(e.meta["noun_positions"]) < depth:
                continue
            seq = e.sequence()
            end = 2  # the subject, after [BOS] the
            if depth:
                end = e.meta["noun_positions"][0]
                end += seq[end + 1] in verbs  # an object relative clause ends with its verb
            following[words[seq[end + 1]]] += 1
        verb_share = (following["is"] + following["are"]) / sum(following.values())
        assert verb_share > max(n for w, n in following.items() if w not in ("is", "are")) / sum(following.values())
        assert verb_share == pytest.approx((0.38, 0.5)[depth], abs=0.03)


def test_recall_cues_from_text():
    for e in tasks.get_task("recall").test(N):
        words = e.text.split()
        keys, values, query = words[:-1:2], words[1:-1:2], words[-1]
        assert all(k in vocab.KEYS for k in keys) and all(v in vocab.VALUES for v in values)
        assert len(set(keys)) == len(keys)
        index = keys.index(query)
        assert e.answer_text == values[index]
        assert e.cue_positions == (2 * index + 1, 2 * index + 2)  # + 1 for [BOS]
        assert e.tokens[e.cue_positions[0]] == e.tokens[-1]
        if e.meta["foil_position"] is not None:
            assert e.tokens[e.meta["foil_position"]] == e.foil


def test_lexicon_cues_and_label_from_text():
    """Re-derive the label from the polarity words and negators; cues are exactly those."""
    positive, negative = set(vocab.POSITIVE), set(vocab.NEGATIVE)
    labels = []
    for e in tasks.get_task("lexicon").test(N):
        words = ["[CLS]", *e.text.split()]
        signs, cues = [], []
        for i, w in enumerate(words):
            if w in positive | negative:
                negated = words[i - 1] == "not"
                signs.append((w in positive) != negated)
                cues += [i - 1, i] if negated else [i]
        assert len(set(signs)) == 1, e.text  # the polarity words agree
        assert e.answer == int(signs[0])
        assert e.cue_positions == tuple(sorted(cues))
        assert not set(e.meta["neutral_negator_positions"]) & set(e.cue_positions)
        labels.append(e.answer)
    assert 0.35 < sum(labels) / len(labels) < 0.65


@pytest.mark.parametrize("kind", ["lm", "cls"])
def test_tokenizer_round_trip(tmp_path, kind):
    vocab.tokenizer(kind).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.pad_token == vocab.PAD and tok.bos_token == (vocab.BOS if kind == "lm" else vocab.CLS)
    assert tok.vocab == vocab.vocabulary()
    for name, task_kind in TOKENIZER_KIND.items():
        if task_kind != kind:
            continue
        for e in tasks.get_task(name).test(50):
            assert tuple(tok(e.text)["input_ids"]) == e.tokens
            assert tok.decode(e.tokens, skip_special_tokens=True) == e.text
    assert tok("the zebra")["input_ids"][-1] == vocab.token_id(vocab.UNK)


def test_vocab_rejects_unknown_words():
    with pytest.raises(KeyError, match="zebra"):
        vocab.ids(["the", "zebra"])


def test_collate_right_pads(task):
    examples = task.test(7)
    batch = tasks.collate(examples)
    lengths = [len(e.tokens) for e in examples]
    assert batch.tokens.shape == (7, max(lengths)) and len(batch) == 7
    assert batch.attention_mask.sum(-1).tolist() == lengths
    assert bool((batch.tokens[~batch.attention_mask] == vocab.token_id(vocab.PAD)).all())
    for i, e in enumerate(examples):
        assert batch.tokens[i, : lengths[i]].tolist() == list(e.tokens)
        assert batch.cue_mask[i].nonzero().flatten().tolist() == list(e.cue_positions)
    expected = [0] * 7 if task.kind == "classification" else [n - 1 for n in lengths]
    assert batch.positions.tolist() == expected
    assert torch.equal(batch.answers, torch.tensor([e.answer for e in examples]))
    with pytest.raises(ValueError):
        tasks.collate([])
