"""Stack Exchange site dumps (LLaMA §2.1: "kept the data from the 28 largest websites, removed
the HTML tags from text and sorted the answers by score (from highest to lowest)").

Input: each site's ``Posts.xml`` (``<row Id PostTypeId ParentId Score Title Body .../>``).
One document per question: its title, a blank line, the question's body, then each answer
(blank-line separated), highest ``Score`` first, ties by ascending ``Id``. Bodies are HTML:
tags are removed and entities decoded; ``<p>``, ``<br>``, list items, headings, block quotes
and ``<pre>`` blocks become line breaks, the text of code blocks is kept verbatim.

Streaming: a file is read twice with ``iterparse`` (rows cleared as they are seen), so memory
stays flat in the size of the dump: the first pass counts the answers of every question
(integers only), the second holds a question only until its last answer has been read, then
yields it. Answers whose question is not in the file are counted (``orphan_answer``); so are
other post types (``other_post_type``: tag wikis, moderator nominations...) and questions
with neither title nor body (``empty_question``).

``min_posts``: a site (file) with fewer questions + answers is skipped whole
(``small_site``, counted in posts). The paper keeps the 28 largest sites; with the full
dump set a threshold that keeps 28 sites does the same (default 0: keep every file).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaforge.data.base import FilterStats, parse_options
from llamaforge.data.html import html_to_text as _html_to_text


@dataclass
class StackExchangeOptions:
    min_posts: int = 0
    min_chars: int = 0


def html_to_text(body: str) -> str:
    """Plain text of an HTML post body: tags removed, entities decoded, code kept
    (data/html.py's extractor, ``style="post"``)."""
    return _html_to_text(body, style="post")


def _rows(path: Path) -> Iterator[dict[str, str]]:
    """Attributes of each ``<row>`` of ``path`` (ET.ParseError/OSError propagate)."""
    context = ET.iterparse(path, events=("start", "end"))
    root = None
    for event, elem in context:
        if event == "start":
            if root is None:
                root = elem
            continue
        if elem.tag == "row":
            yield dict(elem.attrib)
            elem.clear()
            if root is not None:
                root.clear()


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _document(title: str, question: str, answers: list[tuple[int, int, str]]) -> str:
    parts = [p for p in (title.strip(), question) if p]
    parts += [text for _, _, text in sorted(answers, key=lambda a: (-a[0], a[1])) if text]
    return "\n\n".join(parts)


def _read_site(path: Path, opts: StackExchangeOptions, stats: FilterStats) -> Iterator[str]:
    # Pass 1: how many answers each question has.
    expected: dict[int, int] = {}
    parents: list[int] = []
    posts = 0
    try:
        size = path.stat().st_size
        for row in _rows(path):
            kind = row.get("PostTypeId")
            if kind == "1":
                expected.setdefault(_int(row.get("Id"), -1), 0)
                posts += 1
            elif kind == "2":
                parents.append(_int(row.get("ParentId"), -1))
                posts += 1
    except ET.ParseError as e:
        stats.error(path, f"malformed XML ({e})")
        return
    except OSError as e:
        stats.error(path, f"cannot read ({e.strerror or e})")
        return
    if posts < opts.min_posts:
        stats.drop("small_site", posts)
        return
    orphans = 0
    for parent in parents:
        if parent in expected:
            expected[parent] += 1
        else:
            orphans += 1
    del parents
    if orphans:
        stats.drop("orphan_answer", orphans)
    stats.bytes_in += size

    # Pass 2: hold each question until its last answer, then yield it.
    pending: dict[int, tuple[str, str, list[tuple[int, int, str]]]] = {}
    other = 0
    seen_question: set[int] = set()

    def finish(qid: int) -> Iterator[str]:
        title, question, answers = pending.pop(qid)
        if not title.strip() and not question:
            stats.drop("empty_question")
            return
        doc = _document(title, question, answers)
        if len(doc) < opts.min_chars:
            stats.drop("too_short")
            return
        stats.documents_out += 1
        stats.bytes_out += len(doc.encode("utf-8"))
        yield doc

    try:
        for row in _rows(path):
            kind = row.get("PostTypeId")
            if kind == "1":
                qid = _int(row.get("Id"), -1)
                seen_question.add(qid)
                stats.documents_in += 1
                early = pending[qid][2] if qid in pending else []
                pending[qid] = (row.get("Title", ""), html_to_text(row.get("Body", "")), early)
                if len(early) >= expected.get(qid, 0):
                    yield from finish(qid)
            elif kind == "2":
                parent = _int(row.get("ParentId"), -1)
                if parent not in expected:
                    continue
                entry = (
                    _int(row.get("Score")),
                    _int(row.get("Id")),
                    html_to_text(row.get("Body", "")),
                )
                if parent in pending and parent not in seen_question:
                    pending[parent][2].append(entry)  # answer before its question: wait
                elif parent in pending:
                    pending[parent][2].append(entry)
                    if len(pending[parent][2]) >= expected[parent]:
                        yield from finish(parent)
                else:
                    pending[parent] = ("", "", [entry])
            else:
                other += 1
    except (ET.ParseError, OSError) as e:  # the file changed between the passes
        stats.error(path, f"malformed XML ({e})")
        return
    for qid in list(pending):  # questions whose answers preceded them, in file order
        yield from finish(qid)
    if other:
        stats.drop("other_post_type", other)


def read_stackexchange(
    paths: list[Path], options: dict[str, Any], stats: FilterStats
) -> Iterator[str]:
    """Stack Exchange questions with their answers by descending score, one per question."""
    opts: StackExchangeOptions = parse_options(StackExchangeOptions, options, "stackexchange")
    for path in paths:
        yield from _read_site(path, opts, stats)
