"""A corpus every Python install carries: the standard library's own sources and docs.

Two sources, mirroring the paper's code and prose: ``code`` yields each ``.py`` file of
the running interpreter's standard library, ``docs`` yields the ``pydoc_data`` help
topics and the modules' docstrings. Order is deterministic (sorted paths).

Source kind ``stdlib_docs`` reads files like every other kind, so that the datatrove
pipeline splits them over its tasks (each file once): ``pydoc_data/topics.py`` gives the
help topics, any other ``.py`` file its module docstring (when longer than 200
characters). Its ``paths`` default to ``@stdlib``: the topics module, then the standard
library's files (``docs_files``).
"""

from __future__ import annotations

import ast
import importlib.util
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "__pycache__", "idlelib", "turtledemo", "test", "tests"}
MIN_DOCSTRING = 200  # characters: shorter module docstrings are one-liners, not prose


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def code_documents(max_bytes: int | None = None) -> Iterator[str]:
    """The standard library's Python sources, one document per file."""
    total = 0
    for path in python_files(stdlib_dir()):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are Latin-1 test fixtures; not code we want
        if not text.strip():
            continue
        yield text
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            return


def topics_file() -> Path | None:
    """``pydoc_data/topics.py`` of this Python (None where a distribution strips it)."""
    try:
        spec = importlib.util.find_spec("pydoc_data.topics")
    except ImportError:
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def docs_files() -> list[Path]:
    """What ``stdlib_docs`` reads by default (``@stdlib``): the topics module, then every
    other file of the standard library."""
    topics = topics_file()
    files = [p for p in python_files(stdlib_dir()) if p != topics]
    return [topics, *files] if topics is not None else files


def _topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [topics[k] for k in sorted(topics)]


def _docstring(path: Path) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return None
    doc = ast.get_docstring(tree)
    return doc if doc and len(doc) > MIN_DOCSTRING else None


def file_docs(paths: Iterable[Path]) -> Iterator[str]:
    """English prose of ``paths``: the help topics for the topics module, the docstring of
    any other file; stripped, empty ones left out."""
    topics = topics_file()
    for path in paths:
        texts = _topics() if path == topics else [_docstring(path) or ""]
        for text in texts:
            text = text.strip()
            if text:
                yield text


def docs_documents(max_bytes: int | None = None) -> Iterator[str]:
    """English prose: pydoc's help topics, then every module's docstring."""
    total = 0
    for text in file_docs(docs_files()):
        yield text
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            return


def read_stdlib_docs(paths, options, stats) -> Iterator[str]:
    """Source kind ``stdlib_docs``: the prose of ``file_docs(paths)``. Option ``max_bytes``
    caps it (the documents up to the one that reaches it, in order)."""
    from llamaforge.data.base import DataError

    unknown = set(options) - {"max_bytes"}
    if unknown:
        raise DataError(f"stdlib_docs: unknown option(s) {sorted(unknown)}; expected max_bytes")
    max_bytes = options.get("max_bytes")
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 1):
        raise DataError(
            f"stdlib_docs: option 'max_bytes' must be an integer >= 1, got {max_bytes!r}"
        )
    total = 0
    for doc in file_docs(paths):
        stats.documents_in += 1
        stats.bytes_in += len(doc.encode("utf-8"))
        stats.documents_out += 1
        stats.bytes_out += len(doc.encode("utf-8"))
        yield doc
        total += len(doc)
        if max_bytes is not None and total >= max_bytes:
            return
