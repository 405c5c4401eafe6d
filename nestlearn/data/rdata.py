"""A minimal reader of R's lazy-load databases (`.rdx` / `.rdb`), enough for packages that store text as
character vectors (e.g. Debian's r-cran-janeaustenr). No R and no R bindings needed.

What this is: `read_lazyload(prefix) -> {name: value}` where values are Python lists / dicts built from R's XDR
serialisation (character, integer, double and logical vectors, lists, pairlists, symbols, attributes).
What it is not: a general R reader (environments, closures, bytecode and ALTREP objects raise ValueError).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC = 254, 1, 2, 9, 10, 13, 14, 16, 19
REF, GLOBALENV, EMPTYENV, BASENS, MISSINGARG, BASEENV = 255, 253, 242, 247, 251, 241
NA_INT = -(2**31)


def read_lazyload(prefix: str | Path) -> dict[str, Any]:
    """`{object name: value}` of the lazy-load database `prefix.rdx` / `prefix.rdb`."""
    prefix = Path(prefix)
    index = _Reader(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())).read()
    blob = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        out[name] = _Reader(_decompress(record)).read()
    return out


def _decompress(record: bytes) -> bytes:
    """A lazy-load record: 4-byte length, then zlib data, or a type byte (Z: xz, 2: bzip2, 0: none) and data."""
    kind = record[4:5]
    if kind == b"Z":
        return lzma.decompress(record[5:])
    if kind == b"2":
        return bz2.decompress(record[5:])
    if kind == b"0":
        return record[5:]
    return zlib.decompress(record[4:])


class _Reader:
    """XDR ("X\\n") serialisation, versions 2 and 3."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialisation (expected 'X\\n')")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()  # writer and minimal reader versions
        if version == 3:
            n = self._int()  # native encoding name (read before adding: `pos += _int()` would use the old pos)
            self.pos += n

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def read(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (NIL, GLOBALENV, EMPTYENV, BASENS, MISSINGARG, BASEENV):
            return None
        if kind == REF:
            index = flags >> 8
            return self.refs[(index or self._int()) - 1]
        if kind == SYM:
            name = self.read()
            self.refs.append(name)
            return name
        if kind == LIST:
            return self._pairlist(has_attr, has_tag)
        if kind == CHAR:
            n = self._int()
            if n == -1:
                return None
            s = self.data[self.pos : self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return s
        if kind in (LGL, INT, REAL, STR, VEC):
            value = self._vector(kind)
            attrs = self.read() if has_attr else None
            if isinstance(attrs, dict) and "names" in attrs and isinstance(value, list):
                return dict(zip(attrs["names"], value, strict=False))
            return value
        raise ValueError(f"unsupported R object type {kind} in the lazy-load database")

    def _vector(self, kind: int) -> list[Any]:
        n = self._int()
        if kind in (STR, VEC):
            return [self.read() for _ in range(n)]
        if kind == REAL:
            values = struct.unpack_from(f">{n}d", self.data, self.pos)
            self.pos += 8 * n
            return list(values)
        values = struct.unpack_from(f">{n}i", self.data, self.pos)
        self.pos += 4 * n
        return [None if v == NA_INT else v for v in values]

    def _pairlist(self, has_attr: int, has_tag: int) -> dict[str, Any]:
        if has_attr:
            self.read()
        tag = self.read() if has_tag else None
        out = {tag: self.read()}
        rest = self.read()
        if isinstance(rest, dict):
            out.update(rest)
        return out
