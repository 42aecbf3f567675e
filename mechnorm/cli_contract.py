"""The ``mechnorm`` command's contract: one-line errors (exit code 2) and outputs checked
before any computation (writable; an existing file only with ``--force``)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

__all__ = ["CommandError", "check_out", "one_line", "positive"]


class CommandError(Exception):
    """A command cannot run as asked (e.g. its output exists); printed as one line, exit code 2."""


def positive(text: str) -> int:
    """An ``argparse`` type: a whole number of at least 1.

    Example:
        >>> positive("3")
        3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def one_line(error: Exception) -> str:
    """The error's message on one line; unexpected types are named, with how to see the traceback.

    Example:
        >>> one_line(ValueError("n must be\\n positive"))
        'n must be positive'
    """
    from .fetch import FetchError
    from .models import ModelLoadError

    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    message = " ".join(str(message).split()) or type(error).__name__
    expected = (CommandError, OSError, ValueError, KeyError, TypeError, ModelLoadError, FetchError)
    if not isinstance(error, expected):
        message = f"{type(error).__name__}: {message} (MECHNORM_TRACEBACK=1 shows the traceback)"
    return message


def check_out(*paths: str | Path, force: bool = False) -> None:
    """Before any computation: each output ``path`` must be writable, and new unless ``force``.

    Raises:
        CommandError: naming the path and the fix (``--force``, another ``--out``).

    Example:
        >>> check_out("report.html", force=True)                        # doctest: +SKIP
    """
    for path in map(Path, paths):
        if path.is_dir():
            raise CommandError(f"--out {path} is a folder; give a file path.")
        if path.exists() and not force:
            raise CommandError(f"{path} exists; pass --force to overwrite it, or choose another --out.")
        folder = next(p for p in [path.parent, *path.parent.parents, Path(".")] if p.exists())
        if not folder.is_dir():
            raise CommandError(f"cannot write {path}: {folder} is a file, not a folder.")
        try:  # a real write: os.access says yes to root on read-only file systems
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".mechnorm-write-check-"):
                pass
            if path.exists():
                with open(path, "a"):
                    pass
        except OSError as error:
            raise CommandError(f"cannot write {path}: {error.strerror or error}; choose another --out.") from None


def check_out_folder(path: str | Path, force: bool = False) -> None:
    """Before any computation: an output folder must be new (or empty) unless ``force``, and
    its place writable.

    Raises:
        CommandError: naming the folder and the fix (``--force``, another ``--out``).

    Example:
        >>> check_out_folder("adapters/lex_a", force=True)              # doctest: +SKIP
    """
    path = Path(path)
    if path.is_file():
        raise CommandError(f"--out {path} is a file; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise CommandError(f"{path} exists and is not empty; pass --force to overwrite it, or choose another --out.")
    check_out(path / ".mechnorm-folder-check", force=True)
