"""The plain ``transformers`` models RepMatch fine-tunes, and how examples become a loss.

peft adapts ordinary torch modules, so RepMatch works on HF models, not on TransformerLens
ones. :func:`load_base` builds a :class:`Base` from a zoo name, a fetched model name, an
HF folder or an already-built HF model:

* ``"zoo:bert-lexicon"``: the zoo BERT body with a linear ``[CLS]`` head
  (:class:`ZooClassifier`), frozen. ``head="random"`` (default) gives a freshly initialised
  head, as in the RepMatch paper (pretrained body, random frozen classifier, the adapter
  does all the learning); ``head="zoo"`` the trained one, which already solves the task.
* ``"zoo:gpt2-agree-recall"``, ``"zoo:llama-agree-recall"``, ``"smollm2-135m"``, an HF
  causal-LM folder or model: next-token loss on every real token of each sequence.

Per-example loss is the mean over that example's own tokens, so a batch of one gives the
same number as the example alone, and padding (on the right) never enters it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

Kind = Literal["classifier", "lm"]

# Attention query and value projections per architecture; GPT-2 and GPT-NeoX fuse q, k and
# v into one matrix, so their adapters update all three (there is no separate q or v).
QV_MODULES = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}


class ZooClassifier(nn.Module):
    """An HF BERT body and a linear head on its final ``[CLS]`` state (the zoo classifier).

    ``logits = W · h_L[CLS] + b``; the body's last LayerNorm already normalises ``h_L``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> body = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                             intermediate_size=16, vocab_size=10), add_pooling_layer=False)
        >>> ZooClassifier(body, 2)(torch.tensor([[1, 2]]), torch.tensor([[1, 1]])).shape
        torch.Size([1, 2])
    """

    def __init__(self, bert: nn.Module, n_classes: int):
        super().__init__()
        self.bert = bert
        self.config = bert.config
        self.classifier = nn.Linear(bert.config.hidden_size, n_classes)

    def forward(self, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classifier(hidden[:, 0])


@dataclass
class Base:
    """A frozen HF model RepMatch puts adapters on, and how to turn examples into tensors.

    Attributes:
        model: the plain torch/transformers module (never modified by RepMatch).
        kind: ``"classifier"`` (cross-entropy of the class logits) or ``"lm"`` (next token).
        target_modules: the attention query/value module names LoRA adapts.
        tokenizer: used for string examples; task examples carry their own ids.
        pad_id: the id padding uses.
        name: where it came from.
    """

    model: nn.Module
    kind: Kind
    target_modules: list[str]
    tokenizer: object = None
    pad_id: int = 0
    name: str = ""
    info: dict = field(default_factory=dict)


def _eager(cls, folder, **kwargs):
    return cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32, **kwargs).eval()


def load_base(source, *, head: Literal["random", "zoo"] = "random", seed: int = 0,
              target_modules: Sequence[str] | None = None) -> Base:
    """The frozen model to adapt: a zoo name, a fetched name, an HF folder or an HF model.

    Args:
        source: ``"zoo:<name>"``, ``"smollm2-135m"`` (fetched), an HF folder, a :class:`Base`,
            or an HF ``PreTrainedModel`` (a causal LM).
        head: for the zoo classifier, ``"random"`` (seeded by ``seed``) or ``"zoo"``.
        target_modules: override the query/value module names.

    An HF model passed in is put in eval mode and frozen in place (``requires_grad`` off);
    RepMatch never changes its weights (adapters are trained on copies).

    Example:
        >>> base = load_base("zoo:bert-lexicon")             # doctest: +SKIP
        >>> base.kind, base.target_modules                    # doctest: +SKIP
        ('classifier', ['query', 'value'])
    """
    from transformers import PreTrainedModel
    from transformers.utils import logging

    if isinstance(source, Base):
        return source
    if isinstance(source, PreTrainedModel):
        return _finish(source.eval(), "lm", None, type(source).__name__, target_modules)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the zoo BERT folder also holds an unused masked-LM head
    try:
        return _load(source, head, seed, target_modules)
    finally:
        logging.set_verbosity(verbosity)


def _load(source, head, seed, target_modules) -> Base:
    from transformers import AutoModelForCausalLM, AutoTokenizer, BertModel

    folder, name = _folder(str(source)), str(source)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if (folder / "classifier.safetensors").is_file():
        from safetensors.torch import load_file

        from .. import tasks

        meta = json.loads((folder / "metadata.json").read_text())
        n_classes = len(tasks.get_task(meta["tasks"][0]).labels)
        model = ZooClassifier(_eager(BertModel, folder, add_pooling_layer=False), n_classes).eval()
        if head == "zoo":
            model.classifier.load_state_dict(load_file(str(folder / "classifier.safetensors")))
        elif head == "random":
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                bound = model.config.hidden_size ** -0.5
                model.classifier.weight.copy_(torch.rand(model.classifier.weight.shape, generator=generator) * 2 * bound - bound)
                model.classifier.bias.zero_()
        else:
            raise ValueError(f"head must be 'random' or 'zoo', got {head!r}.")
        kind = "classifier"
    else:
        model, kind = _eager(AutoModelForCausalLM, folder), "lm"
    return _finish(model, kind, tokenizer, name, target_modules)


def _finish(model, kind, tokenizer, name, target_modules) -> Base:
    model.requires_grad_(False)
    model_type = model.config.model_type
    if target_modules is None:
        if model_type not in QV_MODULES:
            raise ValueError(f"No query/value module names known for model_type {model_type!r}; "
                             f"pass target_modules=[...] (known: {sorted(QV_MODULES)}).")
        target_modules = QV_MODULES[model_type]
    pad = model.config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Base(model, kind, list(target_modules), tokenizer, int(pad or 0), name, {"model_type": model_type})


def _folder(name: str) -> Path:
    from .. import fetch, zoo

    if name.startswith("zoo:"):
        return zoo.path(name[4:])
    if Path(name).is_dir():
        return Path(name)
    try:
        return fetch.local_path(name)
    except KeyError:
        raise FileNotFoundError(f"{name!r} is neither 'zoo:<name>' ({', '.join(zoo.names())}), a fetched "
                                "model name nor an HF folder.") from None


@dataclass
class Encoded:
    """Examples as right-padded tensors; ``labels`` are class ids or next-token ids (-100 = ignored)."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    labels: Int[Tensor, "batch"] | Int[Tensor, "batch pos"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index) -> "Encoded":
        index = [index] if isinstance(index, int) else index
        return Encoded(self.input_ids[index], self.attention_mask[index], self.labels[index])

    def trimmed(self) -> "Encoded":
        """Drop trailing columns that are padding in every row."""
        length = int(self.attention_mask.sum(-1).max())
        labels = self.labels if self.labels.ndim == 1 else self.labels[:, :length]
        return Encoded(self.input_ids[:, :length], self.attention_mask[:, :length], labels)


def encode(base: Base, examples: Sequence) -> Encoded:
    """Task :class:`~mechnorm.tasks.Example` s (or strings, for LMs) as padded tensors.

    Classification examples give ``labels[b]`` = class id; LM examples use their full
    sequence (prompt, answer, continuation) and ``labels[b, t]`` = id at ``t + 1``.

    Example:
        >>> from mechnorm import tasks
        >>> base = load_base("zoo:bert-lexicon")                       # doctest: +SKIP
        >>> encode(base, tasks.get_task("lexicon").train(4)).labels.shape   # doctest: +SKIP
        torch.Size([4])
    """
    if len(examples) == 0:
        raise ValueError("No examples given.")
    rows, classes = [], []
    for example in examples:
        if isinstance(example, str):
            if base.kind != "lm" or base.tokenizer is None:
                raise ValueError("String examples need a causal LM with a tokenizer; give task Examples instead.")
            rows.append(list(base.tokenizer(example)["input_ids"]))
        elif base.kind == "classifier":
            rows.append(list(example.tokens))
            classes.append(int(example.answer))
        else:
            rows.append(list(example.sequence()))
        if len(rows[-1]) < (1 if base.kind == "classifier" else 2):
            raise ValueError(f"Example {len(rows) - 1} is too short to give a loss: {example!r}.")
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), base.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    if base.kind == "classifier":
        return Encoded(ids, mask, torch.tensor(classes))
    labels = torch.cat([ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100), torch.full((len(rows), 1), -100)], 1)
    return Encoded(ids, mask, labels)


def additive_mask(base: Base, attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch 1 pos pos"]:
    """The 4-D additive attention mask (0 = attend, dtype min = not) the HF model builds itself.

    Passing it ready-made lets ``torch.func.vmap`` run the model: transformers' own mask
    builder branches on the mask's values (``padding_mask.all()``), which vmap cannot trace.
    """
    keep = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[-1], -1)
    if base.kind == "lm":
        keep = keep & torch.ones(keep.shape[-2:], dtype=torch.bool).tril()
    dtype = next(base.model.parameters()).dtype
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def per_example_loss(base: Base, model: nn.Module, batch: Encoded) -> Float[Tensor, "batch"]:
    """Each example's own loss: class cross-entropy, or mean next-token cross-entropy.

    ``batch.attention_mask`` may be 2-D (padding) or the 4-D mask of :func:`additive_mask`.
    """
    if base.kind == "classifier":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return F.cross_entropy(_at_least_fp32(logits), batch.labels, reduction="none")
    logits = _at_least_fp32(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
    tokens = F.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none", ignore_index=-100)
    counted = (batch.labels != -100).sum(-1)
    return tokens.sum(-1) / counted


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def accuracy(base: Base, model: nn.Module, examples: Sequence, batch_size: int = 256) -> float:
    """Classifier accuracy, or (LM) accuracy of the answer token at each example's prediction position.

    Example:
        >>> base = load_base("zoo:bert-lexicon", head="zoo")                          # doctest: +SKIP
        >>> accuracy(base, base.model, tasks.get_task("lexicon").test(50))           # doctest: +SKIP
        1.0
    """
    hits = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = encode(base, chunk)
            if base.kind == "classifier":
                hits += int((model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).argmax(-1) == batch.labels).sum())
            else:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                pos = torch.tensor([e.prediction_position for e in chunk])
                hits += int((logits[torch.arange(len(chunk)), pos].argmax(-1) == torch.tensor([e.answer for e in chunk])).sum())
    return hits / len(examples)
