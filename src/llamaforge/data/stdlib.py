"""A corpus every Python install carries: the standard library's own sources and docs.

Two sources, mirroring the paper's code and prose: ``code`` yields each ``.py`` file of
the running interpreter's standard library, ``docs`` yields the ``pydoc_data`` help
topics and the modules' docstrings. Order is deterministic (sorted paths).
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "__pycache__", "idlelib", "turtledemo", "test", "tests"}


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


def docs_documents(max_bytes: int | None = None) -> Iterator[str]:
    """English prose: pydoc's help topics, then every module's docstring."""
    total = 0
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    texts: Iterator[str] = (topics[k] for k in sorted(topics))

    def docstrings() -> Iterator[str]:
        for path in python_files(stdlib_dir()):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SyntaxWarning)
                    tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            doc = ast.get_docstring(tree)
            if doc and len(doc) > 200:
                yield doc

    for text in (*texts, *docstrings()):
        text = text.strip()
        if not text:
            continue
        yield text
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            return


def read_stdlib_docs(paths, options, stats) -> Iterator[str]:
    """Source kind ``stdlib_docs``: the prose of ``docs_documents`` (``paths`` unused).
    Option ``max_bytes`` caps it."""
    from llamaforge.data.base import DataError

    unknown = set(options) - {"max_bytes"}
    if unknown:
        raise DataError(f"stdlib_docs: unknown option(s) {sorted(unknown)}; expected max_bytes")
    for doc in docs_documents(options.get("max_bytes")):
        stats.documents_in += 1
        stats.bytes_in += len(doc.encode("utf-8"))
        stats.documents_out += 1
        stats.bytes_out += len(doc.encode("utf-8"))
        yield doc
