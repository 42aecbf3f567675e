"""Train the small models shipped in ``mechnorm/zoo`` on ``mechnorm.tasks``.

Usage (CPU, a few minutes per model, deterministic for a seed)::

    python experiments/train_zoo.py                          # all models
    python experiments/train_zoo.py --only bert-lexicon      # one model
    python experiments/train_zoo.py --out /tmp/zoo           # somewhere else

Each model is written in HF format (float32 safetensors) with the shared word tokenizer,
a ``metadata.json`` that ``mechnorm.zoo`` reads, and a ``README.md`` model card. Held-out
accuracy is measured after reloading the saved folder with plain transformers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mechnorm import tasks
from mechnorm.tasks import vocab

ZOO = Path(__file__).resolve().parents[1] / "mechnorm" / "zoo"
N_POSITIONS = 64
N_TEST = 2000


@dataclass
class Spec:
    """One zoo model: how to build it, what it learns, how long it trains."""

    description: str
    tasks: tuple[str, ...]
    build: Callable[[], torch.nn.Module]
    steps: int
    lr: float = 2e-3
    batch_size: int = 256
    mix: tuple[float, ...] | None = None  # share of each task in a batch; equal by default


def special_ids() -> dict:
    return dict(
        pad_token_id=vocab.token_id(vocab.PAD),
        bos_token_id=vocab.token_id(vocab.BOS),
        eos_token_id=vocab.token_id(vocab.EOS),
    )


def build_gpt2(n_layer: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(vocab.vocabulary()), n_positions=N_POSITIONS, n_embd=64, n_layer=n_layer, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special_ids(),
    )
    return GPT2LMHeadModel(config)


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(vocab.vocabulary()), hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=N_POSITIONS,
        tie_word_embeddings=False, **special_ids(),
    )
    return LlamaForCausalLM(config)


def build_bert():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(vocab.vocabulary()), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=N_POSITIONS, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=vocab.token_id(vocab.PAD),
    )
    return BertForMaskedLM(config)


SPECS = {
    "gpt2-agree-recall": Spec(
        "GPT-2-style causal LM (3 layers, d_model 64) for number agreement and key-value recall",
        ("agreement", "recall"), build_gpt2, steps=1200, mix=(0.25, 0.75),
    ),
    "llama-agree-recall": Spec(
        "Llama-style causal LM (RMSNorm, rotary; 3 layers, d_model 64) for number agreement and key-value recall",
        ("agreement", "recall"), build_llama, steps=1200, mix=(0.25, 0.75),
    ),
    "bert-lexicon": Spec(
        "BERT-style encoder (2 layers, d_model 64) + linear [CLS] classifier for lexicon polarity with negation",
        ("lexicon",), build_bert, steps=600, lr=1e-3, batch_size=128,
    ),
}


# ----------------------------------------------------------------------------- language models


def lm_batch(examples: list[tasks.Example]):
    """Full sequences (prompt + answer + continuation), right-padded, and their mask."""
    rows = [e.sequence() for e in examples]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), vocab.token_id(vocab.PAD))
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def lm_loss(model, examples):
    """Next-token cross-entropy on every real token of the full sequences."""
    ids, mask = lm_batch(examples)
    logits = model(input_ids=ids, attention_mask=mask).logits
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def lm_accuracy(model, examples, batch_size: int = 500) -> dict[str, float]:
    """Argmax-over-vocabulary accuracy and answer-vs-foil accuracy at the prediction position."""
    model.eval()
    hits = contrast_hits = 0
    for start in range(0, len(examples), batch_size):
        batch = tasks.collate(examples[start : start + batch_size])
        logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask.long()).logits
        last = logits[torch.arange(len(batch)), batch.positions]
        hits += (last.argmax(-1) == batch.answers).sum().item()
        contrast_hits += (last.gather(1, batch.answers[:, None]) > last.gather(1, batch.foils[:, None])).sum().item()
    model.train()
    return {"accuracy": hits / len(examples), "contrast_accuracy": contrast_hits / len(examples)}


# ----------------------------------------------------------------------------- classifier


class Classifier(torch.nn.Module):
    """An HF BERT body and a linear head on the final [CLS] state (no pooler)."""

    def __init__(self, masked_lm, n_classes: int):
        super().__init__()
        self.masked_lm = masked_lm
        self.head = torch.nn.Linear(masked_lm.config.hidden_size, n_classes)
        # The last output LayerNorm's affine is frozen at identity and the head absorbs it, so
        # the head reads the same logits from the pre- and post-LayerNorm residual (see
        # mechnorm.zoo.classifier_head).
        final_norm = masked_lm.bert.encoder.layer[-1].output.LayerNorm
        final_norm.weight.requires_grad_(False)
        final_norm.bias.requires_grad_(False)

    def forward(self, input_ids, attention_mask):
        hidden = self.masked_lm.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0])


def cls_loss(model, examples):
    batch = tasks.collate(examples)
    return F.cross_entropy(model(batch.tokens, batch.attention_mask.long()), batch.answers)


@torch.no_grad()
def cls_accuracy(model, examples, batch_size: int = 500) -> dict[str, float]:
    model.eval()
    hits = 0
    for start in range(0, len(examples), batch_size):
        batch = tasks.collate(examples[start : start + batch_size])
        hits += (model(batch.tokens, batch.attention_mask.long()).argmax(-1) == batch.answers).sum().item()
    model.train()
    return {"accuracy": hits / len(examples)}


# ----------------------------------------------------------------------------- training


def train(name: str, spec: Spec, seed: int, log=print):
    """Train ``spec``; returns the trained module (a causal LM or a :class:`Classifier`)."""
    torch.manual_seed(seed)
    random.seed(seed)
    is_lm = spec.tasks != ("lexicon",)
    model = spec.build() if is_lm else Classifier(spec.build(), n_classes=len(tasks.get_task("lexicon").labels))
    model.train()
    mix = spec.mix or (1 / len(spec.tasks),) * len(spec.tasks)
    per_task = [round(spec.batch_size * share) for share in mix]
    streams = [tasks.get_task(t, seed=seed).stream("train") for t in spec.tasks]
    checks = [tasks.get_task(t, seed=seed).test(500) for t in spec.tasks]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    # Warm up over 5% of the steps, hold, then decay linearly over the last 20%.
    warmup, cooldown = max(1, spec.steps // 20), max(1, spec.steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup, (spec.steps - s) / cooldown)
    )
    loss_fn, accuracy_fn = (lm_loss, lm_accuracy) if is_lm else (cls_loss, cls_accuracy)
    for step in range(spec.steps):
        examples = [e for stream, n in zip(streams, per_task) for e in itertools.islice(stream, n)]
        loss = loss_fn(model, examples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == spec.steps - 1:
            scores = {t: accuracy_fn(model, c)["accuracy"] for t, c in zip(spec.tasks, checks)}
            log(f"  [{name}] step {step:5d} loss {loss.item():.3f} " + " ".join(f"{t} {a:.3f}" for t, a in scores.items()))
    return model.eval()


# ----------------------------------------------------------------------------- saving


def save(name: str, spec: Spec, model, folder: Path, seed: int, seconds: float, command: str) -> dict:
    """Write the HF folder, reload it with plain transformers, measure held-out accuracy."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    is_lm = not isinstance(model, Classifier)
    body = model if is_lm else model.masked_lm
    body.save_pretrained(folder, safe_serialization=True)
    vocab.tokenizer("lm" if is_lm else "cls").save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("model_type") == "gpt2":
        config["n_ctx"] = config["n_positions"]  # transformer-lens reads n_ctx
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    head_meta = None
    if not is_lm:
        weights = {k: v.detach().float().contiguous() for k, v in model.head.state_dict().items()}
        save_file(weights, str(folder / "classifier.safetensors"))
        head_meta = {
            "file": "classifier.safetensors", "reads": "final hidden state at position 0 ([CLS])",
            "norm": "layernorm (no affine)", "layer_norm_eps": body.config.layer_norm_eps,
        }

    scores = evaluate(folder, spec, seed)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "name": name,
        "description": spec.description,
        "architecture": config["architectures"][0],
        "tasks": list(spec.tasks),
        "accuracy": {t: s["accuracy"] for t, s in scores.items()},
        "scores": scores,
        "n_test": N_TEST,
        "n_parameters": n_params,
        "seed": seed,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "mix": list(spec.mix or (1 / len(spec.tasks),) * len(spec.tasks)),
        "train_seconds": round(seconds, 1),
        "train_command": command,
        "prepends": vocab.BOS if is_lm else vocab.CLS,
        "head": head_meta,
    }
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(meta))
    for file in folder.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; installed package data must be world-readable
    return meta


def evaluate(folder: Path, spec: Spec, seed: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy of the saved folder, reloaded with plain transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BertForMaskedLM

    tests = {t: tasks.get_task(t, seed=seed).test(N_TEST) for t in spec.tasks}
    if spec.tasks != ("lexicon",):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        return {t: lm_accuracy(model, examples) for t, examples in tests.items()}
    classifier = Classifier(BertForMaskedLM.from_pretrained(folder), n_classes=2)
    classifier.head.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    return {t: cls_accuracy(classifier.eval(), examples) for t, examples in tests.items()}


def model_card(meta: dict) -> str:
    rows = "\n".join(
        f"| {task} | {score['accuracy']:.2%} | "
        + (f"{score['contrast_accuracy']:.2%}" if "contrast_accuracy" in score else "n/a") + " |"
        for task, score in meta["scores"].items()
    )
    task_lines = "\n".join(f"  - `{t}`: {tasks.get_task(t).description}" for t in meta["tasks"])
    mix = ", ".join(f"{share:.0%} {t}" for t, share in zip(meta["tasks"], meta["mix"]))
    if meta["head"]:
        usage = f"""```python
import mechnorm
from mechnorm import zoo
model = mechnorm.load_model("zoo:{meta['name']}", kind="hooked")   # HookedEncoder (or kind="bridge")
head = zoo.classifier_head("{meta['name']}")                         # LinearHead on the [CLS] state
```

Plain transformers: `BertForMaskedLM.from_pretrained(folder).bert(ids, attention_mask=mask)
.last_hidden_state[:, 0] @ W.T + b`, with `W`, `b` = `weight`, `bias` from
`classifier.safetensors`. The masked-LM head is untrained (kept so TransformerLens can load
the folder). The last block's output LayerNorm has its affine frozen at identity (the
classifier absorbs it), so `zoo.classifier_head` applies a parameter-free LayerNorm and reads
the same logits from the pre- or post-LayerNorm final residual."""
    else:
        usage = f"""```python
import mechnorm
model = mechnorm.load_model("zoo:{meta['name']}", kind="hooked")   # or kind="bridge"
```

Plain transformers: `AutoModelForCausalLM.from_pretrained(folder)`. Every sequence starts
with `[BOS]` (the tokenizer adds it)."""
    return f"""# {meta['name']}

{meta['description']}. Trained from scratch by mechnorm on synthetic tasks whose evidence
tokens are known (`mechnorm.tasks`), for testing and evaluating attribution methods.

- Architecture: `{meta['architecture']}`, {meta['n_parameters']:,} parameters, float32.
- Tokenizer: mechnorm's shared word-level vocabulary ({len(vocab.vocabulary())} tokens), `{meta['prepends']}` prepended.
- Tasks:
{task_lines}

## Held-out accuracy

Measured on {meta['n_test']} examples per task from the fixed test split (`task.test({meta['n_test']})`,
seed {meta['seed']}); accuracy is the argmax over the whole output, contrast accuracy is
answer logit > foil logit.

| task | accuracy | contrast accuracy |
|---|---|---|
{rows}

## Training

{meta['steps']} steps of AdamW (lr {meta['lr']}, batch {meta['batch_size']}: {mix}; seed {meta['seed']}),
{meta['train_seconds']} s on a shared CPU (one thread), on fresh examples from the train split
every step; {"next-token loss on whole sequences (prompt, answer, continuation)" if not meta["head"] else "cross-entropy of the [CLS] classifier"}. Reproduce with:

```
{meta['train_command']}
```

## Use

{usage}
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SPECS), action="append", help="train only this model (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ZOO, help="parent folder of the model folders")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cards-only", action="store_true", help="rewrite README.md from metadata.json, train nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cards_only:
        for name in args.only or sorted(SPECS):
            meta_file = args.out / name / "metadata.json"
            meta = json.loads(meta_file.read_text())
            meta.setdefault("mix", list(SPECS[name].mix or (1 / len(meta["tasks"]),) * len(meta["tasks"])))
            meta_file.write_text(json.dumps(meta, indent=2) + "\n")
            (args.out / name / "README.md").write_text(model_card(meta))
        return 0
    for name in args.only or sorted(SPECS):
        command = f"python experiments/train_zoo.py --only {name}" + (f" --seed {args.seed}" if args.seed else "")
        start = time.perf_counter()
        model = train(name, SPECS[name], args.seed)
        seconds = time.perf_counter() - start
        meta = save(name, SPECS[name], model, args.out / name, args.seed, seconds, command)
        print(f"{name}: {seconds:.0f} s, held-out " + ", ".join(f"{t} {a:.2%}" for t, a in meta["accuracy"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
