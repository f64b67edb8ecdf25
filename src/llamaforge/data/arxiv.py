"""ArXiv LaTeX sources (LLaMA §2.1, following Lewkowycz et al. 2022).

One document per paper. A paper is a folder: the ``.tex``/``.sty`` files given that share a
parent directory (or, with ``paper_per_file``, each ``.tex`` file alone). Steps:

1. Comments are removed from every file: ``%`` to the end of the line (not ``\\%``), eating
   the newline and the next line's indentation as TeX does, and ``comment`` environments.
2. The main file is chosen: among the files that contain ``\\documentclass`` or
   ``\\begin{document}``, the one whose text with all ``\\input``/``\\include`` inlined is
   longest (the HoTT book's ``main.tex``, not its covers or errata). ``\\input{x}``,
   ``\\input x`` and ``\\include{x}`` are inlined recursively (relative to the paper's folder,
   with or without ``.tex``); a missing file is counted (``latex_missing_input``).
3. User macros are collected from *all* files of the paper (the main text first, then the
   other files in path order): ``\\newcommand``/``\\renewcommand``/``\\providecommand``
   (starred or not, ``{\\x}`` or ``\\x``, ``[n]`` arguments and an optional ``[default]`` for
   the first), ``\\def\\x#1#2{...}`` (also delimited parameters such as ``\\def\\x(#1){...}``),
   ``\\DeclareMathOperator`` and ``\\let\\a\\b`` of a user macro. ``\\newcommand`` and
   ``\\providecommand`` do not override an existing definition; ``\\renewcommand``/``\\def``
   do. The definitions are removed from the text.
4. Everything before the first sectioning command of the body is dropped: the first
   ``\\chapter``/``\\part`` when the paper has chapters (a book: the HoTT book starts at its
   Preface, ``\\chapter*{Preface}``), otherwise the first ``\\section``. The bibliography is
   dropped with everything after it: ``\\begin{thebibliography}``, ``\\bibliography{...}``,
   ``\\printbibliography``, whichever comes first; so is ``\\end{document}`` and what follows.
5. Uses of user macros are inline-expanded; arguments are balanced ``{...}`` groups or single
   tokens. The replacement of a macro is expanded again, up to ``max_expansion_depth`` levels
   (``latex_expansion_depth_exceeded`` counts the uses left as they were at that depth).

Counts (in ``stats.removed``): ``latex_comments_removed``, ``latex_macro_definitions_removed``,
``latex_macro_expansions``, ``latex_preamble_removed``, ``latex_bibliography_removed``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.data.base import DataError, FilterStats, parse_options, read_text

TEX_SUFFIXES = {".tex", ".sty", ".ltx", ".cls"}


@dataclass
class ArxivOptions:
    min_chars: int = 200
    max_expansion_depth: int = 10
    paper_per_file: bool = False


@dataclass
class Macro:
    name: str  # without the backslash
    body: str
    nargs: int = 0
    default: str | None = None  # first argument optional, with this default
    pattern: list[str] | None = None  # \def parameter text: literals and "#n"


@dataclass
class _Counts:
    comments: int = 0
    definitions: int = 0
    expansions: int = 0
    depth_exceeded: int = 0
    missing: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- comments

_COMMENT = re.compile(r"(?<!\\)((?:\\\\)*)%[^\n]*(?:\n[ \t]*|$)")
_COMMENT_ENV = re.compile(r"\\begin\{comment\}[\s\S]*?(?:\\end\{comment\}|$)")


def remove_comments(text: str, counts: _Counts | None = None) -> str:
    """``text`` without ``%`` comments (``\\%`` kept) and ``comment`` environments."""
    text, n = _COMMENT.subn(r"\1", text)
    text, m = _COMMENT_ENV.subn("", text)
    if counts is not None:
        counts.comments += n + m
    return text


# ----------------------------------------------------------------------------- parsing

_CS = re.compile(r"\\([A-Za-z@]+|.)", re.S)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n":
        i += 1
    return i


def _group(text: str, i: int) -> tuple[str, int] | None:
    """The balanced ``{...}`` group starting at ``text[i] == '{'``: (content, index after)."""
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    j = i
    n = len(text)
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j], j + 1
        j += 1
    return None


def _optional(text: str, i: int) -> tuple[str, int] | None:
    """A ``[...]`` optional argument at ``i`` (brackets inside braces allowed)."""
    if i >= len(text) or text[i] != "[":
        return None
    depth = 0
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                return None
        elif c == "]" and depth == 0:
            return text[i + 1 : j], j + 1
        j += 1
    return None


def _argument(text: str, i: int) -> tuple[str, int] | None:
    """One undelimited macro argument: a ``{group}``'s content or one token."""
    i = _skip_ws(text, i)
    if i >= len(text):
        return None
    c = text[i]
    if c == "{":
        return _group(text, i)
    if c in "}#%":
        return None
    if c == "\\":
        m = _CS.match(text, i)
        if m is None:
            return None
        return m.group(0), m.end()
    return c, i + 1


def _delimited(text: str, i: int, delim: str) -> tuple[str, int] | None:
    """An argument ending at ``delim`` outside braces: (content, index after ``delim``)."""
    depth = 0
    j = i
    while j < len(text):
        if depth == 0 and text.startswith(delim, j):
            arg = text[i:j]
            if len(arg) >= 2 and arg[0] == "{" and _group(arg, 0) == (arg[1:-1], len(arg)):
                arg = arg[1:-1]
            return arg, j + len(delim)
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                return None
        j += 1
    return None


def _name_at(text: str, i: int) -> tuple[str, int] | None:
    """``\\name`` or ``{\\name}`` at ``i``: (name, index after)."""
    i = _skip_ws(text, i)
    if text.startswith("{", i):
        g = _group(text, i)
        if g is None:
            return None
        inner = g[0].strip()
        m = _CS.fullmatch(inner)
        return (m.group(1), g[1]) if m else None
    m = _CS.match(text, i)
    if m is None or not text.startswith("\\", i):
        return None
    return m.group(1), m.end()


_DEF_START = re.compile(
    r"\\(newcommand|renewcommand|providecommand|DeclareRobustCommand|DeclareMathOperator"
    r"|def|gdef|let)(?![A-Za-z@])(\*?)"
)


def _parse_definition(text: str, m: re.Match[str]) -> tuple[str, Macro | None, int] | None:
    """Parse the definition starting at match ``m``: (command, macro, end) or None."""
    cmd = m.group(1)
    got = _name_at(text, m.end())
    if got is None:
        return None
    name, i = got
    if cmd == "let":
        j = _skip_ws(text, i)
        if text.startswith("=", j):
            j = _skip_ws(text, j + 1)
        other = _CS.match(text, j)
        if other is None or not text.startswith("\\", j):
            return None
        return cmd, Macro(name=name, body="\\" + other.group(1)), other.end()
    if cmd in ("def", "gdef"):
        j = i
        params: list[str] = []
        while j < len(text) and text[j] != "{":
            if text[j] == "#" and j + 1 < len(text) and text[j + 1].isdigit():
                params.append(text[j : j + 2])
                j += 2
            else:
                if params and not params[-1].startswith("#"):
                    params[-1] += text[j]
                else:
                    params.append(text[j])
                j += 1
        g = _group(text, j)
        if g is None:
            return None
        nargs = sum(1 for p in params if p.startswith("#"))
        simple = all(p.startswith("#") for p in params)
        return (
            cmd,
            Macro(name=name, body=g[0], nargs=nargs, pattern=None if simple else params),
            g[1],
        )
    if cmd == "DeclareMathOperator":
        g = _group(text, _skip_ws(text, i))
        if g is None:
            return None
        return cmd, Macro(name=name, body="\\operatorname{" + g[0] + "}"), g[1]
    j = _skip_ws(text, i)
    nargs = 0
    default = None
    opt = _optional(text, j)
    if opt is not None:
        try:
            nargs = int(opt[0].strip())
        except ValueError:
            return None
        j = _skip_ws(text, opt[1])
        opt2 = _optional(text, j)
        if opt2 is not None:
            default = opt2[0]
            j = _skip_ws(text, opt2[1])
    g = _group(text, j)
    if g is None:
        return None
    return cmd, Macro(name=name, body=g[0], nargs=nargs, default=default), g[1]


def collect_macros(text: str, macros: dict[str, Macro], counts: _Counts | None = None) -> str:
    """Add the definitions of ``text`` to ``macros``; return ``text`` without them."""
    out: list[str] = []
    pos = 0
    for m in _DEF_START.finditer(text):
        if m.start() < pos:
            continue
        parsed = _parse_definition(text, m)
        if parsed is None:
            continue
        cmd, macro, end = parsed
        out.append(text[pos : m.start()])
        pos = end
        if counts is not None:
            counts.definitions += 1
        if macro is None:
            continue
        if cmd == "let":
            target = macro.body[1:]
            if target in macros:
                src = macros[target]
                macros[macro.name] = Macro(
                    macro.name, src.body, src.nargs, src.default, src.pattern
                )
            continue
        if cmd in ("newcommand", "providecommand") and macro.name in macros:
            continue
        macros[macro.name] = macro
    out.append(text[pos:])
    return "".join(out)


# ----------------------------------------------------------------------------- expansion

_PARAM = re.compile(r"#(#|[1-9])")


def _substitute(body: str, args: list[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group(1) == "#":
            return "#"
        k = int(m.group(1))
        return args[k - 1] if k <= len(args) else ""

    return _PARAM.sub(repl, body)


def _match_args(macro: Macro, text: str, i: int) -> tuple[list[str], int] | None:
    """Arguments of a use of ``macro`` whose name ends at ``i``: (args, index after)."""
    args: list[str] = []
    if macro.pattern is not None:
        parts = macro.pattern
        j = i
        for k, part in enumerate(parts):
            if part.startswith("#"):
                nxt = parts[k + 1] if k + 1 < len(parts) else None
                if nxt is not None and not nxt.startswith("#"):
                    got = _delimited(text, j, nxt)
                    if got is None:
                        return None
                    args.append(got[0])
                    j = got[1] - len(nxt)
                else:
                    got = _argument(text, j)
                    if got is None:
                        return None
                    args.append(got[0])
                    j = got[1]
            else:
                if not text.startswith(part, j):
                    return None
                j += len(part)
        return args, j
    j = i
    remaining = macro.nargs
    if macro.default is not None and remaining:
        k = _skip_ws(text, j)
        opt = _optional(text, k)
        if opt is not None:
            args.append(opt[0])
            j = opt[1]
        else:
            args.append(macro.default)
        remaining -= 1
    for _ in range(remaining):
        got = _argument(text, j)
        if got is None:
            return None
        args.append(got[0])
        j = got[1]
    return args, j


_PROGRAMMING = re.compile(
    r"\\(?:@ifnextchar|@ifstar|if[A-Za-z@]*|else|fi|or|expandafter|csname|endcsname|futurelet"
    r"|afterassignment|let|def|edef|gdef|xdef|newcommand|renewcommand|providecommand"
    r"|aftergroup|noexpand|begingroup|endgroup)(?![A-Za-z@])"
)


def is_expandable(macro: Macro) -> bool:
    """Whether inline expansion can stand for ``macro``: not TeX programming (conditionals,
    look-ahead, definitions) and not self-recursive. Others are left as written."""
    if _PROGRAMMING.search(macro.body):
        return False
    return re.search(r"\\" + re.escape(macro.name) + r"(?![A-Za-z@])", macro.body) is None


def expand_macros(
    text: str, macros: dict[str, Macro], max_depth: int = 10, counts: _Counts | None = None
) -> str:
    """``text`` with every use of a macro in ``macros`` replaced by its (expanded) body."""
    counts = counts if counts is not None else _Counts()
    macros = {k: m for k, m in macros.items() if is_expandable(m)}
    if not macros:
        return text
    names = sorted(macros, key=len, reverse=True)
    use = re.compile(r"\\(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z@])")
    budget = [max(10 * len(text), 1_000_000)]  # guards against exponential definitions

    def expand(s: str, depth: int) -> str:
        out: list[str] = []
        pos = 0
        while True:
            m = use.search(s, pos)
            if m is None:
                break
            if m.start() > 0 and s[m.start() - 1] == "\\" and _odd_backslashes(s, m.start()):
                out.append(s[pos : m.end()])
                pos = m.end()
                continue
            macro = macros[m.group(1)]
            got = _match_args(macro, s, m.end())
            if got is None:
                out.append(s[pos : m.end()])
                pos = m.end()
                continue
            args, end = got
            if depth >= max_depth or budget[0] <= 0:
                counts.depth_exceeded += 1
                out.append(s[pos:end])
                pos = end
                continue
            body = _substitute(macro.body, args)
            counts.expansions += 1
            budget[0] -= len(body)
            out.append(s[pos : m.start()])
            expanded = expand(body, depth + 1)
            # keep a control word from running into following letters: "\x" + "y" != "\xy"
            if re.search(r"\\[A-Za-z@]+$", expanded) and end < len(s) and s[end].isalpha():
                expanded += " "
            out.append(expanded)
            pos = end
        out.append(s[pos:])
        return "".join(out)

    return expand(text, 0)


def _odd_backslashes(s: str, i: int) -> bool:
    n = 0
    while i - 1 - n >= 0 and s[i - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


# ----------------------------------------------------------------------------- structure

_INPUT = re.compile(r"\\(input|include)(?![A-Za-z@])\s*(?:\{([^{}]*)\}|([^\s{}\\]+))")


def inline_inputs(
    text: str, files: dict[str, str], counts: _Counts, depth: int = 0, seen: tuple = ()
) -> str:
    """``text`` with ``\\input``/``\\include`` replaced by the named files' (inlined) text."""

    def repl(m: re.Match[str]) -> str:
        name = (m.group(2) or m.group(3) or "").strip()
        key = _lookup(name, files)
        if key is None:
            counts.missing.append(name)
            return ""
        if key in seen or depth > 20:
            return ""
        body = inline_inputs(files[key], files, counts, depth + 1, seen + (key,))
        return ("\n" + body + "\n") if m.group(1) == "input" else ("\n\n" + body + "\n\n")

    return _INPUT.sub(repl, text)


def _lookup(name: str, files: dict[str, str]) -> str | None:
    name = name.strip()
    while name.startswith("./"):
        name = name[2:]
    for cand in (name, name + ".tex"):
        if cand in files:
            return cand
    return None


_BEGIN_DOC = re.compile(r"\\begin\s*\{document\}")
_END_DOC = re.compile(r"\\end\s*\{document\}")
_CHAPTER = re.compile(r"\\(?:chapter|part)(?![A-Za-z@])\*?")
_SECTION = re.compile(r"\\section(?![A-Za-z@])\*?")
_BIB = re.compile(
    r"\\begin\s*\{thebibliography\}|\\bibliography(?:style)?(?![A-Za-z@])\s*\{"
    r"|\\printbibliography(?![A-Za-z@])"
)


def _paper(files: dict[str, str], opts: ArxivOptions, stats: FilterStats) -> str | None:
    counts = _Counts()
    files = {k: remove_comments(v, counts) for k, v in files.items()}
    roots = [k for k, v in files.items() if "\\documentclass" in v or _BEGIN_DOC.search(v)]
    if not roots:
        roots = sorted(files)  # loose .tex files: the longest inlined one is the paper
    best: tuple[int, str, str] | None = None
    for key in sorted(roots):
        inlined = inline_inputs(files[key], files, _Counts(), seen=(key,))
        if best is None or len(inlined) > best[0]:
            best = (len(inlined), key, inlined)
    assert best is not None
    main_key = best[1]
    text = inline_inputs(files[main_key], files, counts, seen=(main_key,))
    macros: dict[str, Macro] = {}
    text = collect_macros(text, macros, counts)
    for key in sorted(files):
        if key != main_key:
            collect_macros(files[key], macros, None)
    begin = _BEGIN_DOC.search(text)
    body = text[begin.end() :] if begin else text
    end = _END_DOC.search(body)
    if end:
        body = body[: end.start()]
    body = expand_macros(body, macros, opts.max_expansion_depth, counts)
    # a paper's own sectioning commands, after expansion (macros may hide \section)
    first = _CHAPTER.search(body) or _SECTION.search(body)
    if first is None:
        stats.drop("latex_no_section")
        return None
    if first.start() > 0:
        stats.drop("latex_preamble_removed")
    body = body[first.start() :]
    bib = _BIB.search(body)
    if bib:
        body = body[: bib.start()]
        stats.drop("latex_bibliography_removed")
    if counts.missing:
        stats.drop("latex_missing_input", len(counts.missing))
    if counts.comments:
        stats.drop("latex_comments_removed", counts.comments)
    if counts.definitions:
        stats.drop("latex_macro_definitions_removed", counts.definitions)
    if counts.expansions:
        stats.drop("latex_macro_expansions", counts.expansions)
    if counts.depth_exceeded:
        stats.drop("latex_expansion_depth_exceeded", counts.depth_exceeded)
    body = re.sub(r"[ \t]+\n", "\n", body)
    return re.sub(r"\n{3,}", "\n\n", body).strip() + "\n"


def _group_papers(paths: list[Path], per_file: bool) -> list[list[Path]]:
    groups: dict[Path, list[Path]] = {}
    for p in paths:
        if p.is_dir():
            groups.setdefault(p, []).extend(
                sorted(x for x in p.rglob("*") if x.is_file() and x.suffix in TEX_SUFFIXES)
            )
        elif p.suffix.lower() in TEX_SUFFIXES:
            key = p if per_file else p.parent
            groups.setdefault(key, []).append(p)
    return [groups[k] for k in sorted(groups)]


def read_arxiv(paths: list[Path], options: dict[str, Any], stats: FilterStats) -> Iterator[str]:
    """ArXiv papers as cleaned LaTeX, one document per paper folder (see module docstring)."""
    opts: ArxivOptions = parse_options(ArxivOptions, options, "arxiv")
    if opts.max_expansion_depth < 0:
        raise DataError("option 'max_expansion_depth' of source kind 'arxiv' must be >= 0")
    for group in _group_papers(paths, opts.paper_per_file):
        if not group:
            continue
        root = Path(os.path.commonpath([p.parent for p in group]))
        files: dict[str, str] = {}
        for path in group:
            text = read_text(path, stats)
            if text is None:
                continue
            stats.bytes_in += len(text.encode("utf-8"))
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() == ".tex" or rel not in files:
                files[rel] = text.replace("\r\n", "\n")
        if not files:
            continue
        stats.documents_in += 1
        doc = _paper(files, opts, stats)
        if doc is None:
            continue
        if len(doc) < opts.min_chars:
            stats.drop("too_short")
            continue
        stats.documents_out += 1
        stats.bytes_out += len(doc.encode("utf-8"))
        yield doc
