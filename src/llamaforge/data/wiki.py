"""Wikipedia (LLaMA §2.1: "removes hyperlinks, comments and other formatting boilerplate").

Two input formats, chosen per file:

* **MediaWiki XML dumps** (``.xml``, ``.xml.bz2``, or any file starting with ``<``): streamed
  with ``iterparse``; one document per main-namespace (``ns`` 0), non-redirect page: the
  title line, a blank line, then the page's wikitext with its markup stripped (see
  :func:`strip_wikitext`). The dump's language is the root's ``xml:lang``.
* **wikitext files** (WikiText-2/103 style, anything else): articles start at a
  `` = Title = `` line, sections are `` = = Sub = = ``; one document per article, headings
  kept as plain lines, the tokenisation undone (`` @-@ `` → ``-``, `` @,@ `` → ``,``,
  `` @.@ `` → ``.``, no space before punctuation or inside brackets and quotes), ``<unk>``
  dropped unless ``keep_unk``. The language of such an article is detected with ``langid``
  (only when ``languages`` is set).

Options: ``min_chars`` (shorter documents dropped, ``too_short``), ``keep_unk``,
``languages`` (ISO 639-1 codes to keep, None = all; :data:`PAPER_LANGUAGES` are the paper's 20).
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from llamaforge.data.base import FilterStats, parse_options, read_text

PAPER_LANGUAGES = (
    "bg ca cs da de en es fr hr hu it nl pl pt ro ru sl sr sv uk".split()
)  # LLaMA §2.1: Latin or Cyrillic script Wikipedias

REFERENCE_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "notes and references",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
}

_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


@dataclass
class WikiOptions:
    min_chars: int = 50
    keep_unk: bool = False
    languages: list[str] | None = None


# ----------------------------------------------------------------------------- wikitext-2


_ARTICLE = re.compile(r"^ = (?!=)(.*?) = $")
_HEADING = re.compile(r"^ ((?:= )+)(.*?) ((?:= )*=) ?$")


_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", "%", ")", "]", "}"}
_NO_SPACE_AFTER = {"(", "[", "{"}
_CONTRACTION = re.compile(r"^(?:'(?:s|t|re|ve|ll|d|m)|n't)$", re.I)


def detokenize(line: str, keep_unk: bool = False) -> tuple[str, int]:
    """Undo WikiText's tokenisation in one line; returns the line and ``<unk>``s removed."""
    unks = 0
    if not keep_unk:
        unks = line.count("<unk>")
        if unks:
            line = line.replace("<unk>", " ")
    line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    out: list[str] = []
    glue_next = False  # no space before the next token
    open_quote = False
    for tok in line.split():
        glue_prev = tok in _NO_SPACE_BEFORE or bool(_CONTRACTION.match(tok))
        if tok == '"':
            glue_prev, open_quote = open_quote, not open_quote
        if out and not glue_prev and not glue_next:
            out.append(" ")
        out.append(tok)
        glue_next = tok in _NO_SPACE_AFTER or (tok == '"' and open_quote)
    line = "".join(out)
    return line, unks


def split_wikitext(text: str, keep_unk: bool, stats: FilterStats) -> Iterator[str]:
    """WikiText articles: split at `` = Title = `` lines, clean every line."""
    lines: list[str] = []
    unks = 0

    def flush() -> str | None:
        body = "\n".join(lines).strip()
        body = re.sub(r"\n{3,}", "\n\n", body)
        return body or None

    for raw in text.splitlines():
        if article := _ARTICLE.match(raw):
            doc = flush()
            if doc:
                yield doc
            lines = []
            title, n = detokenize(article.group(1), keep_unk)
            unks += n
            lines.append(title)
            lines.append("")
            continue
        heading = _HEADING.match(raw)
        if heading and heading.group(1).count("=") == heading.group(3).count("="):
            title, n = detokenize(heading.group(2), keep_unk)
            unks += n
            lines.extend(["", title])
            continue
        line, n = detokenize(raw, keep_unk)
        unks += n
        if line or (lines and lines[-1]):
            lines.append(line)
    doc = flush()
    if doc:
        yield doc
    if unks:
        stats.drop("unk_removed", unks)


# ----------------------------------------------------------------------------- MediaWiki


def _remove_balanced(text: str, open_: str, close: str) -> str:
    """``text`` without every (nested) ``open_ ... close`` span; unclosed ones run to the end."""
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _remove_templates(text: str) -> str:
    if "{{" not in text:
        return text
    # Fast path: strip innermost templates repeatedly.
    inner = re.compile(r"\{\{(?:(?!\{\{|\}\})[\s\S])*\}\}")
    for _ in range(50):
        text, n = inner.subn("", text)
        if not n:
            break
    if "{{" in text:
        text = _remove_balanced(text, "{{", "}}")
    return text


def _remove_tables(text: str) -> str:
    out: list[str] = []
    depth = 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
            continue
        if depth:
            if stripped.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


_DROP_LINK_PREFIX = re.compile(r"^\s*:?\s*(file|image|category|media)\s*:", re.I)
_INTERWIKI = re.compile(r"^\s*[a-z]{2,3}(?:-[a-z]+)?\s*:", re.I)


def _replace_links(text: str) -> str:
    """``[[target|anchor]]`` → anchor, ``[[target]]`` → target; File/Image/Category links
    (with nested links in their captions) and interlanguage links removed."""
    out: list[str] = []
    i = 0
    while True:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            break
        out.append(text[i:j])
        depth = 0
        k = j
        end = -1
        while k < len(text) - 1:
            if text.startswith("[[", k):
                depth += 1
                k += 2
            elif text.startswith("]]", k):
                depth -= 1
                k += 2
                if depth == 0:
                    end = k
                    break
            else:
                k += 1
        if end < 0:  # unclosed: drop the brackets
            out.append(text[j + 2 :])
            break
        inner = text[j + 2 : end - 2]
        if _DROP_LINK_PREFIX.match(inner) or (
            _INTERWIKI.match(inner) and "|" not in inner and " " not in inner.split(":")[0]
        ):
            pass
        else:
            target, sep, anchor = inner.partition("|")
            label = anchor if sep and anchor.strip() else target
            out.append(_replace_links(label))
        i = end
    return "".join(out)


def strip_wikitext(text: str) -> str:
    """Plain text of MediaWiki markup (see the module docstring)."""
    text = re.sub(r"<!--[\s\S]*?(?:-->|$)", "", text)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>[\s\S]*?(?:</ref\s*>|$)", "", text, flags=re.I)
    text = re.sub(r"<(gallery|math|timeline|score|nowiki)\b[^>]*>[\s\S]*?</\1\s*>", "", text)
    text = _remove_templates(text)
    text = _remove_tables(text)
    text = _replace_links(text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = html.unescape(text)
    # Sections: drop the trailing run of reference-type sections, then plain headings.
    lines = text.split("\n")
    heads = [
        (i, m.group(2).strip())
        for i, line in enumerate(lines)
        if (m := re.match(r"^\s*(=+)\s*(.*?)\s*\1\s*$", line)) and len(m.group(1)) <= 2
    ]
    cut = len(lines)
    for i, title in reversed(heads):
        if title.lower() in REFERENCE_SECTIONS:
            cut = i
        else:
            break
    lines = lines[:cut]
    cleaned: list[str] = []
    for line in lines:
        m = re.match(r"^\s*(=+)\s*(.*?)\s*\1\s*$", line)
        if m:
            cleaned.extend(["", m.group(2)])
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"[ \t]+", " ", line).strip()
        cleaned.append(line)
    out = "\n".join(cleaned).strip()
    return re.sub(r"\n{3,}", "\n\n", out)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


def _is_xml(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".xml", ".xml.bz2")):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(256).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return False
    return head.startswith(b"<")


def _read_dump(path: Path, opts: WikiOptions, stats: FilterStats) -> Iterator[tuple[str, str]]:
    """(language or "", document) per kept page of one MediaWiki dump."""
    lang = ""
    try:
        stats.bytes_in += path.stat().st_size
        with _open(path) as f:
            context = ET.iterparse(f, events=("start", "end"))
            root = None
            for event, elem in context:
                if event == "start":
                    if root is None:
                        root = elem
                        lang = (elem.get(_XML_LANG) or "").lower()
                    continue
                if _local(elem.tag) != "page":
                    continue
                stats.documents_in += 1
                title = ns = ""
                text = ""
                redirect = False
                for child in elem.iter():
                    tag = _local(child.tag)
                    if tag == "title":
                        title = (child.text or "").strip()
                    elif tag == "ns":
                        ns = (child.text or "").strip()
                    elif tag == "redirect":
                        redirect = True
                    elif tag == "text":
                        text = child.text or ""
                if root is not None:
                    root.clear()
                if ns not in ("", "0") or (not ns and ":" in title.split(" ")[0]):
                    stats.drop("non_main_namespace")
                    continue
                if redirect or re.match(r"\s*#redirect", text, re.I):
                    stats.drop("redirect")
                    continue
                body = strip_wikitext(text)
                yield lang, f"{title}\n\n{body}".strip() if title else body
    except ET.ParseError as e:
        stats.error(path, f"malformed XML ({e})")
    except (OSError, EOFError, ValueError) as e:
        stats.error(path, f"cannot read ({e})")


def _detect(text: str) -> str:
    import langid

    return str(langid.classify(text[:2000])[0])


def read_wikipedia(paths: list[Path], options: dict[str, Any], stats: FilterStats) -> Iterator[str]:
    """Wikipedia articles from MediaWiki XML dumps or WikiText files, one per article."""
    opts: WikiOptions = parse_options(WikiOptions, options, "wikipedia")
    wanted = {x.lower() for x in opts.languages} if opts.languages is not None else None
    for path in paths:
        docs: Iterator[tuple[str, str]]
        if _is_xml(path):
            docs = _read_dump(path, opts, stats)
        else:
            raw = read_text(path, stats)
            if raw is None:
                continue
            stats.bytes_in += len(raw.encode("utf-8"))
            articles = list(split_wikitext(raw, opts.keep_unk, stats))
            stats.documents_in += len(articles)
            if not articles:
                stats.drop("empty_file")
            docs = (("", a) for a in articles)
        for lang, doc in docs:
            if len(doc) < opts.min_chars:
                stats.drop("too_short")
                continue
            if wanted is not None:
                lang = lang or _detect(doc)
                if lang not in wanted:
                    stats.drop("language")
                    continue
            stats.documents_out += 1
            stats.bytes_out += len(doc.encode("utf-8"))
            yield doc
