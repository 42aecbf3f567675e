"""LoRA adapters (peft) trained on a data subset: training, saving, loading, and their updates.

An adapter on a frozen linear map ``W`` learns ``ΔW = (α / r) · B · A`` with
``A ∈ R^{r×d_in}`` (random at start) and ``B ∈ R^{d_out×r}`` (zero at start). RepMatch
compares the column spaces of ``B · A`` (the scale ``α / r`` does not change them).
:class:`Adapter` holds the peft state dict and config, so it saves as an ordinary peft
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from .models import Base, encode, load_base, per_example_loss

QV = "attention query/value"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


@dataclass
class Adapter:
    """A trained (or initial) LoRA adapter: peft config + state dict + how it was made.

    ``state`` uses peft's saved key names (``base_model.model.<module>.lora_A.weight``).

    Example:
        >>> adapter = train_adapter("zoo:bert-lexicon", examples, steps=50)   # doctest: +SKIP
        >>> adapter.save("adapters/lexicon")                                 # doctest: +SKIP
        >>> Adapter.load("adapters/lexicon").matrices()[:2]                    # doctest: +SKIP
        [(0, 'query'), (0, 'value')]
    """

    config: object  # peft.LoraConfig
    state: dict[str, Tensor]
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The LoRA rank ``r``."""
        return int(self.config.r)

    def factors(self) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """``(layer, matrix) -> (B [d_out, r], A [r, d_in])`` for every adapted matrix."""
        found: dict[str, dict[str, Tensor]] = {}
        for key, value in self.state.items():
            match = _KEY.match(key)
            if match:
                found.setdefault(match["module"], {})[match["factor"]] = value
        out = {}
        for module, pair in found.items():
            layer = re.search(r"\.(\d+)\.", f".{module}.")
            out[(int(layer[1]) if layer else -1, module.split(".")[-1])] = (pair["B"], pair["A"])
        return dict(sorted(out.items()))

    def matrices(self) -> list[tuple[int, str]]:
        """The adapted ``(layer, matrix)`` pairs, in order."""
        return list(self.factors())

    def delta(self, layer: int, matrix: str) -> Float[Tensor, "d_out d_in"]:
        """``B · A`` of one adapted matrix (without the ``α / r`` scale)."""
        B, A = self.factors()[(layer, matrix)]
        return B.double() @ A.double()

    def save(self, folder: str | Path) -> Path:
        """Write an ordinary peft adapter folder; returns it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(folder / "adapter_model.safetensors"))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Adapter":
        """Read a peft adapter folder (as :meth:`save` or ``PeftModel.save_pretrained`` write it)."""
        from peft import LoraConfig
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} is not a peft adapter folder (no adapter_model.safetensors).")
        return cls(LoraConfig.from_pretrained(str(folder)), load_file(str(folder / "adapter_model.safetensors")))

    def __repr__(self) -> str:
        return f"Adapter(rank={self.rank}, matrices={len(self.factors())}, info={self.info})"


def as_adapter(adapter) -> Adapter:
    """An :class:`Adapter` from an Adapter, a peft adapter folder, or a ``PeftModel``."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, (str, Path)):
        return Adapter.load(adapter)
    if hasattr(adapter, "peft_config"):
        from peft import get_peft_model_state_dict

        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(adapter).items()}
        return Adapter(copy.deepcopy(adapter.peft_config["default"]), state)
    raise TypeError(f"Expected an Adapter, a peft adapter folder or a PeftModel, got {type(adapter).__name__}.")


def lora_config(base: Base, rank: int, alpha: float | None = None, target=QV):
    """The LoRA config: rank ``r``, ``α`` (default ``4``, as the authors), no dropout, no bias."""
    from peft import LoraConfig

    modules = base.target_modules if target == QV else list(target)
    return LoraConfig(r=rank, lora_alpha=4.0 if alpha is None else alpha, target_modules=modules,
                      lora_dropout=0.0, bias="none", fan_in_fan_out=base.info.get("model_type") == "gpt2")


def with_adapter(base: Base, adapter: Adapter | None = None, *, config=None, seed: int = 0):
    """A copy of ``base.model`` wrapped by peft: ``adapter``'s weights, or fresh ones seeded by ``seed``.

    Only the LoRA factors are trainable; the base model (classifier head included) stays frozen.
    """
    from peft import get_peft_model, set_peft_model_state_dict

    torch.manual_seed(seed)  # peft initialises A from the global generator
    model = get_peft_model(copy.deepcopy(base.model), copy.deepcopy(config if adapter is None else adapter.config))
    if adapter is not None:
        result = set_peft_model_state_dict(model, adapter.state)
        if result.unexpected_keys:
            raise ValueError(f"Adapter does not fit this model; unexpected keys: {result.unexpected_keys[:3]}...")
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def initial_adapter(model, rank: int = 1, *, seed: int = 0, alpha: float | None = None, target=QV) -> Adapter:
    """The seeded, untrained adapter (``B = 0``, ``A`` random) that instance scores start from.

    Example:
        >>> init = initial_adapter("zoo:bert-lexicon", rank=1, seed=0)   # doctest: +SKIP
        >>> float(init.delta(0, "query").abs().max())                     # doctest: +SKIP
        0.0
    """
    base = load_base(model)
    return as_adapter(with_adapter(base, config=lora_config(base, rank, alpha, target), seed=seed))


def train_adapter(model, examples: Sequence, rank: int = 4, target=QV, *, steps: int = 100, lr: float = 1e-3,
                  seed: int = 0, batch_size: int = 16, weight_decay: float = 0.01, alpha: float | None = None,
                  out: str | Path | None = None, progress: bool = False) -> Adapter:
    """Fine-tune a LoRA adapter on ``examples`` with the rest of the model frozen.

    AdamW (``lr``, ``weight_decay``) on the mean per-example loss of batches drawn without
    replacement (reshuffled each epoch) from a generator seeded by ``seed``; ``seed`` also
    initialises ``A``. Same seed, same adapter, bit for bit.

    Args:
        model: anything :func:`~mechnorm.repmatch.models.load_base` takes (``"zoo:bert-lexicon"``, a :class:`Base`...).
        examples: task Examples (classifier or LM), or strings for a causal LM.
        target: ``"attention query/value"`` or a list of module names.
        out: also save the adapter there (an ordinary peft adapter folder).

    Example:
        >>> from mechnorm import tasks
        >>> adapter = train_adapter("zoo:bert-lexicon", tasks.get_task("lexicon").train(64),
        ...                         rank=4, steps=20, seed=0)         # doctest: +SKIP
        >>> adapter.matrices()                                         # doctest: +SKIP
        [(0, 'query'), (0, 'value'), (1, 'query'), (1, 'value')]
    """
    if steps < 0 or rank < 1 or batch_size < 1:
        raise ValueError(f"Need steps >= 0, rank >= 1 and batch_size >= 1 (got {steps}, {rank}, {batch_size}).")
    base = load_base(model)
    data = encode(base, examples)
    peft_model = with_adapter(base, config=lora_config(base, rank, alpha, target), seed=seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    peft_model.train()
    for _ in tqdm(range(steps), desc="train adapter", disable=not progress):
        if len(order) < min(batch_size, len(data)):
            order += torch.randperm(len(data), generator=generator).tolist()
        index, order = order[:batch_size], order[batch_size:]
        loss = per_example_loss(base, peft_model, data[index].trimmed()).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    adapter = as_adapter(peft_model)
    adapter.info = dict(model=base.name, n_examples=len(data), rank=rank, steps=steps, lr=lr, seed=seed,
                        batch_size=batch_size, weight_decay=weight_decay)
    if out is not None:
        adapter.save(out)
    return adapter


def merged(model, adapter) -> nn.Module:
    """``model`` with ``adapter``'s update merged into its weights (a plain HF model again).

    Example:
        >>> merged("zoo:gpt2-agree-recall", adapter).save_pretrained("tmp/merged")   # doctest: +SKIP
    """
    return with_adapter(load_base(model), as_adapter(adapter)).merge_and_unload().eval()
