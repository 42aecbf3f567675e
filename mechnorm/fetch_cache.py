"""The fetch cache's bookkeeping: the marker, file hashes, and what may never be deleted.

A converted folder is complete when it holds the marker (``mechnorm-fetch.json``, written
last) and ``config.json``. The marker lists every file mechnorm wrote with its size, SHA-256
and modification time; :func:`problem` checks them and :func:`foreign` lists the files a
re-fetch must not delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

__all__ = ["MARKER", "is_complete", "problem", "foreign", "write_marker", "read_marker"]

# Written last, inside the temporary folder, before it is renamed into place: a folder
# without it is not a finished conversion.
MARKER = "mechnorm-fetch.json"


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion (marker and config.json).

    Example:
        >>> is_complete(Path("/nonexistent"))
        False
    """
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


# Names that HF save_pretrained writes: the only files of a folder fetched by an older mechnorm
# (whose marker lists no files) that a re-fetch may replace.
_LEGACY_NAMES = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens)\.json"
    r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|chat_template\.jinja|tokenizer\.model"
)


def _files(folder: Path) -> list[str]:
    """Every file and link under ``folder`` (relative, posix), the marker excluded."""
    found = (p for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(p.relative_to(folder).as_posix() for p in found if p.name != MARKER or p.parent != folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` as a dict, or None when missing or unreadable.

    Example:
        >>> read_marker(Path("/nonexistent")) is None
        True
    """
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, info: dict) -> None:
    """Write atomically: concurrent loads may refresh the same marker."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def write_marker(folder: Path, info: dict) -> None:
    """Record ``info`` plus the size, SHA-256 and mtime of every file in ``folder`` in its marker.

    Example:
        >>> write_marker(Path("converted"), {"name": "smollm2-135m"})  # doctest: +SKIP
    """

    files = {}
    for rel in _files(folder):
        stat = (folder / rel).stat()
        files[rel] = {"size": stat.st_size, "sha256": _sha256(folder / rel), "mtime_ns": stat.st_mtime_ns}
    info = {**info, "files": files}
    _write_json(folder / MARKER, info)


def problem(folder: Path, full: bool = False) -> str | None:
    """What is wrong with a complete folder's files (``mechnorm.fetch.verify``), or None.

    Example:
        >>> problem(Path("~/.cache/mechnorm/smollm2-135m").expanduser())  # doctest: +SKIP
    """
    info = read_marker(folder)
    if info is None:
        return f"its marker {MARKER} is unreadable"
    files = info.get("files")
    if files is None:
        return None  # fetched by an older mechnorm: no sizes or hashes to check against
    refreshed = False
    for rel, record in files.items():
        try:
            stat = (folder / rel).stat()
        except FileNotFoundError:
            return f"{rel} is missing"
        if stat.st_size != record["size"]:
            return f"{rel} is {stat.st_size} bytes, expected {record['size']} (truncated or replaced)"
        if full or stat.st_mtime_ns != record["mtime_ns"]:
            if _sha256(folder / rel) != record["sha256"]:
                return f"{rel} was altered (its SHA-256 differs from the one recorded when it was fetched)"
            refreshed |= stat.st_mtime_ns != record["mtime_ns"]
            record["mtime_ns"] = stat.st_mtime_ns
    if refreshed:
        try:
            _write_json(folder / MARKER, info)
        except OSError:
            pass  # a read-only cache: the next load hashes again
    return None


def foreign(folder: Path) -> list[str]:
    """Files in ``folder`` that mechnorm's marker does not account for (never to be deleted).

    Example:
        >>> foreign(Path("/nonexistent"))
        []
    """
    if not folder.exists():
        return []
    if not folder.is_dir():
        return [folder.name]
    info = read_marker(folder)
    present = _files(folder)
    if info is None:
        return present + ([MARKER] if (folder / MARKER).exists() else [])
    listed = info.get("files")
    if listed is None:
        return [rel for rel in present if not _LEGACY_NAMES.fullmatch(rel)]
    return [rel for rel in present if rel not in listed]
