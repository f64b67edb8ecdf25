"""Source code: the paper's GitHub preprocessing.

Kind ``code`` makes one document per source file (suffixes ``extensions``, ``.py`` by
default; the running Python's standard library is the project's default code corpus). Steps,
each counted in ``stats.removed``:

1. **license** — the file's license is, in this order: an ``SPDX-License-Identifier`` in the
   file; else the LICENSE*/COPYING* file of its repository root, found by walking up from
   the file's folder (at most ``repo_depth`` levels when set, else up to the filesystem
   root); else a license header in the file itself. The text is classified by distinctive
   phrases into ``mit``, ``apache``, ``bsd``, ``psf``, ``isc``, ``mpl``, ``unlicense``,
   ``gpl``, ``lgpl``, ``agpl``, ``proprietary``. Files whose license is not in ``licenses``
   (default: Apache, BSD, MIT as in the paper, plus PSF, so that the standard library — the
   Python Software Foundation License, a permissive BSD-style license — is kept) are dropped
   as ``license:<name>``; files with no recognisable license follow ``unknown_license``
   (``keep`` by default, since nothing says they are under an excluded license; ``drop``
   counts them as ``license:unknown``).
2. **license header removal** — the leading comment block (``#`` lines after an optional
   shebang / coding line, ``//`` lines, or a ``/* ... */`` block) is removed with regular
   expressions when it mentions copyright / license terms (counted ``license_header``, per
   file; the document is kept).
3. **quality** — files with a line longer than ``max_line_length`` (``max_line_length``),
   mean line length above ``max_mean_line_length`` (``mean_line_length``) or a fraction of
   alphanumeric characters below ``min_alnum_fraction`` (``alnum_fraction``) are dropped;
   empty files after header removal are ``empty``.
4. **dedup** — exact file-level dedup on the sha256 of the content after header removal
   (``duplicate_file``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llamaforge.data.base import DataError, FilterStats, parse_options, read_text

PERMISSIVE_DEFAULT = ["apache", "bsd", "mit", "psf"]

# (name, pattern) in priority order: more specific first (LGPL/AGPL before GPL; the PSF
# license text mentions the GPL in its history table, so it comes first).
_LICENSE_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("psf", re.compile(r"python software foundation license|\bpsf license", re.I)),
    ("agpl", re.compile(r"gnu affero general public license", re.I)),
    ("lgpl", re.compile(r"gnu (lesser|library) general public license", re.I)),
    ("gpl", re.compile(r"gnu general public license|\bgnu gpl\b", re.I)),
    ("apache", re.compile(r"apache license,?\s+version|licensed under the apache", re.I)),
    ("mit", re.compile(r"permission is hereby granted,? free of charge|\bmit license\b", re.I)),
    (
        "bsd",
        re.compile(r"redistribution and use in source and binary forms|\bbsd license\b", re.I),
    ),
    ("isc", re.compile(r"permission to use, copy, modify, and(/or)? distribute this", re.I)),
    ("mpl", re.compile(r"mozilla public license", re.I)),
    ("unlicense", re.compile(r"this is free and unencumbered software", re.I)),
    (
        "proprietary",
        re.compile(r"\bproprietary\b|\bconfidential\b|unauthori[sz]ed copying", re.I),
    ),
]

_SPDX = re.compile(r"SPDX-License-Identifier:\s*([^\n*]+?)\s*(?:\*/|-->)?\s*$", re.M)
_SPDX_FAMILIES = [
    ("agpl", "AGPL"),
    ("lgpl", "LGPL"),
    ("gpl", "GPL"),
    ("apache", "APACHE"),
    ("mit", "MIT"),
    ("bsd", "BSD"),
    ("bsd", "0BSD"),
    ("psf", "PSF"),
    ("psf", "PYTHON"),
    ("isc", "ISC"),
    ("mpl", "MPL"),
    ("unlicense", "UNLICENSE"),
]


def classify_license(text: str) -> str | None:
    """The license family named by a license text or header, or None."""
    for name, pattern in _LICENSE_PATTERNS:
        if pattern.search(text):
            return name
    return None


def spdx_family(identifier: str) -> str:
    """License family of one SPDX id (``GPL-2.0-or-later`` → ``gpl``); unknown ids lowercased."""
    up = identifier.strip().strip("()").upper()
    for name, prefix in _SPDX_FAMILIES:
        if up.startswith(prefix):
            return name
    return up.lower() or "unknown"


def spdx_license(text: str, allowed: set[str]) -> str | None:
    """Family of the file's SPDX expression: for ``A OR B`` an allowed alternative wins, for
    ``A AND B`` a disallowed part wins; None without an SPDX line."""
    m = _SPDX.search(text[:5000])
    if not m:
        return None
    expr = m.group(1)
    alternatives = re.split(r"\s+OR\s+", expr, flags=re.I)
    families: list[str] = []
    for alt in alternatives:
        parts = [spdx_family(p) for p in re.split(r"\s+(?:AND|WITH)\s+", alt, flags=re.I)]
        bad = [p for p in parts if p not in allowed]
        families.append(bad[0] if bad else parts[0])
    for fam in families:
        if fam in allowed:
            return fam
    return families[0]


_LICENSE_FILE = re.compile(r"^(licen[cs]e|copying)([.\-_].*)?$", re.I)


class RepoLicenses:
    """Finds and classifies the LICENSE/COPYING file of each file's repository (cached)."""

    def __init__(self, depth: int | None) -> None:
        self.depth = depth
        self.cache: dict[Path, tuple[str | None, Path | None]] = {}

    def _license_of_dir(self, folder: Path) -> tuple[str | None, Path | None] | None:
        try:
            names = sorted(p for p in folder.iterdir() if _LICENSE_FILE.match(p.name))
        except OSError:
            return None
        for path in names:
            if not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="replace")[:200_000]
            except OSError:
                continue
            return classify_license(text), path
        return None

    def __call__(self, file: Path) -> tuple[str | None, Path | None]:
        folder = file.resolve().parent
        visited: list[Path] = []
        result: tuple[str | None, Path | None] = (None, None)
        level = 0
        while True:
            if folder in self.cache:
                result = self.cache[folder]
                break
            visited.append(folder)
            found = self._license_of_dir(folder)
            if found is not None:
                result = found
                break
            level += 1
            if folder.parent == folder or (self.depth is not None and level > self.depth):
                break
            folder = folder.parent
        for v in visited:
            self.cache[v] = result
        return result


# ----------------------------------------------------------------------------- headers

_HEADER_WORDS = re.compile(
    r"copyright|\(c\)|©|licen[cs]e|licensed under|permission is hereby granted"
    r"|all rights reserved|spdx-license-identifier|redistribution and use",
    re.I,
)
_PRESERVE = re.compile(r"^#!|^#.*coding[:=]")
_HASH_BLOCK = re.compile(r"\A(?:[ \t]*#[^\n]*\n|[ \t]*\n)+")
_SLASH_BLOCK = re.compile(r"\A(?:[ \t]*//[^\n]*\n|[ \t]*\n)+")
_C_BLOCK = re.compile(r"\A\s*/\*.*?\*/[ \t]*\n?", re.S)


def strip_license_header(text: str) -> tuple[str, bool]:
    """``text`` without its leading license comment block, and whether one was removed.
    A shebang and a coding declaration at the top are kept."""
    keep: list[str] = []
    rest = text
    while True:  # shebang / coding lines stay
        first, sep, tail = rest.partition("\n")
        if _PRESERVE.match(first) and len(keep) < 2:
            keep.append(first)
            rest = tail
        else:
            break
    for block in (_HASH_BLOCK, _SLASH_BLOCK, _C_BLOCK):
        m = block.match(rest)
        if m and _HEADER_WORDS.search(m.group(0)):
            rest = rest[m.end() :]
            head = "\n".join(keep)
            return (head + "\n" + rest if head else rest), True
    return text, False


# ----------------------------------------------------------------------------- kind


@dataclass
class CodeOptions:
    """Options of kind ``code`` (see the module doc)."""

    extensions: list[str] = field(default_factory=lambda: [".py"])
    licenses: list[str] = field(default_factory=lambda: list(PERMISSIVE_DEFAULT))
    unknown_license: Literal["keep", "drop"] = "keep"
    repo_depth: int | None = None
    strip_headers: bool = True
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alnum_fraction: float = 0.25
    dedup: bool = True


def quality_reason(text: str, opts: CodeOptions) -> str | None:
    """Why a file fails the line-length / alphanumeric heuristics, or None."""
    lines = text.split("\n")
    if max(len(line) for line in lines) > opts.max_line_length:
        return "max_line_length"
    if sum(len(line) for line in lines) / len(lines) > opts.max_mean_line_length:
        return "mean_line_length"
    if sum(c.isalnum() for c in text) / len(text) < opts.min_alnum_fraction:
        return "alnum_fraction"
    return None


def read_code(paths: list[Path], options: dict[str, Any], stats: FilterStats) -> Iterator[str]:
    """One cleaned document per permissively-licensed, non-duplicate source file."""
    opts = parse_options(CodeOptions, options, "code")
    if opts.repo_depth is not None and opts.repo_depth < 0:
        raise DataError(f"code: option 'repo_depth' must be >= 0, got {opts.repo_depth}")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in opts.extensions}
    allowed = {name.lower() for name in opts.licenses}
    repo = RepoLicenses(opts.repo_depth)
    seen: set[bytes] = set()
    for path in paths:
        path = Path(path)
        if path.suffix.lower() not in exts:
            continue
        text = read_text(path, stats)
        if text is None:
            continue
        stats.documents_in += 1
        stats.bytes_in += len(text.encode("utf-8"))
        if not text.strip():
            stats.drop("empty")
            continue
        lic = spdx_license(text, allowed)
        if lic is None:
            lic = repo(path)[0]
        if lic is None:
            m = _HASH_BLOCK.match(text) or _SLASH_BLOCK.match(text) or _C_BLOCK.match(text)
            lic = classify_license(m.group(0)) if m else None
        if lic is None:
            if opts.unknown_license == "drop":
                stats.drop("license:unknown")
                continue
        elif lic not in allowed:
            stats.drop(f"license:{lic}")
            continue
        if opts.strip_headers:
            text, stripped = strip_license_header(text)
            if stripped:
                stats.drop("license_header")
        text = text.strip("\n")
        if not text.strip():
            stats.drop("empty")
            continue
        reason = quality_reason(text, opts)
        if reason is not None:
            stats.drop(reason)
            continue
        if opts.dedup:
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                stats.drop("duplicate_file")
                continue
            seen.add(digest)
        doc = text + "\n"
        stats.documents_out += 1
        stats.bytes_out += len(doc.encode("utf-8"))
        yield doc
