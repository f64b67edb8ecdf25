"""HTML → text, the one extractor of the data pipeline (standard library ``html.parser``).

Tags are removed and entities decoded; block elements (``<p>``, ``<div>``, ``<li>``,
headings, ``<pre>``, tables…) become line breaks and table cells spaces; whitespace runs
collapse to one space except inside ``<pre>``. Two renderings of the same parse:

* ``style="page"`` (web pages, kind ``web``): page chrome is dropped: ``<script>``,
  ``<style>``, ``<noscript>``, ``<nav>``, ``<header>``, ``<footer>``, ``<aside>``, ``<form>``
  (and ``<head>``, ``<template>``, ``<svg>``, ``<iframe>``), and any element whose
  ``class``/``id`` looks like navigation (``nav*``, ``*menu``, ``sidebar``, ``cookie*``,
  ``*footer``, ``breadcrumb``, ``toc``...) or whose ``role`` is ``navigation``/``banner``/
  ``contentinfo``...; one block per line, every line stripped, blank lines dropped.
* ``style="post"`` (Stack Exchange bodies): nothing is dropped; list items get a ``- ``
  bullet and images their ``alt`` text; blocks are separated by (at most) one blank line
  and code in ``<pre>`` keeps its indentation.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Literal

__all__ = ["BLOCK_TAGS", "SKIP_TAGS", "html_to_text", "looks_like_navigation"]

SKIP_TAGS = frozenset(
    "script style noscript nav header footer aside form head template svg iframe".split()
)
VOID_TAGS = frozenset(
    "area base br col embed hr img input link meta param source track wbr".split()
)
BLOCK_TAGS = frozenset(
    """address article blockquote body caption dd details dialog div dl dt fieldset
    figcaption figure h1 h2 h3 h4 h5 h6 hr li main ol p pre section summary table tbody
    thead tfoot tr ul br title""".split()
)
CELL_TAGS = frozenset(["td", "th"])
_NAV_AFFIXES = ("nav", "menu", "sidebar", "cookie", "footer", "breadcrumb", "masthead")
_NAV_WORDS = frozenset(["toc", "skiplink", "pagination", "share", "social", "consent"])
_NAV_ROLES = frozenset(["navigation", "banner", "contentinfo", "menu", "menubar", "search"])

# <pre> text is kept between _CODE marks with its newlines as _NEWLINE, so that the
# renderings can tell code lines from the rest; both marks are removed at the end.
_CODE, _NEWLINE = "\x00", "\x01"


def looks_like_navigation(attrs: list[tuple[str, str | None]]) -> bool:
    """Whether an element's class/id/role marks it as navigation or page chrome."""
    for name, value in attrs:
        if not value:
            continue
        value = value.lower()
        if name == "role" and value in _NAV_ROLES:
            return True
        if name in ("class", "id"):
            for word in re.split(r"[^a-z0-9]+", value):
                if not word:
                    continue
                if word in _NAV_WORDS:
                    return True
                if any(word.startswith(a) or word.endswith(a) for a in _NAV_AFFIXES):
                    return True
    return False


class _TextExtractor(HTMLParser):
    def __init__(self, style: Literal["page", "post"]) -> None:
        super().__init__(convert_charrefs=True)
        self.page = style == "page"
        self.stack: list[tuple[str, bool]] = []  # (tag, skipped)
        self.skipping = 0
        self.in_pre = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_TAGS:
            self.handle_startendtag(tag, attrs)
            return
        if tag == "p" and self.stack and self.stack[-1][0] == "p":  # implied </p>
            self.handle_endtag("p")
        skip = self.page and (tag in SKIP_TAGS or looks_like_navigation(attrs))
        self.stack.append((tag, skip))
        self.skipping += skip
        if tag == "pre":
            self.in_pre += 1
        self._break(tag)
        if tag == "li" and not self.page and not self.skipping:
            self.parts.append("- ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._break(tag)
        if tag == "img" and not self.page and not self.skipping:
            alt = dict(attrs).get("alt")
            if alt:
                self.parts.append(alt)

    def handle_endtag(self, tag: str) -> None:
        if not any(t == tag for t, _ in self.stack):
            return
        while self.stack:
            t, skip = self.stack.pop()
            self.skipping -= skip
            if t == "pre":
                self.in_pre -= 1
            if t == tag:
                break
        self._break(tag)

    def _break(self, tag: str) -> None:
        if self.skipping:
            return
        if tag in BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in CELL_TAGS:
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self.skipping:
            return
        if self.in_pre:
            self.parts.append(_CODE + data.replace("\n", _NEWLINE) + _CODE)
        else:
            self.parts.append(re.sub(r"\s+", " ", data))


def _unmark(text: str) -> str:
    return text.replace(_CODE, "").replace(_NEWLINE, "\n")


def _page_text(text: str) -> str:
    lines = (re.sub(r"[ \t\r\f\v]+", " ", ln).strip() for ln in _unmark(text).split("\n"))
    return "\n".join(ln for ln in lines if ln)


def _post_text(text: str) -> str:
    lines = [
        re.sub(r"[ \t\r\f\v]+", " ", ln).strip() if _CODE not in ln else ln.rstrip()
        for ln in text.split("\n")
    ]
    return re.sub(r"\n{3,}", "\n\n", _unmark("\n".join(lines))).strip()


def html_to_text(html: str, *, style: Literal["page", "post"] = "page") -> str:
    """Visible text of ``html``: a web page's main text (``page``) or a post body (``post``),
    as the module docstring describes."""
    if style not in ("page", "post"):
        raise ValueError(f"html_to_text style {style!r}: expected 'page' or 'post'")
    parser = _TextExtractor(style)
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    return _page_text(text) if style == "page" else _post_text(text)
