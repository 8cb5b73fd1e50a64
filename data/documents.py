"""Reading documents out of input files: plain text, JSONL and Parquet.

A text file is one document; a JSONL line or a Parquet row is one document, its text
taken from a field (`text` unless told otherwise). Bad input names the file and the line
or row, so it can be fixed without a debugger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
SKIP_NAMES = ("__pycache__",)


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named by `inputs`; directories are walked recursively in sorted order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(part.startswith(".") or part in SKIP_NAMES for part in rel):
                    files.append(f)
        else:
            raise DataError(f"input {p} does not exist; pass existing files or directories "
                            f"to `dist-train prepare`")
    if not files:
        raise DataError(f"no input files found in {[str(i) for i in inputs]}; pass text, "
                        f".jsonl or .parquet files (or directories holding them)")
    return files


def iter_documents(path: str | Path, text_field: str = "text", kind: str | None = None) -> Iterator[str]:
    """The documents of one file, read as `kind` ("jsonl", "parquet", "text"), or chosen by
    its suffix (a `jsonl:GLOB` source reads `*.json` files of JSON lines as JSONL)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if kind == "jsonl" or (kind is None and suffix in JSONL_SUFFIXES):
        return _iter_jsonl(path, text_field)
    if kind == "parquet" or (kind is None and suffix in PARQUET_SUFFIXES):
        return _iter_parquet(path, text_field)
    return _iter_text(path)


def _iter_text(path: Path) -> Iterator[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it "
                        f"to UTF-8 or leave it out of the inputs") from None
    if "\x00" in text:
        raise DataError(f"{path} looks binary (it contains NUL bytes); leave it out of the "
                        f"inputs or convert it to text")
    if text:
        yield text


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8; fix or remove the line") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"fix or remove the line") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{where}: no {field!r} field (found {keys}); add it, or name "
                                f"the field that holds the text (text_field / --text-field)")
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a "
                                f"string; fix the line")
            if text:
                yield text


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(str(path), memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({e}); fix or remove it") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path} has no column {field!r} (columns: {schema.names}); add it, or "
                        f"name the column that holds the text (text_field / --text-field)")
    ftype = schema.field(field).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)
            or str(ftype) == "string_view"):
        raise DataError(f"{path}: column {field!r} has type {ftype}, not string; name the "
                        f"column that holds the text (text_field / --text-field)")
    row = 0
    for batch in pf.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise DataError(f"{path} row {row}: column {field!r} is null; fill or drop the row")
            row += 1
            if text:
                yield text
