"""Tokenizers behind one small interface.

`ByteTokenizer` needs nothing and round-trips any text; `HFTokenizer` wraps a Hugging
Face `tokenizer.json` (the `tokenizers` package is imported only when one is used).
Each tokenizer has a `fingerprint` so shards remember which tokenizer made them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from .errors import DataError

BYTE_SPEC = "byte"

# Tokens an HF tokenizer may use to end a document, tried in this order.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")


class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer."""

    spec: str
    fingerprint: str
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the special tokens.

    Lossless for any text (lone surrogates, which UTF-8 cannot hold, become "?") and
    needs no vocabulary file, so the bundled corpus trains anywhere.
    """

    spec = BYTE_SPEC
    fingerprint = "byte-v1"
    special_tokens = ("<|eos|>", "<|pad|>")
    eos_id = 256
    pad_id = 257

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as a uint8 array (a view of the encoded bytes, no per-byte Python work)."""
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped, or spelled out with `skip_special=False`."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif 256 <= i < self.vocab_size:
                if not skip_special:
                    out += self.special_tokens[i - 256].encode()
            else:
                raise DataError(f"token id {i} is outside the byte tokenizer's vocabulary "
                                f"(0..{self.vocab_size - 1})")
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, with the end-of-document token found by name."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"tokenizer file {p} does not exist; set data.tokenizer (--tokenizer) "
                            f"to \"byte\" or to the path of a tokenizer.json")
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:
            raise DataError(f"{p}: reading a tokenizer.json needs the `tokenizers` package "
                            f"({e}); install it with `pip install 'dist-train[tokenizers]'` "
                            f"or use data.tokenizer = \"byte\"") from None
        raw = p.read_bytes()
        try:
            self._tok = _HF.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{p} is not a Hugging Face tokenizer.json ({msg}); point "
                            f"data.tokenizer (--tokenizer) at the tokenizer.json saved by "
                            f"`tokenizers` or `transformers`, or use \"byte\"") from None
        self.path = p.resolve()
        self.spec = str(self.path)
        self.fingerprint = "hf-sha256:" + hashlib.sha256(raw).hexdigest()
        self.eos_id = self._find_eos(eos_token)

    def _find_eos(self, eos_token: str | None) -> int:
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        for name in names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return int(tid)
        raise DataError(f"{self.path}: no end-of-document token found (looked for "
                        f"{', '.join(names)}); add one as a special token to the tokenizer "
                        f"or name it with eos_token=")

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r})"


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """`"byte"` gives the byte tokenizer; anything else is read as a path to a tokenizer.json."""
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise DataError(f"data.tokenizer = {spec!r} is empty; use \"byte\" or a path to a "
                        f"tokenizer.json")
    if str(spec) == BYTE_SPEC:
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)


def tokenizer_fingerprint(spec: str) -> str:
    """The fingerprint `load_tokenizer(spec)` would have, without importing `tokenizers`."""
    if str(spec) == BYTE_SPEC:
        return ByteTokenizer.fingerprint
    p = Path(spec).expanduser()
    if not p.is_file():
        raise DataError(f"tokenizer file {p} does not exist; set data.tokenizer (--tokenizer) "
                        f"to \"byte\" or to the path of a tokenizer.json")
    return "hf-sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
