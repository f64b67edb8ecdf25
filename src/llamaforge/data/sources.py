"""The registry of source kinds: kind name → reader/cleaner ``(paths, options, stats)``."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamaforge.data.base import DataError, FilterStats, SourceFn

# kind -> (module, function); modules are imported only when a source uses them
KINDS: dict[str, tuple[str, str]] = {
    "web": ("web", "read_web"),
    "code": ("code", "read_code"),
    "wikipedia": ("wiki", "read_wikipedia"),
    "books": ("books", "read_books"),
    "arxiv": ("arxiv", "read_arxiv"),
    "stackexchange": ("stackexchange", "read_stackexchange"),
    "generic": ("generic", "read_generic"),
    "stdlib_docs": ("stdlib", "read_stdlib_docs"),
}


def source_fn(kind: str, where: str = "source") -> SourceFn:
    if kind not in KINDS:
        raise DataError(f"{where}: unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    module, name = KINDS[kind]
    return getattr(importlib.import_module(f"llamaforge.data.{module}"), name)


def read_source(
    kind: str, paths: list[Path], options: dict[str, Any], stats: FilterStats
) -> Iterator[str]:
    return source_fn(kind)(paths, options, stats)
