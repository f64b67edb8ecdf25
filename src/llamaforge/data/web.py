"""Web pages: the paper's English CommonCrawl (CCNet pipeline) and C4 preprocessing.

Kind ``web`` reads ``.html``/``.htm`` files (one page each), ``.txt`` files (documents split
by ``txt_split``: blank-line blocks by default, so a file without blank lines, such as a
one-sentence-per-line sample, is one document) and ``.jsonl``/``.json`` files (field
``text_field`` of each line). HTML is turned into text by data/html.py (``style="page"``,
on the standard library's ``html.parser``): ``<script>``, ``<style>``, ``<noscript>``,
``<nav>``, ``<header>``, ``<footer>``, ``<aside>``, ``<form>`` (and ``<head>``,
``<template>``, ``<svg>``) are dropped, and so is any element whose ``class``/``id`` looks
like navigation (``nav*``, ``*menu``, ``sidebar``, ``cookie*``, ``*footer``, ``breadcrumb``,
``toc``...) or whose ``role`` is ``navigation``/``banner``/``contentinfo``; block elements
become line breaks.

Then, in the CCNet order, each step optional and counted in ``stats.removed``:

1. line-level dedup (``dedup_lines``): a line whose normalised form (lowercase, digits → 0,
   punctuation removed, whitespace collapsed) was already seen in this source — earlier in
   the same document or in an earlier one, in reading order — is removed
   (``duplicate_line``, counted per line); a document left empty is ``empty``;
2. language identification with ``langid`` (probabilities normalised): pages whose language
   is not in ``languages`` or whose probability is below ``min_lang_score`` are dropped
   (``language``); ``languages=[]`` turns it off;
3. ``quality``:

   * ``"ccnet"`` (default) needs ``reference_paths`` (e.g. WikiText files; text files with one
     reference paragraph per line by default, ``reference_split``; WikiText headings and
     ``@-@`` marks are undone). (a) A word n-gram language model with interpolated
     Kneser-Ney smoothing (:class:`KneserNeyLM`, ``lm_order``) is trained on the reference;
     a page whose perplexity is above the threshold is dropped (``perplexity``). The
     threshold is ``max_perplexity`` when given; otherwise the ``perplexity_quantile``
     quantile of the perplexities of held-out reference paragraphs (every 10th, which the
     model is not trained on) times ``perplexity_margin``. (b) A logistic regression on
     hashed word 1-2-gram features (scikit-learn ``HashingVectorizer``) separates reference
     paragraphs (positives) from random web pages (negatives: the files of
     ``negative_paths``, text files split by ``negative_split``, or by default the input
     pages themselves, scored out-of-fold so that a page is never scored by a model that
     saw it as a negative; that needs many pages to mean anything); pages with
     P(reference) < ``min_reference_prob`` are dropped (``classifier``). Classes are
     weighted to balance. Step (b) keeps all pages in memory.
   * ``"c4"``: C4's heuristics: pages containing "lorem ipsum" (``c4_lorem_ipsum``) or a
     curly brace (``c4_curly_brace``) are dropped; lines are kept only if they end in
     terminal punctuation (``c4_line_no_terminal_punct``), have at least ``c4_min_words``
     words (``c4_line_short``), do not mention javascript (``c4_line_javascript``) and are
     not cookie / terms-of-use / privacy-policy boilerplate (``c4_line_policy``); pages left
     with fewer than ``c4_min_sentences`` sentences are dropped (``c4_few_sentences``).
   * ``"none"``: no quality filter.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llamaforge.data.base import DataError, FilterStats, expand_paths, parse_options, read_text
from llamaforge.data.generic import iter_json_file, split_blocks
from llamaforge.data.html import html_to_text

log = logging.getLogger("llamaforge.data")

# ----------------------------------------------------------------------------- line dedup

_PUNCT = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")
_DIGIT = re.compile(r"\d")


def normalize_line(line: str) -> str:
    """CCNet's line normalisation: lowercase, digits → 0, punctuation removed, spaces collapsed."""
    line = _DIGIT.sub("0", line.lower())
    return _SPACES.sub(" ", _PUNCT.sub(" ", line)).strip()


def line_hash(line: str) -> bytes:
    return hashlib.blake2b(normalize_line(line).encode("utf-8"), digest_size=8).digest()


class LineDeduper:
    """Removes lines already seen (by normalised hash) from the documents it is given."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, text: str) -> tuple[str, int]:
        kept, removed = [], 0
        for line in text.split("\n"):
            norm = normalize_line(line)
            if not norm:  # punctuation-only lines carry no identity: keep them
                kept.append(line)
                continue
            h = hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest()
            if h in self.seen:
                removed += 1
                continue
            self.seen.add(h)
            kept.append(line)
        return "\n".join(kept), removed


# ----------------------------------------------------------------------------- language id

_LANGID: Any = None


def language_identifier() -> Any:
    """langid's identifier with normalised probabilities (loaded once, lazily)."""
    global _LANGID
    if _LANGID is None:
        from langid.langid import LanguageIdentifier, model

        _LANGID = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _LANGID


def identify_language(text: str) -> tuple[str, float]:
    lang, prob = language_identifier().classify(text)
    return str(lang), float(prob)


# ----------------------------------------------------------------------------- n-gram LM

_TOKEN = re.compile(r"<unk>|[^\W\d_]+(?:'[^\W\d_]+)?|\d+|[^\w\s]")
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def lm_tokenize(text: str) -> list[list[str]]:
    """Sentences (one per non-empty line) of lowercase word tokens, digits mapped to 0."""
    out = []
    for line in text.split("\n"):
        toks = [_DIGIT.sub("0", t) for t in _TOKEN.findall(line.lower())]
        if toks:
            out.append(toks)
    return out


class KneserNeyLM:
    """A word n-gram language model with interpolated (modified-discount-free) Kneser-Ney
    smoothing: the highest order uses counts, lower orders continuation counts, one absolute
    discount per order estimated as n1 / (n1 + 2 n2), and the base is uniform over the
    vocabulary. Words seen fewer than ``min_count`` times become ``<unk>``."""

    def __init__(self, order: int = 3, min_count: int = 2) -> None:
        if order < 1:
            raise DataError(f"n-gram order must be >= 1, got {order}")
        self.order = order
        self.min_count = min_count
        self.vocab: set[str] = set()
        self.counts: list[dict[tuple[str, ...], int]] = []
        self.ctx_total: list[dict[tuple[str, ...], int]] = []
        self.ctx_types: list[dict[tuple[str, ...], int]] = []
        self.discount: list[float] = []

    def _map(self, toks: list[str]) -> list[str]:
        return [t if t in self.vocab else UNK for t in toks]

    def fit(self, documents: Iterable[str]) -> KneserNeyLM:
        sentences = [s for doc in documents for s in lm_tokenize(doc)]
        freq = Counter(t for s in sentences for t in s)
        self.vocab = {t for t, c in freq.items() if c >= self.min_count} | {UNK, EOS}
        n = self.order
        top: dict[tuple[str, ...], int] = defaultdict(int)
        for s in sentences:
            seq = [BOS] * (n - 1) + self._map(s) + [EOS]
            for i in range(n - 1, len(seq)):
                top[tuple(seq[i - n + 1 : i + 1])] += 1
        counts: list[dict[tuple[str, ...], int]] = [dict() for _ in range(n + 1)]
        counts[n] = dict(top)
        for k in range(n - 1, 0, -1):  # continuation counts N1+(. w_k)
            cont: dict[tuple[str, ...], int] = defaultdict(int)
            for gram in counts[k + 1]:
                cont[gram[1:]] += 1
            counts[k] = dict(cont)
        self.counts = counts
        self.ctx_total = [dict() for _ in range(n + 1)]
        self.ctx_types = [dict() for _ in range(n + 1)]
        self.discount = [0.0] * (n + 1)
        for k in range(1, n + 1):
            total: dict[tuple[str, ...], int] = defaultdict(int)
            types: dict[tuple[str, ...], int] = defaultdict(int)
            coc = Counter()
            for gram, c in counts[k].items():
                total[gram[:-1]] += c
                types[gram[:-1]] += 1
                if c <= 2:
                    coc[c] += 1
            self.ctx_total[k] = dict(total)
            self.ctx_types[k] = dict(types)
            n1, n2 = coc[1], coc[2]
            d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.75
            self.discount[k] = min(max(d, 0.1), 0.95)
        return self

    def prob(self, word: str, context: tuple[str, ...]) -> float:
        """P(word | last order-1 words of context), ``word`` already in the vocabulary."""
        p = 1.0 / len(self.vocab)
        for k in range(1, self.order + 1):
            ctx = context[len(context) - k + 1 :] if k > 1 else ()
            if k > 1 and len(ctx) < k - 1:
                break
            total = self.ctx_total[k].get(ctx)
            if not total:
                continue  # unseen context: this order backs off entirely
            d = self.discount[k]
            c = self.counts[k].get((*ctx, word), 0)
            p = max(c - d, 0.0) / total + d * self.ctx_types[k][ctx] / total * p
        return p

    def log_prob(self, text: str) -> tuple[float, int]:
        """Natural-log probability of ``text`` and its number of predicted tokens."""
        if not self.counts:
            raise RuntimeError("KneserNeyLM.fit must be called first")
        n = self.order
        logp, count = 0.0, 0
        for s in lm_tokenize(text):
            seq = [BOS] * (n - 1) + self._map(s) + [EOS]
            for i in range(n - 1, len(seq)):
                logp += math.log(self.prob(seq[i], tuple(seq[i - n + 1 : i])))
                count += 1
        return logp, count

    def perplexity(self, text: str) -> float:
        """exp(-mean log-probability per token); ``inf`` for a text without tokens."""
        logp, count = self.log_prob(text)
        return math.exp(-logp / count) if count else math.inf


# ----------------------------------------------------------------------------- reference

_WIKI_HEADING = re.compile(r"^\s*=( =)*\s.*\s=( =)*\s*$")
_WIKI_AT = re.compile(r" @(.)@ ")


def clean_reference_text(text: str) -> str:
    """Undo WikiText markup: heading lines removed, `` @-@ `` → ``-`` (plain text unchanged)."""
    lines = (ln for ln in text.split("\n") if not _WIKI_HEADING.match(ln))
    return _WIKI_AT.sub(r"\1", "\n".join(lines))


def read_reference(paths: list[Path], split: str, min_words: int = 10) -> list[str]:
    """Reference documents (with at least ``min_words`` words) of text or JSON-lines files."""
    rstats = FilterStats()
    docs: list[str] = []
    for path in paths:
        if path.suffix.lower() in (".jsonl", ".json"):
            texts: Iterable[str] = iter_json_file(path, "text", rstats)
        else:
            raw = read_text(path, rstats)
            if raw is None:
                continue
            cleaned = clean_reference_text(raw)
            if split == "line":
                texts = cleaned.split("\n")
            elif split == "paragraph":
                texts = split_blocks(cleaned)
            else:
                texts = [cleaned]
        docs.extend(t.strip() for t in texts if len(t.split()) >= min_words)
    for err in rstats.errors:
        log.warning("reference corpus: %s", err)
    if not docs:
        raise DataError(
            f"web: the reference corpus {[str(p) for p in paths]} has no usable document"
            + (f" ({'; '.join(rstats.errors)})" if rstats.errors else "")
        )
    return docs


@dataclass
class ReferenceModel:
    """The n-gram LM of a reference corpus and what the filters need from it."""

    lm: KneserNeyLM
    train_docs: list[str]
    heldout_perplexities: list[float]

    def perplexity_threshold(self, quantile: float, margin: float) -> float:
        ppl = sorted(self.heldout_perplexities)
        idx = min(len(ppl) - 1, max(0, round(quantile * (len(ppl) - 1))))
        return ppl[idx] * margin


_REFERENCE_CACHE: dict[tuple[Any, ...], ReferenceModel] = {}


def reference_model(
    paths: list[Path], split: str = "line", order: int = 3, min_count: int = 2
) -> ReferenceModel:
    """Train (or reuse, per process) the reference LM: every 10th document is held out to
    measure the reference's own perplexity distribution."""
    key = (
        tuple((str(p.resolve()), p.stat().st_mtime_ns) for p in paths),
        split,
        order,
        min_count,
    )
    if key not in _REFERENCE_CACHE:
        docs = read_reference(paths, split)
        heldout = docs[9::10]
        train = [d for i, d in enumerate(docs) if i % 10 != 9] or docs
        lm = KneserNeyLM(order, min_count).fit(train)
        ppls = [lm.perplexity(d) for d in heldout] or [lm.perplexity(d) for d in train[:100]]
        _REFERENCE_CACHE[key] = ReferenceModel(lm, train, ppls)
    return _REFERENCE_CACHE[key]


# ----------------------------------------------------------------------------- classifier


def reference_probabilities(
    candidates: list[str],
    positives: list[str],
    negatives: list[str] | None = None,
    *,
    folds: int = 5,
    seed: int = 0,
) -> list[float]:
    """P(reference) of each candidate page from a logistic regression on hashed word 1-2-gram
    features, positives = reference documents, negatives = ``negatives`` or, when None, the
    candidates themselves (then each candidate is scored by a model trained without it)."""
    import numpy as np
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = HashingVectorizer(n_features=2**18, ngram_range=(1, 2), alternate_sign=False, norm="l2")
    xpos = vec.transform(positives)
    xcand = vec.transform(candidates)

    def fit(xneg: Any) -> Any:
        import scipy.sparse as sp

        x = sp.vstack([xpos, xneg])
        y = np.r_[np.ones(xpos.shape[0]), np.zeros(xneg.shape[0])]
        clf = LogisticRegression(C=1.0, class_weight="balanced", solver="liblinear", max_iter=1000)
        return clf.fit(x, y)

    if negatives is not None:
        clf = fit(vec.transform(negatives))
        return [float(p) for p in clf.predict_proba(xcand)[:, 1]]
    n = len(candidates)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(2, min(folds, n))
    probs = [0.0] * n
    for f in range(k):
        held = order[f::k]
        rest = sorted(set(order) - set(held))
        clf = fit(xcand[rest])
        for i, p in zip(held, clf.predict_proba(xcand[held])[:, 1]):
            probs[i] = float(p)
    return probs


# ----------------------------------------------------------------------------- C4

_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019")
_POLICY = re.compile(
    r"terms of use|terms of service|privacy policy|cookie policy|uses cookies|use of cookies"
    r"|use cookies|accept cookies|cookie settings",
    re.I,
)
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019]?(?=\s|$)")


def c4_clean(text: str, stats: FilterStats, min_words: int = 3, min_sentences: int = 5) -> str:
    """C4's heuristic cleaning of one page; returns "" (counted) when the page is dropped."""
    low = text.lower()
    if "lorem ipsum" in low:
        stats.drop("c4_lorem_ipsum")
        return ""
    if "{" in text:
        stats.drop("c4_curly_brace")
        return ""
    kept = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        if not line.endswith(_TERMINAL):
            stats.drop("c4_line_no_terminal_punct")
        elif len(line.split()) < min_words:
            stats.drop("c4_line_short")
        elif "javascript" in line.lower():
            stats.drop("c4_line_javascript")
        elif _POLICY.search(line):
            stats.drop("c4_line_policy")
        else:
            kept.append(line)
    out = "\n".join(kept)
    if len(_SENTENCE_END.findall(out)) < min_sentences:
        stats.drop("c4_few_sentences")
        return ""
    return out


# ----------------------------------------------------------------------------- kind


@dataclass
class WebOptions:
    """Options of kind ``web`` (see the module doc)."""

    quality: Literal["ccnet", "c4", "none"] = "ccnet"
    txt_split: Literal["file", "paragraph", "line"] = "paragraph"
    text_field: str = "text"
    dedup_lines: bool = True
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_lang_score: float = 0.5
    # CCNet
    reference_paths: list[str] | None = None
    reference_split: Literal["file", "paragraph", "line"] = "line"
    lm_order: int = 3
    lm_min_count: int = 2
    max_perplexity: float | None = None
    perplexity_quantile: float = 0.95
    perplexity_margin: float = 1.5
    classifier: bool = True
    min_reference_prob: float = 0.5
    negative_paths: list[str] | None = None
    negative_split: Literal["file", "paragraph", "line"] = "paragraph"
    max_reference_docs: int = 3000
    seed: int = 0
    # MinHash near-duplicate removal after the filters (FineWeb's parameters); runs on the
    # datatrove executor only ([executor] tasks >= 1; data/pipeline.py)
    minhash: bool = False
    minhash_ngrams: int = 5
    minhash_buckets: int = 14
    minhash_hashes_per_bucket: int = 8
    # C4
    c4_min_words: int = 3
    c4_min_sentences: int = 5


def iter_web_pages(
    paths: Iterable[Path], opts: WebOptions, stats: FilterStats, txt_split: str | None = None
) -> Iterator[tuple[str, int]]:
    """(text, raw byte size) of every page of the input files; unreadable files reported."""
    for path in paths:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            for rec in iter_json_file(path, opts.text_field, stats):
                yield rec, len(rec.encode("utf-8"))
            continue
        raw = read_text(path, stats)
        if raw is None:
            continue
        if not raw.strip():
            stats.error(path, "empty file")
            continue
        if suffix in (".html", ".htm", ".xhtml"):
            try:
                yield html_to_text(raw), len(raw.encode("utf-8"))
            except Exception as e:  # html.parser is lenient; be safe for one bad page
                stats.error(path, f"cannot parse HTML ({e})")
            continue
        split = txt_split or opts.txt_split
        if split == "file":
            blocks = [raw]
        elif split == "line":
            blocks = raw.split("\n")
        else:
            blocks = split_blocks(raw)
        for block in blocks:
            yield block, len(block.encode("utf-8"))


def _check(opts: WebOptions) -> None:
    if not 0.0 <= opts.min_lang_score <= 1.0:
        raise DataError(
            f"web: option 'min_lang_score' must be in [0, 1], got {opts.min_lang_score}"
        )
    if not 0.0 < opts.perplexity_quantile <= 1.0:
        raise DataError(
            f"web: option 'perplexity_quantile' must be in (0, 1], got {opts.perplexity_quantile}"
        )
    if not 0.0 <= opts.min_reference_prob <= 1.0:
        raise DataError(
            f"web: option 'min_reference_prob' must be in [0, 1], got {opts.min_reference_prob}"
        )
    if opts.lm_order < 1:
        raise DataError(f"web: option 'lm_order' must be >= 1, got {opts.lm_order}")
    if opts.quality == "ccnet" and not opts.reference_paths:
        raise DataError(
            "web: quality='ccnet' needs a reference corpus: set option 'reference_paths' "
            "(e.g. the WikiText files) for the n-gram LM and the reference classifier, "
            "or use quality='c4' or 'none'"
        )


def read_web(paths: list[Path], options: dict[str, Any], stats: FilterStats) -> Iterator[str]:
    """Cleaned documents of web pages: HTML → text, line dedup, langid, CCNet or C4 quality."""
    opts = web_options(options)
    if opts.minhash:
        raise DataError(
            "web: option 'minhash' runs as datatrove stages: set [executor] tasks = 1 (or "
            "more) in the data config, or --tasks 1"
        )
    dedup = LineDeduper() if opts.dedup_lines else None

    def pages() -> Iterator[str]:
        for text, size in iter_web_pages(paths, opts, stats):
            stats.documents_in += 1
            stats.bytes_in += size
            if dedup is not None:
                text, removed = dedup(text)
                if removed:
                    stats.drop("duplicate_line", removed)
            yield text

    yield from filter_web(pages(), opts, stats)


def web_options(options: dict[str, Any]) -> WebOptions:
    """The checked options of kind ``web``."""
    opts = parse_options(WebOptions, options, "web")
    _check(opts)
    return opts


def filter_web(pages: Iterable[str], opts: WebOptions, stats: FilterStats) -> Iterator[str]:
    """The steps after line dedup (language, quality, classifier) on ``pages``, the texts
    already line-deduplicated (read_web, or the distributed line-dedup stages)."""
    ref: ReferenceModel | None = None
    threshold = math.inf
    if opts.quality == "ccnet":
        assert opts.reference_paths is not None
        ref_paths = expand_paths(opts.reference_paths)
        ref = reference_model(ref_paths, opts.reference_split, opts.lm_order, opts.lm_min_count)
        threshold = (
            opts.max_perplexity
            if opts.max_perplexity is not None
            else ref.perplexity_threshold(opts.perplexity_quantile, opts.perplexity_margin)
        )
        log.info("web: perplexity threshold %.1f", threshold)
    languages = set(opts.languages)

    def first_stages() -> Iterator[str]:
        for text in pages:
            text = text.strip()
            if not text:
                stats.drop("empty")
                continue
            if languages:
                lang, prob = identify_language(text)
                if lang not in languages or prob < opts.min_lang_score:
                    stats.drop("language")
                    continue
            if opts.quality == "c4":
                text = c4_clean(text, stats, opts.c4_min_words, opts.c4_min_sentences)
                if not text:
                    continue
            elif ref is not None and ref.lm.perplexity(text) > threshold:
                stats.drop("perplexity")
                continue
            yield text

    def emit(docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            stats.documents_out += 1
            stats.bytes_out += len(doc.encode("utf-8"))
            yield doc

    if ref is None or not opts.classifier:
        yield from emit(first_stages())
        return
    pages = list(first_stages())
    if not pages:
        return
    positives = list(ref.train_docs)
    if len(positives) > opts.max_reference_docs:
        positives = random.Random(opts.seed).sample(positives, opts.max_reference_docs)
    negatives: list[str] | None = None
    if opts.negative_paths:
        neg_stats = FilterStats()
        negatives = [
            t
            for t, _ in iter_web_pages(
                expand_paths(opts.negative_paths), opts, neg_stats, opts.negative_split
            )
        ]
        negatives = [t for t in negatives if t.strip()]
        if not negatives:
            raise DataError(f"web: 'negative_paths' {opts.negative_paths} gave no document")
    elif len(pages) < 2:
        log.warning("web: classifier skipped: one page and no 'negative_paths' to train on")
        yield from emit(pages)
        return
    elif len(pages) < 50:
        log.warning(
            "web: only %d pages as the classifier's negatives; set 'negative_paths' to a "
            "sample of random web pages for a meaningful reference classifier",
            len(pages),
        )
    probs = reference_probabilities(pages, positives, negatives, seed=opts.seed)
    kept = []
    for page, p in zip(pages, probs):
        if p < opts.min_reference_prob:
            stats.drop("classifier")
        else:
            kept.append(page)
    yield from emit(kept)
