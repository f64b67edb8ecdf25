"""The prepared-data format, shared by its writers (prepare.py, pipeline.py) and its reader
(mixture.py).

A prepared folder ``OUT/`` holds ``mixture.json`` and one directory per source::

    OUT/mixture.json        {"sources": [{"name", "weight"}...], "tokenizer_sha256"}
    OUT/<name>/meta.json    the source's description (below), written last
    OUT/<name>/train-NNNNN.bin, val-NNNNN.bin
                            flat arrays of token ids, native byte order, ``dtype`` of
                            meta.json: uint16 when the vocabulary fits, else uint32

meta.json fields: ``format_version``, ``name``, ``kind``, ``weight``, ``fingerprint`` (of
the config and tokenizer), ``tokenizer``, ``tokenizer_sha256``, ``vocab_size``, ``dtype``,
``bos``, ``eos``, ``bos_id``, ``eos_id``, ``splits`` (``{"train"|"val": {"tokens",
"documents", "shards": [{"file", "tokens"}...]}}``), ``clean`` (filter counts),
``seconds`` and ``complete`` (true once everything above exists). A meta.json without
``format_version`` is version 1 (written before the field existed).
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import numpy as np

from llamaforge.data.base import DataError
from llamaforge.files import atomic_open, read_json_object

FORMAT_VERSION = 1
META_FILE = "meta.json"
MIXTURE_FILE = "mixture.json"
SPLITS = ("train", "val")
SHARD_GLOB = "*.bin"


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` (from 0) of ``split``: ``train-00000.bin``."""
    return f"{split}-{index:05d}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every token id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def is_val(text: str, fraction: float) -> bool:
    """Whether a document goes to the validation split: a hash of its text below
    ``fraction``, so the split depends neither on the order nor on the number of tasks."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


class ShardWriter:
    """Appends token arrays to NNNNN shards of at most ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.dir, self.split, self.dtype, self.limit = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self._f: IO[bytes] | None = None
        self._file = ExitStack()  # the open shard's atomic_open
        self._n = 0

    def _open(self) -> None:
        self._name = shard_name(self.split, len(self.shards))
        self._file = ExitStack()
        self._f = self._file.enter_context(atomic_open(self.dir / self._name, "wb"))
        self._n = 0

    def _close(self) -> None:
        if self._f is None:
            return
        self._file.close()  # fsync, rename into place
        self.shards.append({"file": self._name, "tokens": self._n})
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._f is None:
                self._open()
            room = self.limit - self._n
            part, ids = ids[:room], ids[room:]
            self._f.write(part.astype(self.dtype, copy=False).tobytes())
            self._n += len(part)
            self.tokens += len(part)
            if self._n >= self.limit:
                self._close()

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self, exc: BaseException) -> None:
        """After ``exc``: close the open shard as a failed atomic_open block, which removes
        its temporary file (and may raise an error naming it, e.g. on a full disk)."""
        if self._f is not None:
            self._f = None
            self._file.__exit__(type(exc), exc, exc.__traceback__)


def read_meta(source_dir: Path) -> dict[str, Any] | None:
    """A source's meta.json, or None when there is none; one that is not a JSON object is
    a DataError naming it."""
    p = Path(source_dir) / META_FILE
    return read_json_object(p, DataError) if p.is_file() else None


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: Path) -> None:
    """Raise a DataError naming ``where`` when a token id of ``tokens`` (a memory-mapped
    shard: one vectorised pass) lies outside the vocabulary [0, vocab_size)."""
    if len(tokens) == 0:
        return
    hi = int(tokens.max())
    lo = int(tokens.min()) if tokens.dtype.kind == "i" else 0
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        pos = int(np.flatnonzero(tokens == bad)[0])
        raise DataError(
            f"{where}: token id {bad} (at position {pos}) is outside the vocabulary of "
            f"{vocab_size}; the shard is corrupt or was prepared with another tokenizer"
        )


def check_meta(meta: dict[str, Any], where: Path) -> None:
    """Raise unless ``meta`` (read from ``where``) describes a complete source of a format
    version this code reads."""
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(
            f"{where}: format_version {version!r} is newer than this llamaforge reads "
            f"({FORMAT_VERSION}); update llamaforge or prepare the data again"
        )
    if not meta.get("complete"):
        raise DataError(f"{where}: source preparation did not complete")
