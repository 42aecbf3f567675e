"""The files of a :func:`mechnorm.run_dataset` run: the manifest and the Parquet shards.

``out/manifest.json`` says what the run computes (its identity: model, methods, options, …);
``out/shards/shard-000000.parquet`` … hold the rows, each with the identity, its input rows'
fingerprint and the mechnorm version in its Parquet key-value metadata (key ``mechnorm``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import pandas as pd

from .dataset_io import Row, fingerprint

MANIFEST = "manifest.json"
SHARDS = "shards"
META_KEY = b"mechnorm"


def describe_model(model) -> str:
    """A model's identity for the manifest: class, name, shape and a checksum of two weights.

    Example:
        >>> describe_model(model)                                 # doctest: +SKIP
        'HookedTransformer:gpt2-agree-recall:L2:d64:v40:3f2a9c81d0'
    """
    cfg = model.cfg
    params = [p for p in model.parameters()]
    sums = [f"{float(p.detach().double().sum()):.6g}" for p in (params[0], params[-1])] if params else []
    digest = hashlib.sha256(",".join(sums).encode()).hexdigest()[:10]
    return f"{type(model).__name__}:{getattr(cfg, 'model_name', '?')}:L{cfg.n_layers}:d{cfg.d_model}:v{cfg.d_vocab}:{digest}"


def describe_head(head) -> str | None:
    """A head's identity for the manifest (class, outputs, weight checksum), None for the default.

    Example:
        >>> describe_head(None) is None
        True
    """
    if head is None:
        return None
    weight = getattr(head, "weight_out", None)
    checksum = "" if weight is None else f":{float(weight.detach().double().sum()):.6g}"
    return f"{type(head).__name__}:{head.n_outputs}{checksum}"


def shard_path(out: Path, shard: int) -> Path:
    """Where shard ``shard`` of the run in ``out`` lives.

    Example:
        >>> shard_path(Path("run"), 3).as_posix()
        'run/shards/shard-000003.parquet'
    """
    return out / SHARDS / f"shard-{shard:06d}.parquet"


def write_shard(out: Path, shard: int, frame: pd.DataFrame, identity: dict, rows: list[Row], process: int = 0) -> None:
    """Write one shard atomically (a temporary file, then ``os.replace``), with the run's identity,
    its input rows' fingerprint and the writing process in the Parquet metadata.

    Example:
        >>> write_shard(Path("run"), 0, frame, identity, rows)                 # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import __version__

    path = shard_path(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {"shard": shard, "rows": [rows[0].where, rows[-1].where], "fingerprint": fingerprint(rows),
            "mechnorm_version": __version__, "process_index": process, **identity}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def finished_shards(out: Path, rows: list[Row], shard_size: int, n_shards: int) -> set[int]:
    """Shards already written; one whose input rows changed since is an error, not a silent mix.

    Example:
        >>> finished_shards(Path("run"), rows, 64, 10)                         # doctest: +SKIP
        {0, 1, 2}
    """
    import pyarrow.parquet as pq

    done = set()
    for shard in range(n_shards):
        path = shard_path(out, shard)
        if not path.exists():
            continue
        part = rows[shard * shard_size : (shard + 1) * shard_size]
        meta = json.loads(pq.read_schema(path).metadata[META_KEY])
        if meta["fingerprint"] != fingerprint(part):
            raise ValueError(f"{path} was computed from other rows than the dataset's {part[0].where} … "
                             f"{part[-1].where} now hold: the data changed. Use a new output folder, or delete "
                             "that shard to recompute it.")
        done.add(shard)
    return done


def read_manifest(out: Path) -> dict | None:
    """The run's ``manifest.json`` as a dict, or None when ``out`` holds no run.

    Example:
        >>> read_manifest(Path("/nonexistent")) is None
        True
    """
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def check_or_write_manifest(out: Path, identity: dict, name, data, n_rows: int, main: bool) -> None:
    """Refuse ``out`` when it holds a run with another identity; else (main process) write the manifest.

    Example:
        >>> check_or_write_manifest(Path("run"), identity, "zoo:x", "d.jsonl", 10, True)   # doctest: +SKIP
    """
    from . import __version__

    previous = read_manifest(out)
    if previous is not None:
        differ = {k: (previous["identity"].get(k), v) for k, v in identity.items() if previous["identity"].get(k) != v}
        if differ:
            detail = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
            raise ValueError(f"{out} holds a run with other settings ({detail}). Resume with the same settings, "
                             "or choose a new output folder.")
        if previous.get("mechnorm_version") != __version__:
            warnings.warn(f"{out} was started with mechnorm {previous.get('mechnorm_version')}, this is {__version__}.",
                          stacklevel=3)
        if previous["n_rows"] == n_rows:
            return
    if not main:
        return
    source = str(data) if isinstance(data, (str, os.PathLike)) else f"<{type(data).__name__}>"
    manifest = {"identity": identity, "model_name": name, "data": source, "n_rows": n_rows,
                "mechnorm_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
