"""A small corpus that ships with every Python: the standard library's own sources.

It lets `data.source = "bundled"` train (and tests run) with no download. The files are
walked in sorted order and capped by a byte budget, so the corpus is the same on every
run on one machine and preparing it takes seconds.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

DEFAULT_MAX_BYTES = 8_000_000

# Directories that are not stdlib sources proper (installed packages, test suites, the
# IDLE/2to3 apps, bundled wheels) or that are large and repetitive.
SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
    "lib2to3", "ensurepip", "turtledemo", "pydoc_data", "__pycache__", "config-3",
    "encodings",
})


def stdlib_dir() -> Path:
    """Where the running interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_id(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """A name for this corpus: the stdlib differs between Python versions."""
    v = sys.version_info
    return f"stdlib-py{v.major}.{v.minor}.{v.micro}-{max_bytes}"


def iter_bundled_files(max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[tuple[Path, str]]:
    """Yield `(path, text)` for stdlib `.py` files in sorted order, at most `max_bytes` in all.

    Files that are not valid UTF-8, and files that no longer fit in what is left of the
    budget, are skipped.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    root = stdlib_dir()
    used = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-"))
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath, name)
            try:
                raw = path.read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip():
                continue
            if used + len(raw) > max_bytes:
                continue
            used += len(raw)
            yield path, text


def iter_bundled_documents(max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[str]:
    """Yield the bundled corpus one document (one source file) at a time."""
    for _, text in iter_bundled_files(max_bytes):
        yield text
