"""Atomic writes: a file or a directory either has its final name and is complete, or does
not exist (an older version stays in place until the new one is complete).

* ``atomic_write(path, data)`` writes a whole str/bytes file;
* ``atomic_path(path)`` yields a temporary path for a writer that wants a file name
  (matplotlib, the GGUF writer) and ``atomic_open(path, mode)`` a file object for one that
  streams (token shards, clean.jsonl); both rename the file into place when the block ends
  without an exception and remove it otherwise;
* ``atomic_dir(path, overwrite=False)`` yields a hidden sibling directory that is renamed
  into place when the block ends without an exception (checkpoints, conversions).

Each renames only after the data is flushed and fsynced, then fsyncs the parent directory
so the rename itself survives a crash. A full disk while the block or the helper writes
(ENOSPC, or a writer's own error on a device that has no space left: safetensors, a short
write, DCP) is a `NoSpaceError` "no space left on device while writing PATH"; the previous
output stays in place and the temporary is removed. Temporary names start with a dot and contain
``.tmp`` (``.NAME.tmp-XXXX``), so they are easy to recognise and never mistaken for output.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "NoSpaceError",
    "atomic_dir",
    "atomic_open",
    "atomic_path",
    "atomic_write",
    "sha256_file",
]

# a device with less than this free after a failed write is taken to be full
_FULL_BYTES = 1 << 20
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "errno 28", "disk full")
# errors a writer raises for a short write (with OSError itself, not its subclasses)
_WRITE_ERRORS = ("SafetensorError", "CheckpointException", "RuntimeError")


class NoSpaceError(OSError):
    """The device filled up while writing ``filename``: one line for the CLI (it carries
    an ``exit_code``), ``errno`` ENOSPC, the writer's own error as ``__cause__``."""

    exit_code = 1

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(f"no space left on device while writing {path}")
        self.errno = errno.ENOSPC
        self.filename = str(path)

    def __str__(self) -> str:
        return str(self.args[0])


def is_no_space(e: BaseException, where: Path) -> bool:
    """Whether ``e`` (from a writer in ``where``) means the device is full: ENOSPC or
    EDQUOT anywhere in its chain, a message that says so, or a writer's error that a full
    device causes (a short write ``OSError``, ``SafetensorError``, DCP's
    ``CheckpointException``) while the device has (almost) no space left."""
    if isinstance(e, (NoSpaceError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return False
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(cur).lower() for t in _NO_SPACE_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    write_error = type(e) is OSError or type(e).__name__ in _WRITE_ERRORS
    if not write_error:
        return False
    try:
        return shutil.disk_usage(where).free < _FULL_BYTES
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename in it); a no-op where directories cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_file(p)
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` (``.NAME.tmp-XXXX``) for the block to write; when
    the block ends without an exception the file is fsynced, given the permissions a plain
    ``open`` would (0666 less the umask) and renamed onto ``path``; otherwise removed."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: is a directory, expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    except OSError as e:
        if is_no_space(e, target.parent):
            raise NoSpaceError(target) from e
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as e:
        full = is_no_space(e, target.parent)  # before the temporary frees its space
        tmp.unlink(missing_ok=True)
        if full:
            raise NoSpaceError(target) from e
        raise


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None
) -> Iterator[IO[Any]]:
    """``open(path, mode)`` on a temporary sibling that replaces ``path`` when the block ends
    without an exception (``mode`` is ``"w"`` or ``"wb"``; text defaults to UTF-8)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode {mode!r}: expected 'w' or 'wb'")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()


def atomic_write(path: str | os.PathLike, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` (``str`` is encoded with ``encoding``) to ``path`` atomically: a
    temporary file in the same directory, flushed and fsynced, renamed into place, and the
    directory fsynced. Returns ``path``."""
    if isinstance(data, str):
        data = data.encode(encoding)
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write expects str or bytes, got {type(data).__name__}")
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A hidden temporary sibling directory (``.NAME.tmp-XXXX``) for the block to fill; it is
    renamed to ``path`` when the block ends without an exception and removed otherwise.

    An existing ``path`` is a FileExistsError unless ``overwrite``; then the old one is moved
    aside and removed only after the new one is in place (restored if the rename fails).
    """
    out = Path(path)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        if is_no_space(e, out.parent):
            raise NoSpaceError(out) from e
        raise
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if out.exists() or out.is_symlink():
            if not overwrite:  # appeared while the block ran
                raise FileExistsError(f"{out}: already exists (pass overwrite=True to replace it)")
            old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        _fsync_dir(out.parent)
        if old is not None:
            _remove(old)
    except BaseException as e:
        full = is_no_space(e, out.parent)  # before the temporary frees its space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise NoSpaceError(out) from e
        raise


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict:
    """The JSON object in ``path``; anything else (invalid JSON, another type) is ``error``
    naming the file. A missing file raises FileNotFoundError as usual."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # thousands of nested brackets
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in ``chunk``-sized pieces (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()
