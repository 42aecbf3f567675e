"""Reading a dataset for :func:`mechnorm.run_dataset`: JSONL, CSV, Parquet, a ``datasets`` folder.

Every source becomes a list of :class:`Row`: the text (or, for :mod:`mechnorm.tasks` examples,
the token ids), an optional target and foil (token ids or single-token strings) and optional
cue positions, each with ``where`` — the file and 1-based line (``data.jsonl:7``, as an editor
shows it) or row (``data.parquet row 7``) — so that a malformed row is reported where it is.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

OPTIONAL = ("target", "foil", "cue_positions")


class DatasetRowError(ValueError):
    """A malformed input row; the message starts with the file and line (or row) it is on."""


@dataclass(frozen=True)
class Row:
    """One input: ``text`` (or ``tokens``), what to explain, and where it came from.

    Attributes:
        where: ``"file:line"`` or ``"file row N"`` (1-based), for error messages.
        text: the text to tokenise, or None when ``tokens`` are given.
        tokens: token ids (task examples), or None.
        target, foil: a token id (int) or a single-token string, or None.
        cue_positions: indices into the tokenised sequence (BOS included), or None.
        position: where the prediction is read (task examples), or None for the model's rule.
    """

    where: str
    text: str | None = None
    tokens: tuple[int, ...] | None = None
    target: int | str | None = None
    foil: int | str | None = None
    cue_positions: tuple[int, ...] | None = None
    position: int | None = None


def read_rows(source, text_column: str = "text", split: str | None = None) -> list[Row]:
    """Read and check every row of ``source``.

    Args:
        source: a path to a ``.jsonl``/``.json`` (one object per line), ``.csv`` or ``.parquet``
            file or a folder written by ``datasets.Dataset.save_to_disk``; a pandas DataFrame;
            a list of strings, of dicts, or of :mod:`mechnorm.tasks` examples.
        text_column: the column holding the texts (required). Optional columns: ``target``,
            ``foil`` (token ids or single-token strings; in CSV, cells are token strings) and
            ``cue_positions`` (a list of ints; in CSV, a JSON list such as ``[2, 5]``).
        split: the split to read from a saved ``DatasetDict`` folder.

    Raises:
        DatasetRowError: naming the file and line of the first malformed row.

    Example:
        >>> rows = read_rows([{"text": "the keys to the", "target": " cabinet"}])
        >>> rows[0].where, rows[0].target
        ('row 1', ' cabinet')
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"No dataset at {path}; give a .jsonl, .csv or .parquet file or a datasets folder.")
        records = _read_path(path, split)
    elif hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas DataFrame
        records = [(f"row {i + 1}", r) for i, r in enumerate(source.to_dict("records"))]
    elif isinstance(source, Sequence) and source and hasattr(source[0], "cue_positions") and hasattr(source[0], "tokens"):
        return [_example_row(i, e) for i, e in enumerate(source)]
    elif isinstance(source, Sequence) and not isinstance(source, str):
        records = [(f"row {i + 1}", r) for i, r in enumerate(source)]
    else:
        raise TypeError(f"Cannot read a dataset from a {type(source).__name__}: give a file path, a DataFrame, "
                        "or a list of texts, dicts or mechnorm.tasks examples.")
    if not records:
        raise ValueError(f"The dataset {source if isinstance(source, (str, os.PathLike)) else ''} has no rows.")
    rows = [_check(where, record, text_column) for where, record in records]
    for name in ("target", "foil", "cue_positions"):  # all rows or none, so one Target serves a batch
        given = [getattr(r, name) is not None for r in rows]
        if any(given) and not all(given):
            first = rows[given.index(False)]
            raise DatasetRowError(f"{first.where}: no {name!r}, though other rows have one; give every row a {name} "
                                  "or none.")
    if rows[0].foil is not None and rows[0].target is None:
        raise DatasetRowError(f"{rows[0].where}: a 'foil' needs a 'target' to contrast it with.")
    return rows


def fingerprint(rows: Sequence[Row]) -> str:
    """A hash of the rows' content (not where they came from): a shard's input identity.

    Example:
        >>> fingerprint([Row("a:1", "x")]) == fingerprint([Row("b:9", "x")])
        True
    """
    payload = json.dumps([{k: v for k, v in asdict(r).items() if k != "where"} for r in rows], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_path(path: Path, split: str | None) -> list[tuple[str, dict]]:
    if path.is_dir():
        return _read_datasets_folder(path, split)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return [(f"{path} row {i + 1}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise ValueError(f"Unknown dataset format {path.suffix!r} ({path}); use .jsonl, .csv, .parquet or a datasets folder.")


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetRowError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}).") from None
            records.append((f"{path}:{number}", record))
    return records


def _read_csv(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    records = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if reader.fieldnames is None:
            return records
        start = reader.line_num + 1
        for record in reader:  # a quoted field may span lines: report the line the record starts on
            where = f"{path}:{start}"
            if None in record or None in record.values():
                raise DatasetRowError(f"{where}: {len(record) - (None in record)} fields expected by the header "
                                      f"{reader.fieldnames}, found a different number.")
            cues = record.get("cue_positions")
            if cues is not None:
                try:
                    record["cue_positions"] = json.loads(cues) if cues.strip() else None
                except json.JSONDecodeError:
                    raise DatasetRowError(f"{where}: cue_positions {cues!r} is not a JSON list such as [2, 5].") from None
            for name in ("target", "foil"):
                if record.get(name) == "":
                    record[name] = None
            records.append((where, record))
            start = reader.line_num + 1
    return records


def _read_datasets_folder(path: Path, split: str | None) -> list[tuple[str, dict]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise ValueError(f"{path} holds splits {list(loaded)}; choose one with split=... (--split).")
        loaded = loaded[split]
    return [(f"{path} row {i + 1}", r) for i, r in enumerate(loaded.to_list())]


def _check(where: str, record, text_column: str) -> Row:
    if isinstance(record, str):  # a bare string (a JSONL line "...", a list of texts) is the text
        record = {text_column: record}
    if not isinstance(record, dict):
        raise DatasetRowError(f"{where}: expected an object with a {text_column!r} field, got {type(record).__name__}.")
    text = record.get(text_column)
    if not isinstance(text, str) or not text.strip():
        found = "missing" if text_column not in record else f"{text!r}"
        raise DatasetRowError(f"{where}: the text column {text_column!r} is {found}; every row needs a non-empty "
                              f"string there (columns: {sorted(record)}; set text_column= / --text-column).")
    values = {name: _missing_to_none(record.get(name)) for name in OPTIONAL}
    for name in ("target", "foil"):
        value = values[name]
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) or (
                isinstance(value, float) and value.is_integer()):
            value = values[name] = int(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str)) or value == ""
                                  or (isinstance(value, int) and value < 0)):
            raise DatasetRowError(f"{where}: {name} {value!r} must be a token id (int >= 0) or a token string.")
    cues = values["cue_positions"]
    if cues is not None:
        cues = list(cues) if hasattr(cues, "__iter__") and not isinstance(cues, (str, dict)) else cues
        if not isinstance(cues, list) or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0
                                                 for c in cues):
            raise DatasetRowError(f"{where}: cue_positions {record.get('cue_positions')!r} must be a list of "
                                  "non-negative token positions, e.g. [2, 5].")
        cues = tuple(int(c) for c in cues)
    return Row(where, text=text, target=values["target"], foil=values["foil"], cue_positions=cues)


def _missing_to_none(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _example_row(index: int, example) -> Row:
    return Row(f"example {index + 1}", tokens=tuple(example.tokens), target=int(example.answer),
               foil=None if example.foil is None else int(example.foil), cue_positions=tuple(example.cue_positions),
               position=int(example.prediction_position))
