"""What `data.source` may name, and the token stream each gives.

- `bundled`: the stdlib corpus, prepared once into the cache;
- a folder made by `dist-train prepare` (index.json + Arrow/Parquet token shards);
- `megatron:PREFIX`: Megatron-LM's PREFIX.bin + PREFIX.idx, read in place
  (data/megatron.py; its vocabulary is data.tokenizer's);
- `parquet:GLOB` / `jsonl:GLOB`: text files as a user's local copy of a Hub dataset holds
  them (`data/train-00000-of-00004.parquet`...), the text in column / field
  `data.text_field`. They are tokenised once, on first use, into token shards in the
  cache (the same code as `dist-train prepare`), keyed by the files (path, size,
  modification time), the field and the tokenizer, so a changed file is prepared again
  and an unchanged one never. Random access to fixed-length samples needs the tokens'
  positions, which is why "on the fly" means once, at the first run, not per step.

`ensure_prepared` (data/prepare.py) resolves a source to a folder or to `megatron:ABS`;
`open_tokens` opens what it resolved to.
"""
from __future__ import annotations

import glob
import hashlib
from pathlib import Path

from .errors import DataError

FILE_KINDS = {"parquet": "parquet", "jsonl": "jsonl"}


def file_source(source: str) -> tuple[str, str] | None:
    """("parquet", GLOB) for "parquet:GLOB" (or jsonl), else None."""
    kind, sep, pattern = str(source).partition(":")
    if sep and kind in FILE_KINDS:
        return kind, pattern
    return None


def expand_glob(source: str, kind: str, pattern: str) -> list[Path]:
    if not pattern:
        raise DataError(f"data.source = {source!r}: expected {kind}:GLOB, e.g. {kind}:~/data/train-*.{kind}")
    files = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"data.source = {source!r}: no file matches {pattern!r}; check the path (globs such as "
                        f"data/*.{kind} or data/**/*.{kind} are expanded)")
    return files


def files_key(kind: str, files: list[Path], text_field: str, fingerprint: str) -> str:
    """A cache name that changes when any file, the field or the tokenizer does."""
    h = hashlib.sha256(f"{kind}\0{text_field}\0{fingerprint}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def is_megatron(resolved) -> bool:
    from .megatron import SOURCE_PREFIX

    return str(resolved).startswith(SOURCE_PREFIX)


def open_tokens(resolved, tokenizer_spec: str | None = None):
    """The token stream of a resolved source: TokenShards for a folder, MegatronTokens for
    `megatron:PREFIX` (whose vocabulary and eos come from `tokenizer_spec`)."""
    from .megatron import MegatronTokens, parse_source
    from .shards import TokenShards

    if is_megatron(resolved):
        if tokenizer_spec is None:
            raise DataError(f"{resolved}: a Megatron dataset does not record its vocabulary; set data.tokenizer")
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_spec)
        return MegatronTokens(parse_source(str(resolved)), tok.vocab_size, tok.eos_id)
    return TokenShards(resolved)


def source_vocab_size(resolved, tokenizer_spec: str | None = None) -> int:
    """The vocabulary of a resolved source, without reading its tokens."""
    from .shards import read_index

    if is_megatron(resolved):
        from .tokenizer import load_tokenizer

        return load_tokenizer(tokenizer_spec or "byte").vocab_size
    return read_index(resolved).vocab_size
