"""What every source kind shares: its spec in the data config, and the filter counts.

A source kind is a function ``(paths, options, stats) -> Iterator[str]`` that reads the
files of one source and yields cleaned documents; ``KINDS`` maps kind names to them. Each
filter counts what it removed and why in ``stats``; a file that cannot be read is counted
and reported by name, and the other files go on.
"""

from __future__ import annotations

import codecs
import glob
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from llamaforge.config import ConfigError, from_dict

log = logging.getLogger("llamaforge.data")

# how read_text treats invalid UTF-8: "strict" skips the file (reported), "replace" puts
# U+FFFD for each invalid sequence and counts the bytes; ``decoding`` sets it per source
DECODE_ERRORS = ("strict", "replace")
decode_errors: ContextVar[str] = ContextVar("decode_errors", default="strict")


class decoding:
    """``with decoding(mode)``: read_text's invalid-UTF-8 handling for the block."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        self._token = decode_errors.set(self.mode)

    def __exit__(self, *_exc: object) -> None:
        decode_errors.reset(self._token)


class DataError(ValueError):
    """Bad data configuration or input; the message names the file, field or value."""


@dataclass
class FilterStats:
    """Counters of one source: documents read/kept, bytes in/out, removals by reason."""

    documents_in: int = 0
    documents_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    removed: Counter = field(default_factory=Counter)  # reason -> documents (or lines) removed
    errors: list[str] = field(default_factory=list)  # "path: what went wrong"
    replaced_bytes: int = 0  # invalid UTF-8 bytes replaced by U+FFFD (errors = "replace")

    def drop(self, reason: str, n: int = 1) -> None:
        self.removed[reason] += n

    def error(self, path: str | Path, message: str) -> None:
        text = f"{path}: {message}"
        self.errors.append(text)
        self.removed["unreadable_file"] += 1
        log.warning("skipping %s", text)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "removed": dict(sorted(self.removed.items())),
            "errors": list(self.errors),
        }
        if self.replaced_bytes:
            out["replaced_bytes"] = self.replaced_bytes
        return out


T = TypeVar("T")


def parse_options(cls: type[T], options: dict[str, Any] | None, kind: str) -> T:
    """The options dataclass ``cls`` of source kind ``kind``, loaded by
    ``config.from_dict``; unknown names and wrong types are a ``DataError`` that names the
    kind and the option (and the allowed names or values)."""
    try:
        return from_dict(cls, dict(options or {}), where=kind)
    except ConfigError as e:
        raise DataError(str(e)) from None


SourceFn = Callable[[list[Path], dict[str, Any], FilterStats], Iterator[str]]


def expand_paths(patterns: list[str], base: Path | None = None, suffixes=None) -> list[Path]:
    """Files named by ``patterns`` (files, folders searched recursively, or globs), sorted
    and de-duplicated. A pattern that matches nothing is a ``DataError`` naming it."""
    out: dict[Path, None] = {}
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
        if not matches:
            raise DataError(f"path {pattern!r} matches no file")
        for m in matches:
            files = sorted(x for x in m.rglob("*") if x.is_file()) if m.is_dir() else [m]
            for f in files:
                if suffixes is None or f.suffix.lower() in suffixes or m == f:
                    out[f] = None
    return list(out)


def read_text(path: Path, stats: FilterStats) -> str | None:
    """UTF-8 text of ``path``, or None (counted, reported) for binary files and, unless the
    source's ``errors = "replace"`` (`decode_errors`), for invalid UTF-8; with "replace"
    each invalid sequence becomes U+FFFD and its bytes are counted in
    ``stats.replaced_bytes``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        stats.error(path, f"cannot read ({e.strerror or e})")
        return None
    if b"\x00" in data[:8192]:
        stats.error(path, "binary file (NUL bytes), expected UTF-8 text")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if decode_errors.get() != "replace":
            stats.error(
                path, f'invalid UTF-8 at byte {e.start} (errors = "replace" keeps the file)'
            )
            return None
    text, replaced = decode_replace(data)
    stats.replaced_bytes += replaced
    log.warning("%s: replaced %d invalid UTF-8 byte(s) with U+FFFD", path, replaced)
    return text


def decode_replace(data: bytes) -> tuple[str, int]:
    """``data.decode("utf-8", "replace")`` and the number of bytes replaced (linear time)."""
    view = memoryview(data)
    parts: list[str] = []
    pos = replaced = 0
    while pos < len(data):
        try:
            text, _ = codecs.utf_8_decode(view[pos:], "strict", True)
        except UnicodeDecodeError as e:
            good, _ = codecs.utf_8_decode(view[pos : pos + e.start], "strict", True)
            parts += [good, "\ufffd"]
            replaced += e.end - e.start
            pos += e.end
        else:
            parts.append(text)
            break
    return "".join(parts), replaced
