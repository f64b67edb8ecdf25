"""Books (the paper's Gutenberg and Books3 source): one document per file.

Cleaning, per LLaMA §2.1 ("deduplicated at the book level, removing books with more than 90%
content overlap"):

* Project Gutenberg boilerplate is cut: everything up to the ``*** START OF THE/THIS PROJECT
  GUTENBERG EBOOK ... ***`` line (or the older ``*END*THE SMALL PRINT!...*END*`` line) and
  everything from the ``*** END OF ...`` / ``End of (the) Project Gutenberg...`` line on.
  A ``Produced by ...`` credit line right after the start marker goes with the header.
* Book-level near-duplicates are removed. **Content overlap** of book A with book B is the
  fraction of A's words that lie inside at least one word ``shingle_size``-gram (lower-cased
  words, 5 by default) that also occurs in B. It is asymmetric: a play copied whole into an
  anthology has overlap ~1.0 with the anthology, the anthology a small one with the play.
  Rule: books are visited from the largest (most distinct shingles) to the smallest, ties in
  path order; a book is dropped (``near_duplicate``) when its overlap with an already *kept*
  book is at least ``overlap`` (0.9). So of two near-identical books the first one is kept,
  and a book mostly contained in a larger one is dropped, never the larger one.
* Finding candidates uses MinHash (``datasketch``, ``num_perm`` permutations) over the
  hashed shingles and an LSH Ensemble index, which answers *containment* queries
  (|A ∩ B| / |A|) even between books of very different sizes. Shingle containment is lower
  than word overlap (one changed word breaks ``shingle_size`` shingles but ~1 word), so the
  LSH threshold is ``overlap ** shingle_size - 0.1`` (0.49 at 0.9 and 5-grams), and every
  candidate is re-checked exactly before anything is dropped.

Memory: only one MinHash signature (``num_perm`` integers) and a size per book are kept in
the first pass; texts and exact shingle hashes are recomputed from the files when needed
(candidates, then the output pass).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamaforge.data.base import DataError, FilterStats, parse_options, read_text

_WORD = re.compile(r"\w+")

_START = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)[^\n]*"
    r"|\*END\*THE SMALL PRINT![^\n]*"
    r"|\*{3}[ \t]*START OF THE PROJECT GUTENBERG[^\n]*"
    r"|START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*"
    r"|END OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*"
    r"|\*{3}[ \t]*END OF THE PROJECT GUTENBERG[^\n]*)$",
    re.IGNORECASE | re.MULTILINE,
)
_PRODUCED_BY = re.compile(r"\A\s*(?:Produced by|This etext was produced by)[^\n]*\n", re.I)


@dataclass
class BooksOptions:
    """``min_words``: books with fewer words are dropped (``too_short``). ``overlap``: content
    overlap at which the smaller/later book is a near-duplicate (paper: 90%). ``num_perm``:
    MinHash permutations. ``shingle_size``: words per shingle. ``dedup``: turn dedup off."""

    min_words: int = 100
    overlap: float = 0.9
    num_perm: int = 128
    shingle_size: int = 5
    dedup: bool = True


def strip_gutenberg(text: str) -> tuple[str, bool, bool]:
    """``text`` without the Project Gutenberg header and footer, and whether each was found."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    header = footer = False
    lowered = text.lower()
    if "gutenberg" not in lowered and "small print" not in lowered:
        return text.strip("\n").rstrip() + "\n", False, False
    start = _START.search(text)
    if start is not None:
        text = text[start.end() :]
        text = _PRODUCED_BY.sub("", text, count=1)
        header = True
    end = _END.search(text)
    if end is not None:
        text = text[: end.start()]
        footer = True
    return text.strip("\n").rstrip() + "\n", header, footer


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingle_hashes(words: list[str], k: int) -> np.ndarray:
    """64-bit hashes of the word ``k``-grams of ``words``, in order (deterministic)."""
    if len(words) < k:
        return np.zeros(0, dtype=np.uint64)
    table = {
        w: int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        for w in set(words)
    }
    wh = np.fromiter(map(table.__getitem__, words), np.uint64, len(words))
    n = len(words) - k + 1
    out = np.zeros(n, dtype=np.uint64)
    mult = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for j in range(k):
            out = out * mult + wh[j : j + n]
            out ^= out >> np.uint64(29)
    return out


def sorted_unique(h: np.ndarray) -> np.ndarray:
    s = np.sort(h)
    if len(s) == 0:
        return s
    return s[np.concatenate(([True], s[1:] != s[:-1]))]


def word_overlap(a: np.ndarray, b_sorted_unique: np.ndarray, k: int) -> float:
    """Fraction of the words of A (shingle hashes ``a`` in order) covered by a shingle of B."""
    if len(a) == 0:
        return 0.0
    idx = np.searchsorted(b_sorted_unique, a)
    idx[idx == len(b_sorted_unique)] = 0
    present = b_sorted_unique[idx] == a if len(b_sorted_unique) else np.zeros(len(a), bool)
    covered = np.zeros(len(a) + k - 1, dtype=bool)
    for j in range(k):
        covered[j : j + len(a)] |= present
    return float(covered.mean())


class _BookCache:
    """Small LRU of (shingle hashes, sorted unique hashes) per path, recomputed on a miss."""

    def __init__(self, k: int, size: int = 8) -> None:
        self.k = k
        self.size = size
        self.items: OrderedDict[Path, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        if path in self.items:
            self.items.move_to_end(path)
            return self.items[path]
        text = _clean_quiet(path)
        if text is None:
            return None
        h = shingle_hashes(_words(text), self.k)
        value = (h, sorted_unique(h))
        self.items[path] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def _clean_quiet(path: Path) -> str | None:
    text = read_text(path, FilterStats())  # errors were already reported in the first pass
    return None if text is None else strip_gutenberg(text)[0]


def read_books(paths: list[Path], options: dict[str, Any], stats: FilterStats) -> Iterator[str]:
    """Books, one document per file, Gutenberg boilerplate stripped, near-duplicates removed."""
    from datasketch import MinHash, MinHashLSHEnsemble

    opts: BooksOptions = parse_options(BooksOptions, options, "books")
    if not 0.0 < opts.overlap <= 1.0:
        raise DataError(
            f"option 'overlap' of source kind 'books' must be in (0, 1], got {opts.overlap}"
        )
    if opts.shingle_size < 1 or opts.num_perm < 16:
        raise DataError("options 'shingle_size' >= 1 and 'num_perm' >= 16 are required for books")
    k = opts.shingle_size

    # Pass 1: clean, count, sign.
    kept: list[tuple[int, Path, int, Any]] = []  # (order, path, distinct shingles, minhash)
    for order, path in enumerate(paths):
        raw = read_text(path, stats)
        if raw is None:
            continue
        stats.documents_in += 1
        stats.bytes_in += len(raw.encode("utf-8"))
        text, header, footer = strip_gutenberg(raw)
        if header:
            stats.drop("gutenberg_header_stripped")
        if footer:
            stats.drop("gutenberg_footer_stripped")
        words = _words(text)
        if not words:
            stats.drop("empty")
            continue
        if len(words) < opts.min_words:
            stats.drop("too_short")
            continue
        if not opts.dedup or len(words) < k:
            kept.append((order, path, 0, None))
            continue
        uniq = sorted_unique(shingle_hashes(words, k))
        mh = MinHash(num_perm=opts.num_perm, scheme="affine64", hashfunc=int)
        for start in range(0, len(uniq), 4096):
            mh.update_batch(uniq[start : start + 4096].tolist())
        kept.append((order, path, len(uniq), mh))

    # Near-duplicates: candidates by LSH Ensemble containment, exact word overlap check.
    dropped: set[Path] = set()
    signed = [b for b in kept if b[3] is not None]
    if opts.dedup and len(signed) > 1:
        threshold = max(0.05, opts.overlap**k - 0.1)
        lsh = MinHashLSHEnsemble(threshold=threshold, num_perm=opts.num_perm, num_part=8)
        lsh.index((b[1], b[3], b[2]) for b in signed)
        rank = {b[1]: i for i, b in enumerate(sorted(signed, key=lambda b: (-b[2], b[0])))}
        cache = _BookCache(k)
        for book in sorted(signed, key=lambda b: rank[b[1]]):
            path = book[1]
            candidates = [
                c
                for c in lsh.query(book[3], book[2])
                if c != path and c not in dropped and rank[c] < rank[path]
            ]
            if not candidates:
                continue
            mine = cache.get(path)
            if mine is None:
                continue
            for other in sorted(candidates, key=lambda c: rank[c]):
                theirs = cache.get(other)
                if theirs is not None and word_overlap(mine[0], theirs[1], k) >= opts.overlap:
                    dropped.add(path)
                    stats.drop("near_duplicate")
                    break

    # Pass 2: yield the kept books in input order.
    for _, path, _, _ in kept:
        if path in dropped:
            continue
        text = _clean_quiet(path)
        if text is None:
            continue
        stats.documents_out += 1
        stats.bytes_out += len(text.encode("utf-8"))
        yield text
