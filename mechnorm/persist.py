"""Save a result to disk and load it back in another notebook: safetensors + JSON, no pickle.

The format (version 1) is a **directory** holding two files:

- ``tensors.safetensors``: every tensor of the result, named by where it sits in the result
  (``scores``, ``mask``, ``metadata.positions``, ``attributions.normxlogit.scores``, …);
  readable with ``safetensors.safe_open`` from any language safetensors supports;
- ``result.json``: everything else, as JSON: ``{"format": "mechnorm.result",
  "format_version": 1, "mechnorm_version": …, "class": "mechnorm.result:Attribution",
  "fields": {…}, "dropped": […]}``. ``fields`` holds the dataclass fields by name (method,
  layers, tokens, target labels, signed, metadata, …). Plain JSON values stay as they are;
  a few tags keep Python types exact: ``{"__tensor__": name}`` (a tensor in the safetensors
  file), ``{"__ndarray__": name}`` (a numpy array, stored as a tensor), ``{"__tuple__": […]}``,
  ``{"__items__": [[key, value], …]}`` (a dict with non-string keys, e.g. a vocabulary
  ``{id: string}``) and ``{"__dataclass__": "module:Class", "fields": {…}}`` (a nested result,
  e.g. each Attribution of a Comparison). NaN is written as JSON's ``NaN`` extension.

It is generic over dataclass fields, so fields added to a result class later are saved too.
A metadata entry (any dict value) that is neither a tensor, an array nor JSON-serialisable
(e.g. a Python object) is **dropped with a warning** and its path listed under ``"dropped"``;
such a value in a dataclass field itself is an error. Loading only imports classes from the
``mechnorm`` package and never unpickles anything.

Example:
    >>> attr.save("runs/normxlogit-sst2")                                  # doctest: +SKIP
    >>> again = mechnorm.Attribution.load("runs/normxlogit-sst2")         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save", "load", "FORMAT_VERSION", "TENSORS_FILE", "JSON_FILE"]

FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
JSON_FILE = "result.json"
_FORMAT = "mechnorm.result"


class _NotSerialisable(TypeError):
    pass


def save(result, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a result dataclass (Attribution, Comparison, LensResult, …) to the directory ``path``.

    Args:
        result: any mechnorm result dataclass.
        path: a directory (created); it receives ``tensors.safetensors`` and ``result.json``.
        overwrite: replace a result already saved there; by default that is an error.

    Returns:
        The directory's path.

    Example:
        >>> mechnorm.persist.save(attr, "runs/attr")                      # doctest: +SKIP
        PosixPath('runs/attr')
    """
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        raise TypeError(f"Only mechnorm result dataclasses can be saved, got {type(result).__name__}.")
    path = Path(path)
    if (path / JSON_FILE).exists() and not overwrite:
        raise FileExistsError(f"A result is already saved in {path}; pass overwrite=True to replace it.")
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    encoded = _encode(result, "", tensors, dropped, droppable=False)
    if dropped:
        warnings.warn(
            f"Not saved (neither tensors nor JSON-serialisable): {dropped}; the loaded result lacks them.",
            stacklevel=2,
        )
    document = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "mechnorm_version": _version(),
        "class": encoded["__dataclass__"],
        "fields": encoded["fields"],
        "dropped": dropped,
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / TENSORS_FILE), metadata={"format": _FORMAT, "format_version": str(FORMAT_VERSION)})
    (path / JSON_FILE).write_text(json.dumps(document, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def load(path: str | os.PathLike, expected: type | None = None):
    """Read back a result written by :func:`save` (tensors on the CPU).

    Args:
        path: the directory given to :func:`save` (or its ``result.json``).
        expected: the class the caller wants (``Attribution.load`` passes ``Attribution``);
            a different stored class is an error naming the right ``load``.

    Example:
        >>> attr = mechnorm.persist.load("runs/attr")                     # doctest: +SKIP
    """
    path = Path(path)
    if path.name == JSON_FILE:
        path = path.parent
    if not (path / JSON_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise FileNotFoundError(f"No saved result in {path}: expected {JSON_FILE} and {TENSORS_FILE} there "
                                "(written by result.save(path)).")
    document = json.loads((path / JSON_FILE).read_text(encoding="utf-8"))
    if document.get("format") != _FORMAT:
        raise ValueError(f"{path / JSON_FILE} is not a mechnorm result (format {document.get('format')!r}).")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written in format version {document['format_version']}, newer than this "
                         f"mechnorm reads ({FORMAT_VERSION}); upgrade mechnorm.")
    cls = _class(document["class"])
    if expected is not None and cls is not expected:
        raise TypeError(f"{path} holds a {cls.__name__}, not a {expected.__name__}; "
                        f"use {cls.__name__}.load or mechnorm.persist.load.")
    tensors = load_file(str(path / TENSORS_FILE))
    return _decode({"__dataclass__": document["class"], "fields": document["fields"]}, tensors)


def _encode(value: Any, where: str, tensors: dict, dropped: list, droppable: bool) -> Any:
    """``value`` as JSON-ready data; tensors go to ``tensors`` under the key ``where``."""
    child = lambda key: f"{where}.{key}" if where else str(key)  # noqa: E731
    if isinstance(value, torch.Tensor):
        tensors[where] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": where}
    if isinstance(value, np.ndarray):
        tensors[where] = torch.from_numpy(np.ascontiguousarray(value)).clone()
        return {"__ndarray__": where}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: _encode(getattr(value, f.name), child(f.name), tensors, dropped, False)
                  for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        items = [_encode(v, child(i), tensors, dropped, droppable) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        out: dict = {}
        for key, item in value.items():
            try:
                out[key] = _encode(item, child(key), tensors, dropped, True)
            except _NotSerialisable:
                dropped.append(child(key))
        if all(isinstance(k, str) and not k.startswith("__") for k in out):
            return out
        return {"__items__": [[_encode(k, child(k), tensors, dropped, False), v] for k, v in out.items()]}
    if droppable:
        raise _NotSerialisable(where)
    raise TypeError(f"Cannot save {where or 'the result'}: a {type(value).__name__} is neither a tensor nor "
                    "JSON-serialisable; convert it (e.g. to a string or tensor) before saving.")


def _decode(value: Any, tensors: dict) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    if "__dataclass__" in value:
        cls = _class(value["__dataclass__"])
        return cls(**{name: _decode(v, tensors) for name, v in value["fields"].items()})
    return {k: _decode(v, tensors) for k, v in value.items()}


def _class(name: str) -> type:
    """The class ``module:qualname``, imported only from the mechnorm package."""
    module, _, qualname = name.partition(":")
    if module.split(".")[0] != "mechnorm":
        raise ValueError(f"Refusing to load class {name!r}: only mechnorm result classes are loaded.")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mechnorm")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


class ResultIO:
    """``show``, ``save`` and ``load`` for a result class that defines ``plot()``.

    ``Attribution``, ``Comparison`` and ``LensResult`` inherit these.

    Example:
        >>> attr.show()                                                  # doctest: +SKIP
        >>> attr.save("runs/attr")                                       # doctest: +SKIP
        >>> attr = mechnorm.Attribution.load("runs/attr")                # doctest: +SKIP
    """

    def show(self, **kwargs) -> None:
        """Display ``self.plot(**kwargs)`` in the notebook (``fig.show()``); returns None."""
        self.plot(**kwargs).show()

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write this result to the directory ``path`` (safetensors + JSON; :func:`save`)."""
        return save(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read back a result of this class written by :meth:`save` (:func:`load`)."""
        return load(path, cls)
