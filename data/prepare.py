"""Turning inputs into a shard directory, once, safely.

Every shard directory is built in a hidden temporary sibling and renamed into place when
complete, so a reader sees either nothing or a finished directory. `ensure_prepared` is
what the trainer calls on every rank: the first caller to finish publishes the bundled
corpus into the cache, any other caller discards its copy and uses the published one.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .corpus import DEFAULT_MAX_BYTES, corpus_id, iter_bundled_documents
from .documents import expand_inputs, iter_documents
from .errors import DataError
from .megatron import SOURCE_PREFIX, MegatronWriter, parse_source
from .megatron import paths as megatron_paths
from .shards import FORMAT_VERSION, INDEX_NAME, ShardIndex, _fsync_dir, read_index, verify_shards
from .sources import expand_glob, file_source, files_key, is_megatron, open_tokens
from .tokenizer import BYTE_SPEC, Tokenizer, load_tokenizer, tokenizer_fingerprint
from .writer import DEFAULT_SHARD_TOKENS, ShardWriter

BUNDLED = "bundled"


@dataclass(frozen=True)
class PrepareResult:
    """What a prepare run produced."""

    out_dir: Path
    documents: int
    tokens: int
    shards: int
    seconds: float
    skipped_files: tuple[str, ...] = ()  # files found by walking a folder that held no text
    verified: bool = False
    format: str = "arrow"

    def summary(self) -> str:
        """What a person reads after `dist-train prepare`."""
        if self.format.startswith("megatron"):
            where = f"  into {self.out_dir}.bin + {self.out_dir}.idx, {self.format}"
            checked = "  (re-read, every token id checked)"
        else:
            where, checked = f"  into {self.out_dir}", "  (every shard re-read and its CRC32 checked)"
        lines = [f"prepared {self.documents:,} documents, {self.tokens:,} tokens in {self.shards} shard(s) "
                 f"in {self.seconds:.1f} s", where + (checked if self.verified else "")]
        if self.skipped_files:
            names = ", ".join(self.skipped_files[:5]) + (" ..." if len(self.skipped_files) > 5 else "")
            lines.append(f"  skipped {len(self.skipped_files)} file(s) without text: {names}")
        return "\n".join(lines)


def default_cache_dir() -> Path:
    """Where the bundled corpus is cached: $DIST_TRAIN_CACHE, else ~/.cache/dist-train."""
    env = os.environ.get("DIST_TRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dist-train"


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer_spec: str = BYTE_SPEC, *,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text",
            shard_format: str = "arrow", overwrite: bool = False, append_eod: bool = False) -> PrepareResult:
    """Tokenize text, JSONL and Parquet files (directories are walked) into `out_dir`.

    Nothing is published unless it holds text: zero documents or tokens in all, or a file
    named on the command line that holds none (empty, only empty lines, every record's
    text empty), is an error naming it, and `out_dir` keeps what it held. A file found by
    walking a folder that holds no text is skipped and listed in the result.

    `shard_format = "megatron"`: `out_dir` is a path prefix and the result PREFIX.bin +
    PREFIX.idx (data/megatron.py), each document followed by the tokenizer's eos only with
    `append_eod` (Megatron's preprocess_data.py --append-eod); Arrow and Parquet shards
    always end each document with it."""
    if append_eod and shard_format != "megatron":
        raise DataError("--append-eod is for --format megatron (arrow and parquet shards always end each "
                        "document with the tokenizer's eos)")
    files = expand_inputs(inputs)
    out_dir = Path(out_dir)
    if shard_format == "megatron":
        _check_megatron_out(out_dir, overwrite)
    else:
        _check_out_dir(out_dir, overwrite)
    tokenizer = load_tokenizer(tokenizer_spec)
    skipped: list[str] = []
    docs = _documents(inputs, files, text_field, out_dir, skipped)
    source = ", ".join(str(i) for i in inputs)
    if shard_format == "megatron":
        result = _build_megatron(docs, out_dir, tokenizer, append_eod, source)
    else:
        result = _build(docs, out_dir, tokenizer, shard_tokens, shard_format, source, overwrite)
    return dataclasses.replace(result, skipped_files=tuple(skipped))


def _documents(inputs, files: list[Path], text_field: str, out: Path, skipped: list[str]):
    """The documents of `files` in order; a file named in `inputs` without text is an
    error, one found by walking a folder is listed in `skipped`."""
    named = {Path(i).expanduser() for i in inputs}
    for f in files:
        n = 0
        for doc in iter_documents(f, text_field):
            n += 1
            yield doc
        if not n and f in named:
            raise DataError(f"input {f} holds no text (empty, or every line or record's "
                            f"{text_field!r} is empty); nothing was written to {out}; "
                            "fix the file or leave it out of the inputs")
        if not n:
            skipped.append(str(f))


def prepare_bundled(out_dir: str | Path, tokenizer_spec: str = BYTE_SPEC, *,
                    max_bytes: int = DEFAULT_MAX_BYTES, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                    overwrite: bool = False) -> PrepareResult:
    """Tokenize the bundled corpus (the stdlib's sources, `max_bytes` of them) into `out_dir`."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    tokenizer = load_tokenizer(tokenizer_spec)
    return _build(iter_bundled_documents(max_bytes), out_dir, tokenizer, shard_tokens, "arrow",
                  f"bundled {corpus_id(max_bytes)}", overwrite)


def prepare_command(inputs: Sequence[str], out_dir: str | Path, tokenizer: str = BYTE_SPEC, *,
                    text_field: str = "text", shard_tokens: int = DEFAULT_SHARD_TOKENS,
                    max_bytes: int = DEFAULT_MAX_BYTES, overwrite: bool = False,
                    verify: bool = False, shard_format: str = "arrow", append_eod: bool = False) -> PrepareResult:
    """The core of `dist-train prepare INPUT... --out DIR [--tokenizer byte|PATH]`.

    The single input `bundled` (when no such file exists) prepares the bundled corpus.
    With `verify`, the finished directory is re-read and fully checked.
    """
    bundled = list(inputs) == [BUNDLED] and not Path(BUNDLED).exists()
    if bundled and shard_format == "megatron":
        _check_megatron_out(Path(out_dir), overwrite)
        result = _build_megatron(iter_bundled_documents(max_bytes), Path(out_dir), load_tokenizer(tokenizer),
                                 append_eod, f"bundled {corpus_id(max_bytes)}")
    elif bundled:
        result = prepare_bundled(out_dir, tokenizer, max_bytes=max_bytes,
                                 shard_tokens=shard_tokens, overwrite=overwrite)
    else:
        result = prepare(inputs, out_dir, tokenizer, shard_tokens=shard_tokens, text_field=text_field,
                         overwrite=overwrite, shard_format=shard_format, append_eod=append_eod)
    if verify:
        if shard_format == "megatron":
            open_tokens(SOURCE_PREFIX + str(result.out_dir), tokenizer).verify()
        else:
            verify_shards(result.out_dir)
        result = dataclasses.replace(result, verified=True)
    return result


def ensure_prepared(source: str | Path, cache_dir: str | Path | None = None,
                    tokenizer_spec: str | None = BYTE_SPEC, *,
                    max_bytes: int = DEFAULT_MAX_BYTES, text_field: str = "text") -> Path | str:
    """The shard directory for `data.source` (data/sources.py lists the kinds), preparing
    the bundled corpus or `parquet:`/`jsonl:` files on first use; for `megatron:PREFIX`
    the string `megatron:ABS_PREFIX`, once the pair is checked.

    `"bundled"` and file globs are prepared into `cache_dir` once (safe to call from many
    processes at once); a directory with index.json is used as is, after checking it was
    made with `tokenizer_spec` (pass None to skip that check).
    """
    if str(source) == BUNDLED:
        return _ensure_bundled(Path(cache_dir) if cache_dir else default_cache_dir(),
                               tokenizer_spec or BYTE_SPEC, max_bytes)
    if is_megatron(source):
        resolved = SOURCE_PREFIX + str(parse_source(str(source)))
        open_tokens(resolved, tokenizer_spec or BYTE_SPEC)  # the pair's sizes and header, checked now
        return resolved
    if file_source(source):
        return _ensure_files(str(source), Path(cache_dir) if cache_dir else default_cache_dir(),
                             tokenizer_spec or BYTE_SPEC, text_field)
    path = Path(source).expanduser()
    if path.is_dir() and (path / INDEX_NAME).is_file():
        index = read_index(path)
        if tokenizer_spec is not None:
            _check_tokenizer(path, index, tokenizer_spec)
        return path
    if path.is_dir():
        raise DataError(f"data.source = {str(source)!r} is a directory without {INDEX_NAME}; "
                        f"prepare it with `dist-train prepare INPUT... --out {path}` or set "
                        f"data.source = \"bundled\"")
    raise DataError(f"data.source = {str(source)!r} is neither \"bundled\", a directory prepared by "
                    f"`dist-train prepare`, megatron:PREFIX, parquet:GLOB nor jsonl:GLOB; set it to one of those")


# --- internals -------------------------------------------------------------------------

def _check_tokenizer(path: Path, index: ShardIndex, spec: str) -> None:
    fp = tokenizer_fingerprint(spec)
    if fp != index.tokenizer_fingerprint:
        raise DataError(f"{path} was prepared with tokenizer {index.tokenizer_spec!r} but "
                        f"data.tokenizer = {spec!r} is a different tokenizer; set data.tokenizer "
                        f"to the one the shards were made with, or re-run `dist-train prepare "
                        f"--tokenizer {spec}`")


def _ensure_bundled(cache_dir: Path, spec: str, max_bytes: int) -> Path:
    fp = tokenizer_fingerprint(spec)
    tag = fp if fp.startswith("byte") else "hf-" + fp.split(":", 1)[1][:12]
    final = cache_dir / f"bundled-{corpus_id(max_bytes)}-{tag}-fmt{FORMAT_VERSION}"
    if not (final / INDEX_NAME).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(spec)
        _build(iter_bundled_documents(max_bytes), final, tokenizer, DEFAULT_SHARD_TOKENS,
               "arrow", f"bundled {corpus_id(max_bytes)}", replace=False, lose_ok=True)
    read_index(final)
    return final


def _ensure_files(source: str, cache_dir: Path, spec: str, text_field: str) -> Path:
    """`parquet:GLOB` / `jsonl:GLOB`: the files' documents tokenised once into the cache."""
    kind, pattern = file_source(source)
    files = expand_glob(source, kind, pattern)
    final = cache_dir / f"{kind}-{files_key(kind, files, text_field, tokenizer_fingerprint(spec))}-fmt{FORMAT_VERSION}"
    if not (final / INDEX_NAME).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(spec)

        def docs():
            for f in files:
                yield from iter_documents(f, text_field, kind=kind)

        _build(docs(), final, tokenizer, DEFAULT_SHARD_TOKENS, "arrow",
               f"{source} ({len(files)} files, field {text_field!r})", replace=False, lose_ok=True)
    read_index(final)
    return final


def _check_megatron_out(prefix: Path, overwrite: bool) -> None:
    bin_path, idx_path = megatron_paths(prefix)
    if (bin_path.exists() or idx_path.exists()) and not overwrite:
        raise DataError(f"--out {prefix}: {bin_path.name} or {idx_path.name} already exists; pick another --out "
                        "prefix or pass --overwrite to replace the pair")


def _build_megatron(docs: Iterable[str], prefix: Path, tokenizer: Tokenizer, append_eod: bool,
                    source: str) -> PrepareResult:
    """PREFIX.bin + PREFIX.idx, renamed into place only when they hold text."""
    import numpy as np

    start = time.perf_counter()
    writer = MegatronWriter(prefix, tokenizer.vocab_size)
    eod = np.array([tokenizer.eos_id])
    try:
        for doc in docs:
            ids = tokenizer.encode_array(doc)
            writer.add_document(np.concatenate([ids, eod]) if append_eod and len(ids) else ids)
        if not writer.documents or not writer.tokens:
            raise DataError(f"{source or 'the inputs'} hold no text: 0 documents to write, so nothing "
                            f"was written to {prefix}; pass files with text in them")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return PrepareResult(prefix, writer.documents, writer.tokens, 1, time.perf_counter() - start,
                         format=f"megatron ({writer.dtype})")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"--out {out_dir} exists and is not a directory; pick another --out")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise DataError(f"--out {out_dir} already exists and is not empty; pick another --out "
                        f"or pass --overwrite (overwrite=True) to replace it")
    if not (out_dir / INDEX_NAME).is_file():
        raise DataError(f"--out {out_dir} is not empty and holds no {INDEX_NAME}, so it is not "
                        f"a shard directory; refusing to replace it, pick another --out")


def _build(docs: Iterable[str], out_dir: Path, tokenizer: Tokenizer, shard_tokens: int,
           shard_format: str, source: str, replace: bool, lose_ok: bool = False) -> PrepareResult:
    """Write shards into a temporary sibling of `out_dir`, then publish it by rename."""
    start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        writer = ShardWriter(tmp, tokenizer, shard_tokens, shard_format, source)
        for doc in docs:
            writer.add_document(doc)
        if not writer.documents or not writer.tokens:
            raise DataError(f"{source or 'the inputs'} hold no text: 0 documents to write, so nothing "
                            f"was written to {out_dir}; pass files with text in them")
        index = writer.close()
        published = _publish(tmp, out_dir, replace)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not published and not lose_ok:
        raise DataError(f"--out {out_dir} was created by another process while this one was "
                        f"preparing; pick another --out or pass --overwrite")
    if not published:
        index = read_index(out_dir)
    return PrepareResult(out_dir, index.documents, index.total_tokens, len(index.shards),
                         time.perf_counter() - start)


def _publish(tmp: Path, final: Path, replace: bool) -> bool:
    """Rename the finished `tmp` to `final`; False if another process published first."""
    if replace and final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, final)  # atomic; fails if `final` is a non-empty directory
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and (final / INDEX_NAME).is_file():
                return False
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise DataError(f"{final} exists but holds no {INDEX_NAME}; delete it and "
                                f"run again") from None
            raise
    _fsync_dir(final.parent)
    return True
