"""Gradient methods against autograd through the plain HF model (inputs_embeds)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import KINDS, TEXTS

import mechnorm

pytestmark = pytest.mark.filterwarnings("ignore::mechnorm.ProcessedWeightsWarning")
TEXT = TEXTS[2]


def _hf_setup(hf, tokens, target_id, output="logit"):
    """The HF model as a function of its input embeddings, read at the last position."""
    embeds = hf.get_input_embeddings()(tokens).detach()

    def f(e):
        logits = hf(inputs_embeds=e).logits[:, -1].float()
        return (logits.softmax(-1) if output == "prob" else logits)[:, target_id]

    return embeds, f


def _hf_grad(f, embeds):
    embeds = embeds.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(embeds).sum(), embeds)
    return grad[0]


def _riemann_ig(f, x, baseline, n=300):
    """IG by the midpoint rule, written independently of captum."""
    alphas = (torch.arange(n) + 0.5) / n
    total = torch.zeros_like(x)
    for part in alphas.split(100):
        path = (baseline + part[:, None, None] * (x - baseline)).requires_grad_(True)
        (grad,) = torch.autograd.grad(f(path).sum(), path)
        total += grad.sum(0, keepdim=True)
    return ((x - baseline) * total / n)[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("output", ["logit", "prob"])
def test_saliency_and_grad_x_input_match_hf_autograd(load, hf_model, arch, kind, output):
    model, hf = load(arch, kind), hf_model(arch)
    batch = mechnorm.tokenize(model, [TEXT])
    sal = mechnorm.saliency(model, batch, output=output)
    target_id = int(mechnorm.predicted(hf(batch.tokens).logits).ids[0])
    embeds, f = _hf_setup(hf, batch.tokens, target_id, output)
    grad = _hf_grad(f, embeds)
    torch.testing.assert_close(sal.scores[0, 0], grad.abs().sum(-1), atol=1e-4, rtol=1e-4)
    sal_l2 = mechnorm.saliency(model, batch, output=output, reduce="l2")
    torch.testing.assert_close(sal_l2.scores[0, 0], grad.norm(dim=-1), atol=1e-4, rtol=1e-4)
    gxi = (grad * embeds[0])
    for reduce, expected in [("l1", gxi.abs().sum(-1)), ("l2", gxi.norm(dim=-1)), ("sum", gxi.sum(-1))]:
        attr = mechnorm.grad_x_input(model, batch, output=output, reduce=reduce)
        torch.testing.assert_close(attr.scores[0, 0], expected, atol=1e-4, rtol=1e-4)
        assert attr.signed == (reduce == "sum") and attr.layers == (0,)
    assert sal.metadata["wrt"] == ("embed.hook_out" if kind == "bridge" else "hook_embed") and not sal.signed


@pytest.mark.parametrize(
    "arch,baseline,hold_first",
    [("gpt2", "zero", False), ("gpt2", "zero", True), ("gpt2", "pad", True), ("neox", "pad", True),
     ("llama", "token", True), ("llama", "mean", True)],
)
def test_integrated_gradients_completeness_and_riemann_reference(load, hf_model, arch, baseline, hold_first):
    model, hf = load(arch), hf_model(arch)
    batch = mechnorm.tokenize(model, [TEXT])
    target_id = int(mechnorm.predicted(hf(batch.tokens).logits).ids[0])
    embeds, f = _hf_setup(hf, batch.tokens, target_id)
    table = hf.get_input_embeddings().weight.detach()
    if baseline == "token":  # Llama's pad embedding is zero (padding_idx): use another token's
        baseline = model.W_E[mechnorm.token_target(" the", model).ids[0]].detach()
        x0 = baseline.expand_as(embeds).clone()
    elif baseline == "zero":
        x0 = torch.zeros_like(embeds)
    elif baseline == "mean":
        x0 = table.mean(0).expand_as(embeds).clone()
    else:  # the pad token (id 0) at every position
        x0 = hf.get_input_embeddings()(torch.zeros_like(batch.tokens)).detach()
    if hold_first:  # the first token (the attention sink) stays itself along the path
        x0[:, 0] = embeds[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no completeness warning
        ig = mechnorm.integrated_gradients(model, batch, reduce="sum", n_steps=50, baseline=baseline, hold_first=hold_first)
    with torch.no_grad():
        change = float(f(embeds) - f(x0))
    assert float(ig.scores.nansum()) == pytest.approx(change, rel=0.01)
    reference = _riemann_ig(f, embeds, x0).sum(-1)
    torch.testing.assert_close(ig.scores[0, 0], reference, atol=0.01 * float(reference.abs().max()), rtol=0)
    assert ig.metadata["convergence_delta"].abs().max() < 0.01 * abs(change)
    if hold_first:
        assert ig.scores[0, 0, 0] == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_ig_holds_a_causal_lms_first_real_token_by_default(load, side):
    model = load("gpt2")
    batch = mechnorm.tokenize(model, TEXTS, padding_side=side)
    ig = mechnorm.integrated_gradients(model, batch, reduce="sum", n_steps=8)
    first = batch.attention_mask.long().argmax(-1)
    assert ig.metadata["hold_first"] is True
    assert (ig.scores[0, torch.arange(len(TEXTS)), first] == 0).all()
    assert (ig.scores[0][batch.attention_mask] != 0).sum() > len(TEXTS)  # the other tokens are attributed


def test_ig_on_a_norm_first_model_warns_when_it_does_not_converge(load):
    model = load("llama")
    batch = mechnorm.tokenize(model, [TEXT])
    with pytest.warns(UserWarning, match="did not converge") as direct:
        mechnorm.integrated_gradients(model, batch, n_steps=50)
    with pytest.warns(UserWarning, match="did not converge") as routed:
        mechnorm.attribute(model, batch, methods=("integrated_gradients",))
    # the warning names the user's line, whichever way in
    assert [w.filename for w in [*direct, *routed] if "converge" in str(w.message)] == [__file__, __file__]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_a_sequences_scores(load, kind, side):
    model = load("gpt2", kind)
    batch = mechnorm.tokenize(model, TEXTS, padding_side=side)
    methods = {
        "saliency": lambda b: mechnorm.saliency(model, b),
        "grad_x_input": lambda b: mechnorm.grad_x_input(model, b, reduce="sum"),
        "integrated_gradients": lambda b: mechnorm.integrated_gradients(model, b, reduce="sum", n_steps=8,
                                                                        internal_batch_size=6),
    }
    for name, run in methods.items():
        together = run(batch)
        assert not together.scores[0][batch.attention_mask].isnan().any(), name
        for i, text in enumerate(TEXTS):
            alone = run(mechnorm.tokenize(model, [text]))
            real = batch.attention_mask[i]
            torch.testing.assert_close(together.scores[0, i][real], alone.scores[0, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Integrated gradients did not converge")
def test_targets_contrasts_and_token_ids(load):
    model = load("neox", "bridge")
    batch = mechnorm.tokenize(model, TEXTS[:2], padding_side="left")
    target, foil = mechnorm.token_target(" cabinet", model), mechnorm.token_target(" table", model)
    def run(t):
        return mechnorm.grad_x_input(model, batch.tokens, attention_mask=batch.attention_mask, target=t, reduce="sum")

    both = run(mechnorm.contrast(target, foil))
    torch.testing.assert_close(both.scores, run(target).scores - run(foil).scores, atol=1e-5, rtol=0, equal_nan=True)
    assert "cabinet" in both.target_labels[0] and "table" in both.target_labels[0]
    # IG is linear in the output too
    def ig(t):
        return mechnorm.integrated_gradients(model, batch, target=t, reduce="sum", n_steps=5).scores

    torch.testing.assert_close(ig(mechnorm.contrast(target, foil)), ig(target) - ig(foil), atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:Integrated gradients did not converge")
def test_deterministic_and_model_untouched(load):
    model = load("llama", "bridge")
    batch = mechnorm.tokenize(model, TEXTS, padding_side="left")
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = mechnorm.integrated_gradients(model, batch, n_steps=6, baseline="pad")
    second = mechnorm.integrated_gradients(model, batch, n_steps=6, baseline="pad")
    torch.testing.assert_close(first.scores, second.scores, atol=0, rtol=0, equal_nan=True)
    assert all(torch.equal(p, params[name]) and p.grad is None for name, p in model.named_parameters())
    assert not any(model.hook_dict[name].fwd_hooks for name in model.hook_dict)  # hooks removed


def test_registry_marks_gradient_methods():
    names = mechnorm.list_methods().set_index("name")
    for method in ("saliency", "grad_x_input", "integrated_gradients"):
        assert names.loc[method, "needs_gradients"]
        assert mechnorm.get_method(method).hooks.hook_names(2) == []


def test_errors_name_the_fix(load):
    model = load("gpt2")
    batch = mechnorm.tokenize(model, [TEXT])
    with pytest.raises(ValueError, match="grad_x_input"):
        mechnorm.saliency(model, batch, reduce="sum")
    with pytest.raises(ValueError, match="'logit' or 'prob'"):
        mechnorm.grad_x_input(model, batch, output="logprob")
    with pytest.raises(ValueError, match="n_steps"):
        mechnorm.integrated_gradients(model, batch, n_steps=0)
    with pytest.raises(ValueError, match="baseline must be"):
        mechnorm.integrated_gradients(model, batch, baseline="median")
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        mechnorm.saliency(model, batch)
    with pytest.raises(ValueError, match="outside the head|outside"):
        mechnorm.saliency(model, batch, target=mechnorm.token_target(999))
    with pytest.raises(ValueError, match="embeds has shape"):
        mechnorm.saliency(model, batch, target=mechnorm.token_target(3), embeds=torch.zeros(1, 2, model.cfg.d_model))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mechnorm.saliency(model, batch.tokens, attention_mask=torch.ones(1, 2))


@pytest.mark.parametrize("kind", KINDS)
def test_training_mode_is_refused_only_where_dropout_would_fire(load, kind):
    """A HookedTransformer has no dropout, so train() changes nothing and is accepted; a bridge
    wraps the HF GPT-2, whose attention, residual and embedding dropout (0.1) would fire."""
    model = load("gpt2", kind)
    batch = mechnorm.tokenize(model, [TEXT])
    expected = mechnorm.saliency(model, batch).scores
    model.train()
    try:
        if kind == "hooked":
            torch.testing.assert_close(mechnorm.saliency(model, batch).scores, expected)
        else:
            with pytest.raises(ValueError, match=r"Dropout is active \(.*dropout.*model\.eval\(\)"):
                mechnorm.saliency(model, batch)
    finally:
        model.eval()


@pytest.fixture(scope="module")
def bert_classifier():
    """The zoo BERT classifier as a function of its word embeddings, by hand in HF transformers."""
    from transformers import BertForMaskedLM

    from mechnorm import tasks, zoo

    head = zoo.classifier_head("bert-lexicon")
    data = tasks.collate(tasks.get_task("lexicon").test(4))  # right-padded, different lengths
    hf = BertForMaskedLM.from_pretrained(zoo.path("bert-lexicon")).eval()
    mask = data.attention_mask.long()

    def class_logits(embeds):  # [n, pos, d] word embeddings -> [n, classes] at [CLS]
        repeats = embeds.shape[0] // mask.shape[0]
        hidden = hf.bert(inputs_embeds=embeds, attention_mask=mask.repeat(repeats, 1)).last_hidden_state
        return head(hidden[:, :1])[:, 0]

    embeds = hf.bert.embeddings.word_embeddings(data.tokens).detach()
    return head, mechnorm.Batch(data.tokens, data.attention_mask), embeds, class_logits


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_head_gradients_match_hf_autograd(bert_classifier, kind):
    head, batch, embeds, class_logits = bert_classifier
    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    with torch.no_grad():
        predicted = class_logits(embeds).argmax(-1)
    x = embeds.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(class_logits(x).gather(-1, predicted[:, None]).sum(), x)
    real = batch.attention_mask
    sal = mechnorm.saliency(model, batch, head=head)
    assert torch.equal(sal.metadata["positions"], torch.zeros(len(real), dtype=torch.long))  # read at [CLS]
    torch.testing.assert_close(sal.scores[0][real], grad.abs().sum(-1)[real], atol=1e-5, rtol=1e-4)
    gxi = mechnorm.grad_x_input(model, batch, head=head, reduce="sum")
    torch.testing.assert_close(gxi.scores[0][real], (grad * embeds).sum(-1)[real], atol=1e-5, rtol=1e-4)
    assert sal.metadata["wrt"] == ("embed.hook_out" if kind == "bridge" else "embed.hook_embed")


@pytest.mark.parametrize("kind,baseline", [(KINDS[0], "pad")] + [(kind, "zero") for kind in KINDS])
def test_classifier_head_integrated_gradients_is_complete(bert_classifier, kind, baseline):
    head, batch, embeds, class_logits = bert_classifier
    model = mechnorm.load_model("zoo:bert-lexicon", kind=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no completeness warning
        ig = mechnorm.integrated_gradients(model, batch, head=head, reduce="sum", n_steps=50, baseline=baseline)
    assert ig.metadata["hold_first"] is False  # an encoder's [CLS] is scaled like every token
    pad_row = model.W_E[model.tokenizer.pad_token_id].detach()
    x0 = torch.zeros_like(embeds) if baseline == "zero" else pad_row.expand_as(embeds)
    with torch.no_grad():
        predicted = class_logits(embeds).argmax(-1)
        change = (class_logits(embeds) - class_logits(x0)).gather(-1, predicted[:, None])[:, 0]
    totals = ig.scores[0].nansum(-1)
    torch.testing.assert_close(totals, change, atol=0, rtol=0.01)
    # per token, against a midpoint-rule IG through the HF model written here
    steps, grads = 100, torch.zeros_like(embeds)
    for alpha in (torch.arange(steps) + 0.5) / steps:
        path = (x0 + alpha * (embeds - x0)).requires_grad_(True)
        (grad,) = torch.autograd.grad(class_logits(path).gather(-1, predicted[:, None]).sum(), path)
        grads += grad
    reference = ((embeds - x0) * grads / steps).sum(-1)
    real = batch.attention_mask
    torch.testing.assert_close(ig.scores[0][real], reference[real], atol=0.01 * float(reference.abs().max()), rtol=0)
    # each sequence alone gets the scores it gets in the padded batch
    for i in range(len(batch)):
        n = int(batch.attention_mask[i].sum())
        alone = mechnorm.integrated_gradients(model, batch.tokens[i : i + 1, :n], head=head, reduce="sum", n_steps=50,
                                              baseline=baseline)
        torch.testing.assert_close(alone.scores[0, 0], ig.scores[0, i, :n], atol=1e-4, rtol=1e-4)


def test_attribute_explains_a_classifier_through_its_head(bert_classifier):
    head, batch, _, class_logits = bert_classifier
    model = mechnorm.load_model("zoo:bert-lexicon")
    methods = ("normxlogit", "saliency", "grad_x_input", "integrated_gradients", "rollout")
    comp = mechnorm.attribute(model, batch, methods=methods, head=head, options={"integrated_gradients": {"n_steps": 20}})
    direct = mechnorm.saliency(model, batch, head=head)
    torch.testing.assert_close(comp["saliency"].scores, direct.scores, equal_nan=True)
    with pytest.raises(ValueError, match="encoder.*classifier head"):
        mechnorm.saliency(model, batch)
    with pytest.raises(ValueError, match="encoder.*classifier head"):
        mechnorm.attribute(model, batch, methods=("normxlogit",))
