"""RepMatch on real models: training, saving, instance scores against the reload-and-step loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import KINDS, build_hf_model

import mechnorm
from mechnorm import repmatch, tasks
from mechnorm.repmatch.adapters import as_adapter, lora_config, with_adapter
from mechnorm.repmatch.models import encode, per_example_loss


@pytest.fixture(scope="module")
def bert():
    return repmatch.load_base("zoo:bert-lexicon")


@pytest.fixture(scope="module")
def lexicon():
    return tasks.get_task("lexicon").train(48)


@pytest.fixture(scope="module")
def bert_ref(bert, lexicon):
    return repmatch.train_adapter(bert, lexicon, rank=4, steps=15, lr=1e-2, seed=0)


def test_training_is_deterministic_and_seeded(bert, lexicon, bert_ref):
    again = repmatch.train_adapter(bert, lexicon, rank=4, steps=15, lr=1e-2, seed=0)
    other = repmatch.train_adapter(bert, lexicon, rank=4, steps=15, lr=1e-2, seed=1)
    assert bert_ref.state.keys() == again.state.keys()
    assert all(torch.equal(bert_ref.state[k], again.state[k]) for k in bert_ref.state)
    assert any(not torch.equal(bert_ref.state[k], other.state[k]) for k in bert_ref.state)
    assert bert_ref.matrices() == [(0, "query"), (0, "value"), (1, "query"), (1, "value")]


def test_training_lowers_the_loss_and_leaves_the_base_frozen(bert, lexicon, bert_ref):
    before = {k: v.clone() for k, v in bert.model.state_dict().items()}
    data = encode(bert, lexicon)
    with torch.no_grad():
        start = per_example_loss(bert, with_adapter(bert, repmatch.initial_adapter(bert, rank=4)), data).mean()
        end = per_example_loss(bert, with_adapter(bert, bert_ref), data).mean()
    assert end < start
    repmatch.train_adapter(bert, lexicon[:8], steps=2)
    assert all(torch.equal(before[k], v) for k, v in bert.model.state_dict().items())


def test_saved_adapter_is_an_ordinary_peft_folder(bert, lexicon, bert_ref, tmp_path):
    import copy

    from peft import PeftModel

    bert_ref.save(tmp_path / "ad")
    loaded = repmatch.Adapter.load(tmp_path / "ad")
    assert all(torch.equal(bert_ref.state[k], loaded.state[k]) for k in bert_ref.state)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(bert.model), str(tmp_path / "ad"))
    batch = encode(bert, lexicon[:6])
    with torch.no_grad():
        ours = with_adapter(bert, bert_ref)(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        merged = repmatch.merged(bert, tmp_path / "ad")(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(ours, merged, atol=1e-5)
    assert repmatch.subspace_similarity(bert_ref, tmp_path / "ad").mean == pytest.approx(1.0, abs=1e-6)


def reference_loop(base, examples, reference, lr=1e-3, weight_decay=0.01):
    """The authors' procedure, written independently: reload θ₀, a real AdamW step, full SVD, loop over (i, j)."""
    model = with_adapter(base, config=lora_config(base, 1), seed=0)
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    ref = {k: np.linalg.svd((B.double() @ A.double()).numpy())[0] for k, (B, A) in reference.factors().items()}
    out = []
    for example in examples:
        model.load_state_dict(checkpoint)
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
        optimiser.zero_grad()
        ids = torch.tensor([example.tokens if base.kind == "classifier" else example.sequence()])
        if base.kind == "classifier":
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)),
                                                     torch.tensor([example.answer]))
        else:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        loss.backward()
        optimiser.step()
        row = []
        for key, (B, A) in as_adapter(model).factors().items():
            U = np.linalg.svd((B.double() @ A.double()).numpy())[0]
            r = reference.rank
            row.append(max(np.linalg.norm(ref[key][:, :i].T @ U[:, :1], "fro") ** 2 for i in range(1, r + 1)))
        out.append(row)
    return np.array(out)


def test_vectorised_instance_scores_equal_the_reload_and_step_loop_on_bert(bert, lexicon, bert_ref):
    examples = lexicon[:12]
    fast = repmatch.instance_similarity(bert, examples, bert_ref, chunk_size=5)
    slow = reference_loop(bert, examples, bert_ref)
    # float32 gradients: Adam's first step g/(|g|+eps) turns entries with |g| ≈ eps into ±lr,
    # so rounding noise moves φ by up to ~1e-4 on this model.
    assert np.abs(fast.values.numpy() - slow).max() < 1e-3
    assert np.abs(repmatch.instance_similarity_loop(bert, examples, bert_ref).values.numpy() - slow).max() < 1e-3


def test_vectorised_instance_scores_equal_the_loop_in_float64_causal_lm():
    model = build_hf_model("llama").double()
    base = repmatch.load_base(model)
    base.pad_id = 0
    g = torch.Generator().manual_seed(0)
    examples = [tasks.Example("toy", "", tuple(torch.randint(3, 20, (n,), generator=g).tolist()), 5, "5", None, ())
                for n in (4, 6, 6, 9)]
    ref = repmatch.train_adapter(base, examples, rank=3, steps=5, lr=1e-2, batch_size=2)
    fast = repmatch.instance_similarity(base, examples, ref, chunk_size=3)
    slow = reference_loop(base, examples, ref)
    assert np.abs(fast.values.numpy() - slow).max() < 1e-8
    assert fast.matrices == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]


def test_padding_does_not_change_an_instance_score(bert, lexicon, bert_ref):
    lengths = [len(e.tokens) for e in lexicon]
    short = lexicon[int(np.argmin(lengths))]
    alone = repmatch.instance_similarity(bert, [short], bert_ref).values
    among = repmatch.instance_similarity(bert, [lexicon[int(np.argmax(lengths))], short], bert_ref).values[1:]
    assert torch.allclose(alone, among, atol=1e-9)


def test_first_adamw_step_matches_torch():
    theta = torch.randn(5, 3, dtype=torch.float64)
    g = torch.randn(5, 3, dtype=torch.float64) * torch.logspace(-10, 0, 3, dtype=torch.float64)
    param = torch.nn.Parameter(theta.clone())
    optimiser = torch.optim.AdamW([param], lr=0.01, weight_decay=0.1)
    param.grad = g.clone()
    optimiser.step()
    assert torch.allclose(repmatch.first_adamw_step(theta, g, 0.01, 0.1), param.detach(), rtol=0, atol=1e-15)


def test_causal_lm_zoo_adapter_and_instance_scores_by_layer():
    base = repmatch.load_base("zoo:gpt2-agree-recall")
    examples = tasks.get_task("agreement").train(10)
    ref = repmatch.train_adapter(base, examples, rank=2, steps=4)
    scores = repmatch.instance_similarity(base, examples, ref)
    assert scores.values.shape == (10, 3) and bool(((scores.values >= 0) & (scores.values <= 1)).all())
    assert np.allclose(scores.by_layer().to_numpy(), scores.values.numpy())  # one matrix (c_attn) per layer
    assert len(scores.plot(groups=["a"] * 5 + ["b"] * 5).data) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_loads_in_transformer_lens(kind, tmp_path):
    base = repmatch.load_base("zoo:gpt2-agree-recall")
    examples = tasks.get_task("agreement").train(8)
    merged = repmatch.merged(base, repmatch.train_adapter(base, examples, rank=2, steps=3, lr=1e-2))
    merged.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    model = mechnorm.load_model(str(tmp_path), kind=kind)
    ids = torch.tensor([examples[0].tokens])
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        got = model(ids)
    # TransformerLens may centre the unembedding: compare logits up to a per-position constant.
    diff = (got - expected)[0]
    assert torch.allclose(diff, diff.mean(-1, keepdim=True), atol=1e-3)


def test_bad_input_errors(bert):
    with pytest.raises(ValueError, match="No examples"):
        repmatch.train_adapter(bert, [])
    with pytest.raises(ValueError, match="String examples need a causal LM"):
        repmatch.train_adapter(bert, ["a sentence"])
    with pytest.raises(FileNotFoundError, match="zoo:<name>"):
        repmatch.load_base("no-such-model")
