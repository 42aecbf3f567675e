"""Small models trained on :mod:`mechnorm.tasks`, shipped with the package in HF format.

Each model lives in ``mechnorm/zoo/<name>/`` (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, README.md, metadata.json) and is trained by
``python experiments/train_zoo.py --only <name>``. Load one with
``mechnorm.load_model("zoo:<name>", kind="hooked" | "bridge")`` or with plain transformers
from :func:`path`.

Example:
    >>> from mechnorm import zoo
    >>> [m.name for m in zoo.list()]
    ['bert-lexicon', 'gpt2-agree-recall', 'llama-agree-recall']
    >>> zoo.path("gpt2-agree-recall").name
    'gpt2-agree-recall'
"""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
METADATA = "metadata.json"
CLASSIFIER = "classifier.safetensors"


@dataclass(frozen=True)
class ZooModel:
    """What a shipped model is and how well it does (read from its ``metadata.json``).

    Attributes:
        name: the folder name, as in ``"zoo:<name>"``.
        description: one line.
        architecture: the HF class the folder loads as (e.g. ``"GPT2LMHeadModel"``).
        tasks: the :mod:`mechnorm.tasks` it was trained on.
        accuracy: held-out accuracy per task, measured when it was trained.
        path: the folder.
    """

    name: str
    description: str
    architecture: str
    tasks: tuple[str, ...]
    accuracy: dict[str, float]
    path: Path

    def __str__(self) -> str:
        scores = ", ".join(f"{task} {acc:.1%}" for task, acc in self.accuracy.items())
        return f"{self.name}: {self.description} [{scores}]"


def names() -> builtins.list[str]:
    """Names of the shipped models.

    Example:
        >>> "bert-lexicon" in names()
        True
    """
    return sorted(p.name for p in ROOT.iterdir() if (p / METADATA).is_file())


def list() -> builtins.list[ZooModel]:  # noqa: A001 - zoo.list() reads naturally
    """Every shipped model with its description, tasks and held-out accuracy.

    Example:
        >>> for model in list(): print(model)        # doctest: +SKIP
        bert-lexicon: BERT-style classifier ... [lexicon 99.9%]
    """
    return [info(name) for name in names()]


def path(name: str) -> Path:
    """The folder of the shipped model ``name``.

    Raises:
        KeyError: naming the available models when ``name`` is not one of them.

    Example:
        >>> (path("gpt2-agree-recall") / "config.json").exists()
        True
    """
    folder = ROOT / name
    if not name or "/" in name or not (folder / METADATA).is_file():
        raise KeyError(f"No zoo model named {name!r}; available: {', '.join(names()) or 'none'}.")
    return folder


def metadata(name: str) -> dict:
    """The raw ``metadata.json`` of model ``name`` (training settings, accuracies, sizes).

    Example:
        >>> metadata("bert-lexicon")["tasks"]
        ['lexicon']
    """
    return json.loads((path(name) / METADATA).read_text())


def info(name: str) -> ZooModel:
    """A :class:`ZooModel` summary of model ``name``.

    Example:
        >>> info("llama-agree-recall").architecture
        'LlamaForCausalLM'
    """
    meta = metadata(name)
    return ZooModel(
        name=name,
        description=meta["description"],
        architecture=meta["architecture"],
        tasks=tuple(meta["tasks"]),
        accuracy={task: float(acc) for task, acc in meta["accuracy"].items()},
        path=path(name),
    )


def classifier_head(name: str | Path):
    """The classification head of a zoo classifier, as a :class:`mechnorm.LinearHead`.

    ``name`` is a zoo name, or the :class:`~pathlib.Path` of a zoo-format folder elsewhere
    (one ``experiments/train_zoo.py --out`` wrote).

    The head is ``logits = LayerNorm(x) @ weight.T + bias`` with a parameter-free LayerNorm.
    The encoder's last output LayerNorm was trained with its affine frozen at identity, so
    this head gives the model's class logits both from the final hidden state (HF
    ``hidden_states[-1]``, the bridge's last ``hook_resid_post``; LayerNorm is idempotent
    there) and from a ``HookedEncoder``'s last ``hook_resid_post``, which TransformerLens
    records *before* that LayerNorm.

    Its ``labels`` are the class names of the task it was trained on.

    Example:
        >>> head = classifier_head("bert-lexicon")
        >>> head.n_outputs, head.labels
        (2, ('negative', 'positive'))
    """
    from safetensors.torch import load_file

    from ..heads import FinalNorm, LinearHead
    from ..tasks import get_task

    folder = name if isinstance(name, Path) else path(name)
    file = folder / CLASSIFIER
    if not file.is_file():
        raise ValueError(f"Zoo model {str(name)!r} has no classifier head; classifiers: "
                         f"{[n for n in names() if (ROOT / n / CLASSIFIER).is_file()]}.")
    weights = load_file(str(file))
    meta = json.loads((folder / METADATA).read_text())
    eps = float(meta["head"]["layer_norm_eps"])
    labels = get_task(meta["tasks"][0]).labels
    return LinearHead(weights["weight"], weights["bias"], norm=FinalNorm("layernorm", eps=eps), labels=labels)
