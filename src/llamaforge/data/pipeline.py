"""``llamaforge data prepare`` on datatrove: each source as multi-task pipeline stages.

With ``[executor] tasks = N`` (N >= 1) a source is prepared by datatrove executors (local
processes, Slurm job arrays or Ray tasks) instead of the in-process path of prepare.py. The
cleaners are the same functions; they run as datatrove ``PipelineStep`` s:

* **units and tasks.** A source's files are grouped into units that a kind cannot split (an
  arXiv paper's folder, a saved ``datasets`` folder; otherwise one file; a web JSON-lines or
  line-split text file larger than ``split_bytes`` becomes byte ranges of whole lines) and
  the units, in
  the sorted order of the in-process path, are cut into ``tasks`` *contiguous* runs of about
  equal bytes. Task t's documents therefore come before task t+1's, and concatenating the
  tasks' outputs in task order gives the documents of a one-task run in the same order.
* **stages.** Kinds without cross-document state run one stage:
  ``SourceReader → TokenizeStep → ShardWriter``. Kinds whose dedup spans documents run the
  dedup as signature → bucket → filter stages, each task holding only its share:

  - ``web`` (``dedup_lines``, CCNet line dedup): ``read`` writes each task's pages and a
    64-bit hash per normalised line into min(tasks, 256) hash-bucket files; ``lines`` (one task per
    bucket) keeps, of each hash, the first occurrence in reading order (task, document,
    line) and lists the others per reading task; ``tokenize`` drops those lines, then runs
    the language / quality / classifier filters (web.filter_web) and tokenizes. The CCNet
    classifier trained on the input pages themselves (no ``negative_paths``) needs every
    page: that source's ``tokenize`` stage runs as one task.
  - ``code`` (``dedup``, exact file dedup): the same with one hash per document.
  - ``books`` (``dedup``, 90 % book-level overlap): ``read`` writes the cleaned books and
    their MinHash signatures; ``clusters`` (one task, signatures only in memory; books are
    re-read one pair at a time for the exact overlap check) applies books.py's rule;
    ``tokenize`` drops the near-duplicates.
  - ``web`` with ``minhash = true``: after the filters, ``filter`` stores the pages and
    their MinHash signatures (datatrove's signature stage, FineWeb's parameters),
    ``minhash-buckets`` (datatrove's bucket stage) pairs the candidates, ``minhash-clusters``
    keeps the first page of each connected cluster in reading order, ``tokenize`` drops the
    rest.
* **executors.** ``local``: datatrove's local executor with one forked process a task (a
  task that raises or dies is named; the others run on); ``slurm``: one job array a stage,
  chained with ``afterok`` (or only the scripts, ``submit = false``); ``ray``: datatrove's
  Ray executor on an existing or a new one-machine cluster.
* **output.** Each tokenize task writes its own shards ``train-TTTTT-NNNNN.bin`` /
  ``val-TTTTT-NNNNN.bin`` and, last, ``work/task-TTTTT.json``; the ``finalize`` stage writes
  ``meta.json`` listing every task's shards in task order, only once every task is complete.
  The validation split is a hash of each document, so documents, tokens and the validation
  set do not depend on the number of tasks (only where shard files begin).
* **resume.** datatrove marks a finished task in ``<logging_dir>/<source>/<stage>/
  completions``; a rerun runs only unfinished tasks. A config or task-count change starts
  the source afresh (``work/plan.json``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import wait as wait_sentinels
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llamaforge.data.base import DataError, FilterStats, decoding
from llamaforge.data.config import (
    DataConfig,
    ExecutorConfig,
    SourceConfig,
    source_fingerprint,
    source_paths,
)
from llamaforge.data.shards import (
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    ShardWriter,
    is_val,
    read_meta,
    token_dtype,
)
from llamaforge.files import atomic_open, atomic_write

if TYPE_CHECKING:
    from llamaforge.data.books import BooksOptions

WORK = "work"
PLAN = "plan.json"


# ----------------------------------------------------------------------------- the plan


@dataclass
class SourceJob:
    """Everything a task of one source needs (pickled to Slurm/Ray workers)."""

    cfg: DataConfig
    src: SourceConfig
    tokenizer: str
    out: str  # OUTPUT/<name>
    tasks: int
    units: list[list[str]]
    bounds: list[int]  # task t reads units[bounds[t]:bounds[t+1]]
    dedup: str  # "", "lines", "docs", "books"
    tokenize_tasks: int
    files: int = 0
    minhash: bool = False  # web: MinHash near-duplicate stages after the filters

    @property
    def buckets(self) -> int:
        """Hash buckets (and tasks) of the line / file dedup stage."""
        return min(self.tasks, MAX_BUCKETS)

    @property
    def work(self) -> Path:
        return Path(self.out) / WORK

    def task_paths(self, t: int) -> list[Path]:
        return [Path(p) for u in self.units[self.bounds[t] : self.bounds[t + 1]] for p in u]

    def read_range(self, j: int) -> range:
        """The reading tasks whose documents tokenize task ``j`` takes."""
        n, k = self.tasks, self.tokenize_tasks
        return range(j * n // k, (j + 1) * n // k)


def plan_units(kind: str, options: dict[str, Any], paths: list[Path]) -> list[list[str]]:
    """A kind's indivisible groups of files, in reading order."""
    if kind == "arxiv":
        from llamaforge.data.arxiv import _group_papers

        per_file = bool(options.get("paper_per_file", False))
        return [[str(p) for p in g] for g in _group_papers(paths, per_file) if g]
    if kind == "generic":
        from llamaforge.data.generic import is_saved_dataset_dir

        units: list[list[str]] = []
        last: Path | None = None
        for p in paths:
            folder = p if p.is_dir() else p.parent
            if is_saved_dataset_dir(folder):
                if folder == last:
                    units[-1].append(str(p))
                    continue
                last = folder
            else:
                last = None
            units.append([str(p)])
        return units
    if not paths:
        return [[]]
    return [[str(p)] for p in paths]


RANGE_SEP = "\x00"  # "path<NUL>start<NUL>end": bytes [start, end) of a file, as whole lines


def web_range_units(
    paths: list[Path], options: dict[str, Any], split_bytes: int
) -> list[list[str]]:
    """Kind ``web``'s units: one a file, except that JSON-lines files and line-split text
    files larger than ``split_bytes`` become byte ranges of about ``split_bytes`` (cut at
    line ends when read), so that one large file spreads over several tasks."""
    units = []
    line_txt = options.get("txt_split", "paragraph") == "line"
    for p in paths:
        size = _size(str(p))
        suffix = p.suffix.lower()
        splittable = suffix in (".jsonl", ".ndjson") or (
            line_txt and suffix not in (".html", ".htm", ".xhtml", ".json")
        )
        if split_bytes <= 0 or size <= split_bytes or not splittable:
            units.append([str(p)])
            continue
        n = -(-size // split_bytes)
        cuts = [size * i // n for i in range(n + 1)]
        units += [[f"{p}{RANGE_SEP}{a}{RANGE_SEP}{b}"] for a, b in zip(cuts, cuts[1:])]
    return units


def read_line_range(path: Path, start: int, end: int) -> tuple[bytes, bool]:
    """The whole lines of ``path`` that begin in bytes [start, end), and whether they run
    to the end of the file."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line that began before ``start``
        pos = f.tell()
        if pos >= end:
            return b"", False
        data = f.read(end - pos)
        if data and not data.endswith(b"\n"):
            data += f.readline()
        at_eof = f.read(1) == b""
    return data, at_eof


def iter_web_units(units: list[str], opts: Any, stats: FilterStats) -> Iterator[tuple[str, int]]:
    """web.iter_web_pages over files and byte ranges; a range gives the pages the whole
    file would (each range's bytes are decoded as read_text decodes a file)."""
    from llamaforge.data.base import decode_errors, decode_replace
    from llamaforge.data.generic import json_lines
    from llamaforge.data.web import iter_web_pages

    for unit in units:
        if RANGE_SEP not in unit:
            yield from iter_web_pages([Path(unit)], opts, stats)
            continue
        name, a, b = unit.split(RANGE_SEP)
        path, start, end = Path(name), int(a), int(b)
        where = f"{path} (bytes {start}-{end})"
        try:
            with open(path, "rb") as f:
                head = f.read(8192)
            data, at_eof = read_line_range(path, start, end)
        except OSError as e:
            stats.error(where, f"cannot read ({e.strerror or e})")
            continue
        if b"\x00" in head:
            if start == 0:
                stats.error(path, "binary file (NUL bytes), expected UTF-8 text")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            if decode_errors.get() != "replace":
                stats.error(where, f"invalid UTF-8 at byte {start + e.start} of the file")
                continue
            text, replaced = decode_replace(data)
            stats.replaced_bytes += replaced
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            line_of = partial("{}, line {}".format, where)
            for value in json_lines(text, opts.text_field, stats, line_of):
                yield value, len(value.encode("utf-8"))
            continue
        lines = text.split("\n")
        if not at_eof:
            lines.pop()  # the empty string after the range's last newline
        for line in lines:
            yield line, len(line.encode("utf-8"))


def split_units(units: list[list[str]], tasks: int) -> list[int]:
    """Boundaries cutting ``units`` into ``tasks`` contiguous runs of about equal bytes."""
    sizes = [sum(_size(p) for p in u) or 1 for u in units]
    total = sum(sizes)
    bounds = [0] * (tasks + 1)
    start = 0
    owner = []
    for s in sizes:
        owner.append(min(tasks - 1, start * tasks // max(total, 1)))
        start += s
    for t in range(tasks + 1):
        bounds[t] = sum(1 for o in owner if o < t)
    return bounds


def _size(path: str) -> int:
    if RANGE_SEP in path:
        _, a, b = path.split(RANGE_SEP)
        return int(b) - int(a)
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def dedup_mode(src: SourceConfig) -> str:
    opts = src.options
    if src.kind == "web" and (opts.get("dedup_lines", True) or opts.get("minhash", False)):
        return "lines"
    if src.kind == "code" and opts.get("dedup", True):
        return "docs"
    if src.kind == "books" and opts.get("dedup", True):
        return "books"
    return ""


def _global_classifier(src: SourceConfig) -> bool:
    o = src.options
    return (
        src.kind == "web"
        and o.get("quality", "ccnet") == "ccnet"
        and o.get("classifier", True)
        and not o.get("negative_paths")
    )


# ----------------------------------------------------------------------------- task files


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def _task_stats_path(job: SourceJob, stage: str, t: int) -> Path:
    return job.work / f"stats-{stage}-{t:05d}.json"


def _save_stats(job: SourceJob, stage: str, t: int, stats: FilterStats, t0: float) -> None:
    data = stats.to_dict()
    data["peak_rss_mb"] = _peak_rss_mb()
    data["seconds"] = round(time.time() - t0, 3)
    _write_json(_task_stats_path(job, stage, t), data)


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out = FilterStats()
    replaced = 0
    for p in parts:
        out.documents_in += p["documents_in"]
        out.documents_out += p["documents_out"]
        out.bytes_in += p["bytes_in"]
        out.bytes_out += p["bytes_out"]
        out.removed.update(Counter(p["removed"]))
        out.errors += p["errors"]
        replaced += p.get("replaced_bytes", 0)
    out.replaced_bytes = replaced
    return out.to_dict()


# ----------------------------------------------------------------------------- steps


def _make_steps() -> dict[str, type]:
    """The PipelineStep classes by name (built on first use: datatrove imports only when
    needed)."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    classes = (
        *_read_steps(),
        *_dedup_steps(),
        *_web_steps(),
        MinhashDedupBuckets,
        *_output_steps(),
    )
    return {c.__name__: c for c in classes}


def _read_steps() -> tuple[type, ...]:
    """The ``read`` stage's steps (SourceReader is a one-stage kind's reader too):
    SourceReader, DocStore."""
    from datatrove.data import Document
    from datatrove.pipeline.base import PipelineStep

    class SourceReader(PipelineStep):
        """A task's units through its kind's reader and cleaners (one-stage kinds), or the
        raw documents before the cross-document dedup (``read`` stage)."""

        name = "🦙 source reader"
        type = "📖 - READER"

        def __init__(self, job: SourceJob, stats: FilterStats, raw: bool) -> None:
            super().__init__()
            self.job, self.fstats, self.raw = job, stats, raw

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            from llamaforge.data.sources import source_fn

            job, src = self.job, self.job.src
            paths = job.task_paths(rank)
            options = dict(src.options)
            with decoding(src.errors):
                if src.kind == "web":
                    docs = _web_task_pages(job, rank, self.fstats, self.raw)
                else:
                    if self.raw:
                        options["dedup"] = False
                    if not paths:
                        return  # every unit is some task's, once: none here
                    docs = source_fn(src.kind, f"source {src.name}")(paths, options, self.fstats)
                for i, text in enumerate(docs):
                    self.stat_update("documents")
                    yield Document(text=text, id=f"{rank:05d}/{i}")

    class DocStore(PipelineStep):
        """``read`` stage: the task's documents to ``work/read-TTTTT.jsonl`` and their dedup
        signatures (line or document hashes into hash buckets; book MinHashes). With
        ``sigs = False`` (the MinHash ``filter`` stage) the documents go on instead."""

        name = "🦙 documents + signatures"
        type = "🫂 - DEDUP"

        def __init__(
            self, job: SourceJob, stats: FilterStats, stage: str = "read", sigs: bool = True
        ) -> None:
            super().__init__()
            self.job, self.fstats, self.stage, self.sigs = job, stats, stage, sigs

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            job, t0 = self.job, time.time()
            sigs = _TaskSignatures(job, rank) if self.sigs else None
            with atomic_open(job.work / f"{self.stage}-{rank:05d}.jsonl", "wb") as f:
                for i, doc in enumerate(data or ()):
                    offset = f.tell()
                    f.write(json.dumps({"text": doc.text}, ensure_ascii=False).encode() + b"\n")
                    if sigs is None:
                        yield doc  # on to the MinHash signatures
                    else:
                        sigs.add(i, offset, doc.text)
            if sigs is not None:
                sigs.close()
            _save_stats(job, self.stage, rank, self.fstats, t0)

    return SourceReader, DocStore


def _dedup_steps() -> tuple[type, ...]:
    """The line / file dedup (FindDuplicates) and book dedup (BookClusters) stages' steps,
    and DedupFilter, which drops what they (or MinhashClusters) found."""
    from datatrove.data import Document
    from datatrove.pipeline.base import PipelineStep

    class FindDuplicates(PipelineStep):
        """``lines`` stage, task b: of each hash of bucket b, every occurrence after the
        first (in reading order) is a duplicate; lists them per reading task."""

        name = "🦙 duplicate finder"
        type = "🫂 - DEDUP"

        def __init__(self, job: SourceJob) -> None:
            super().__init__()
            self.job = job

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            self.stat_update("duplicates", value=_find_duplicates(self.job, rank))
            return
            yield

    class BookClusters(PipelineStep):
        """``clusters`` stage (one task): books.py's near-duplicate rule over every task's
        signatures; writes the dropped books' (task, document) pairs."""

        name = "🦙 book near-duplicates"
        type = "🫂 - DEDUP"

        def __init__(self, job: SourceJob) -> None:
            super().__init__()
            self.job = job

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            dropped = _book_clusters(self.job)
            self.stat_update("near_duplicates", value=len(dropped))
            arr = np.array(sorted(dropped), dtype=np.int64).reshape(-1, 2)
            with atomic_open(self.job.work / "books-dup.npy", "wb") as f:
                np.save(f, arr)
            return
            yield

    class DedupFilter(PipelineStep):
        """``tokenize`` stage reader: the stored documents of the task's reading tasks,
        duplicates (lines, files or books) removed and counted."""

        name = "🦙 dedup filter"
        type = "🔻 - FILTER"

        def __init__(self, job: SourceJob, stats: FilterStats, mode: str = "") -> None:
            super().__init__()
            self.job, self.fstats, self.mode = job, stats, mode or job.dedup

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            job, mode = self.job, self.mode
            stored = "filter" if mode == "minhash" else "read"
            for t in job.read_range(rank) if mode != "minhash" else [rank]:
                removed = _removals(job, t, mode)
                with open(job.work / f"{stored}-{t:05d}.jsonl", encoding="utf-8") as f:
                    for i, line in enumerate(f):
                        text = json.loads(line)["text"]
                        gone = removed.get(i)
                        if gone is not None and mode == "lines":
                            lines = text.split("\n")
                            text = "\n".join(x for j, x in enumerate(lines) if j not in gone)
                            self.fstats.drop("duplicate_line", len(gone))
                        elif gone is not None:
                            self.fstats.drop(DROP_REASONS[mode])
                            self.fstats.documents_out -= 1
                            self.fstats.bytes_out -= len(text.encode("utf-8"))
                            self.stat_update("removed")
                            continue
                        yield Document(text=text, id=f"{t:05d}/{i}")

    return FindDuplicates, BookClusters, DedupFilter


# a whole document removed by DedupFilter, by dedup mode: the FilterStats reason
DROP_REASONS = {"docs": "duplicate_file", "books": "near_duplicate", "minhash": "minhash_duplicate"}


def _web_steps() -> tuple[type, ...]:
    """Kind ``web``'s steps after the line dedup: WebFilters, and MinhashSignatures and
    MinhashClusters of the MinHash stages (datatrove's MinhashDedupBuckets between them)."""
    from datatrove.data import Document
    from datatrove.io import get_datafolder
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
    from datatrove.utils.hashing import create_hash_func

    class WebFilters(PipelineStep):
        """Kind ``web``'s filters after line dedup: language, CCNet/C4 quality, classifier."""

        name = "🦙 web filters"
        type = "🔻 - FILTER"

        def __init__(self, job: SourceJob, stats: FilterStats) -> None:
            super().__init__()
            self.job, self.fstats = job, stats

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            from llamaforge.data.web import filter_web, web_options

            opts = web_options(dict(self.job.src.options))
            texts = (d.text for d in data or ())
            for i, text in enumerate(filter_web(texts, opts, self.fstats)):
                self.stat_update("kept")
                yield Document(text=text, id=f"{rank:05d}/{i}")

    class MinhashSignatures(MinhashDedupSignature):
        """datatrove's MinHash signature stage, with words split by a regular expression
        (datatrove's English word tokenizer needs spaCy)."""

        def __init__(self, output_folder: str, config: Any) -> None:
            PipelineStep.__init__(self)
            self.output_folder = get_datafolder(output_folder)
            self.config = config
            self.num_hashes = config.num_buckets * config.hashes_per_bucket
            self._parameters = None
            self._hash_func = create_hash_func(config.hash_config)
            self.language = "en"
            self.word_tokenizer = _RegexWords()
            self.skip_existing_sigs = False

    class MinhashClusters(PipelineStep):
        """``minhash-clusters`` (one task): the connected components of the bucket stage's
        duplicate pairs; of each, the first document in reading order (lowest task, then
        document) is kept, so the choice does not depend on the number of tasks."""

        name = "🦙 MinHash clusters"
        type = "🫂 - DEDUP"

        def __init__(self, job: SourceJob) -> None:
            super().__init__()
            self.job = job

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            dropped = _minhash_duplicates(self.job.work / "minhash" / "buckets")
            self.stat_update("to_remove", value=len(dropped))
            arr = np.array(dropped, dtype=np.int64).reshape(-1, 2)
            with atomic_open(self.job.work / "minhash-dup.npy", "wb") as f:
                np.save(f, arr)
            return
            yield

    return WebFilters, MinhashSignatures, MinhashClusters


def _output_steps() -> tuple[type, ...]:
    """The ``tokenize`` stage's last steps and the ``finalize`` stage's: TokenizeStep,
    ShardWriter, Finalize."""
    from datatrove.pipeline.base import PipelineStep

    class TokenizeStep(PipelineStep):
        """SentencePiece ids (``bos``/``eos`` as configured) and the split (a hash of the
        text) of each document, in batches."""

        name = "🦙 sentencepiece"
        type = "🔢 - TOKENIZER"

        def __init__(self, job: SourceJob) -> None:
            super().__init__()
            self.job = job

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            from llamaforge.tokenizer import Tokenizer

            cfg = self.job.cfg
            tok = Tokenizer(self.job.tokenizer)
            batch: list[Any] = []

            def flush() -> Iterator[Any]:
                ids = tok.encode_batch([d.text for d in batch], bos=cfg.bos, eos=cfg.eos)
                for doc, one in zip(batch, ids):
                    doc.metadata["ids"] = one
                    doc.metadata["split"] = "val" if is_val(doc.text, cfg.val_fraction) else "train"
                    self.stat_update("tokens", value=len(one))
                    yield doc
                batch.clear()

            for doc in data or ():
                batch.append(doc)
                if len(batch) >= 512:
                    yield from flush()
            yield from flush()

    class ShardWriter(PipelineStep):
        """The task's token shards (shards.py's format), then ``work/task-TTTTT.json``."""

        name = "🦙 shard writer"
        type = "💽 - WRITER"

        def __init__(self, job: SourceJob, stats: FilterStats, stage_stats: str) -> None:
            super().__init__()
            self.job, self.fstats, self.stage_stats = job, stats, stage_stats

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            job, t0 = self.job, time.time()
            splits = _write_task_shards(job, rank, data or ())
            stats = self.fstats.to_dict()
            stats["peak_rss_mb"] = _peak_rss_mb()
            stats["seconds"] = round(time.time() - t0, 3)
            _write_json(job.work / f"task-{rank:05d}.json", {"splits": splits, "clean": stats})
            return
            yield

    class Finalize(PipelineStep):
        """``finalize`` (one task): ``meta.json`` from every task's output, once all exist."""

        name = "🦙 meta.json"
        type = "💽 - WRITER"

        def __init__(self, job: SourceJob) -> None:
            super().__init__()
            self.job = job

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
            finalize_source(self.job)
            return
            yield

    return TokenizeStep, ShardWriter, Finalize


def _web_task_pages(job: SourceJob, rank: int, stats: FilterStats, raw: bool) -> Iterator[str]:
    """Task ``rank``'s pages of a ``web`` source (its files and byte ranges), counted in
    ``stats``; through the filters (web.filter_web) unless ``raw``."""
    from llamaforge.data.web import filter_web, web_options

    opts = web_options(dict(job.src.options))
    units = [p for u in job.units[job.bounds[rank] : job.bounds[rank + 1]] for p in u]

    def texts() -> Iterator[str]:
        for text, size in iter_web_units(units, opts, stats):
            stats.documents_in += 1
            stats.bytes_in += size
            yield text

    # with dedup_lines the read stage stores the raw pages (job.dedup)
    return texts() if raw else filter_web(texts(), opts, stats)


class _TaskSignatures:
    """A reading task's dedup signatures, by ``job.dedup``: the hashes of its normalised
    lines (``lines``, with dedup_lines) or of its documents (``docs``) into hash buckets,
    or its books' MinHashes (``books``) to ``work/books-TTTTT.npz`` by ``close``."""

    def __init__(self, job: SourceJob, rank: int) -> None:
        self.job, self.rank = job, rank
        self.lines = job.dedup == "lines" and job.src.options.get("dedup_lines", True)
        self.buckets = (
            _SigBuckets(job.work, rank, job.buckets) if job.dedup in ("lines", "docs") else None
        )
        self.books: list[tuple[int, int, int, np.ndarray]] = []  # (doc, offset, count, minhash)
        self.book_opts: BooksOptions | None = None
        if job.dedup == "books":
            from llamaforge.data.base import parse_options
            from llamaforge.data.books import BooksOptions

            self.book_opts = parse_options(BooksOptions, job.src.options, "books")

    def add(self, doc: int, offset: int, text: str) -> None:
        """Document ``doc`` of the task, stored at byte ``offset`` of its documents file."""
        if self.lines:
            from llamaforge.data.web import normalize_line

            for j, line in enumerate(text.split("\n")):
                norm = normalize_line(line)
                if norm:
                    assert self.buckets is not None
                    self.buckets.add(_h64(norm), doc, j)
        elif self.job.dedup == "docs":
            assert self.buckets is not None
            self.buckets.add(_h64(text.rstrip("\n")), doc, 0)
        elif self.book_opts is not None:
            sig = _book_signature(text, self.book_opts)
            if sig is not None:
                self.books.append((doc, offset, sig[0], sig[1]))

    def close(self) -> None:
        """Put the task's signature files into place."""
        if self.buckets is not None:
            self.buckets.close()
            return
        if self.book_opts is None:
            return
        books = self.books
        with atomic_open(self.job.work / f"books-{self.rank:05d}.npz", "wb") as f:
            np.savez(
                f,
                doc=np.array([b[0] for b in books], dtype=np.int64),
                offset=np.array([b[1] for b in books], dtype=np.int64),
                count=np.array([b[2] for b in books], dtype=np.int64),
                minhash=np.array([b[3] for b in books], dtype=np.uint64).reshape(
                    len(books), self.book_opts.num_perm
                ),
            )


def _find_duplicates(job: SourceJob, bucket: int) -> int:
    """Of each hash of ``bucket``, every occurrence after the first in reading order (task,
    document, line): written per reading task t to ``work/dup-BBBBB-TTTTT.npy`` as (document,
    line) rows. Returns how many there are."""
    parts, owners = [], []
    for t in range(job.tasks):
        arr = np.fromfile(job.work / f"sig-{t:05d}-{bucket:05d}.bin", dtype=SIG_DTYPE)
        parts.append(arr)
        owners.append(np.full(len(arr), t, dtype=np.int64))
    sig = np.concatenate(parts) if parts else np.zeros(0, SIG_DTYPE)
    task = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    order = np.lexsort((sig["line"], sig["doc"], task, sig["h"]))
    hs = sig["h"][order]
    dup = np.ones(len(hs), dtype=bool)
    if len(hs):
        dup[0] = False
        dup[1:] = hs[1:] == hs[:-1]
    idx = order[dup]
    for t in range(job.tasks):
        mine = idx[task[idx] == t]
        out = np.stack([sig["doc"][mine], sig["line"][mine]], axis=1).astype(np.int64)
        with atomic_open(job.work / f"dup-{bucket:05d}-{t:05d}.npy", "wb") as f:
            np.save(f, out.reshape(-1, 2))
    return int(dup.sum())


def _minhash_duplicates(buckets: Path) -> list[tuple[int, int]]:
    """The (task, document) pairs to drop: of each connected cluster of the duplicate pairs
    in ``buckets`` (``*.dups`` of datatrove's bucket stage), all but the lowest one."""
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(x: tuple[int, int]) -> tuple[int, int]:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for dup in sorted(buckets.glob("*.dups")):
        pairs = np.fromfile(dup, dtype="<u4").reshape(-1, 4)
        for f1, d1, f2, d2 in pairs.tolist():
            a, b = find((f1, d1)), find((f2, d2))
            if a != b:
                lo, hi = min(a, b), max(a, b)
                parent[hi] = lo
                parent.setdefault(lo, lo)
    return sorted(x for x in parent if find(x) != x)


def _write_task_shards(job: SourceJob, rank: int, docs: Iterable[Any]) -> dict[str, Any]:
    """Task ``rank``'s tokenized documents to its shards (``train-TTTTT-NNNNN.bin``, …);
    returns its meta.json ``splits``. A failure removes the open shards' temporaries."""
    from llamaforge.tokenizer import Tokenizer

    out = Path(job.out)
    for old in out.glob(f"*-{rank:05d}-*.bin"):
        old.unlink()
    vocab = Tokenizer(job.tokenizer).vocab_size
    dtype = token_dtype(vocab)
    writers = {s: _task_shards(out, s, dtype, job.cfg.shard_tokens, rank) for s in SPLITS}
    counts = {s: 0 for s in SPLITS}
    try:
        for doc in docs:
            split = doc.metadata["split"]
            writers[split].write(np.asarray(doc.metadata["ids"], dtype=np.int64))
            counts[split] += 1
        return {
            s: {"tokens": w.tokens, "documents": counts[s], "shards": w.finish()}
            for s, w in writers.items()
        }
    except BaseException as e:
        for w in writers.values():  # remove open temporaries (a full disk: named)
            w.abort(e)
        raise


class _RegexWords:
    """word_tokenize: lowercase ``\\w+`` words (books.py's split)."""

    def word_tokenize(self, text: str) -> list[str]:
        from llamaforge.data.books import _words

        return _words(text)


def minhash_config(options: dict[str, Any]) -> Any:
    """FineWeb's MinHash parameters unless the source's options say otherwise: word
    5-grams, 14 buckets of 8 hashes (112 hashes, 64-bit)."""
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    return MinhashConfig(
        n_grams=int(options.get("minhash_ngrams", 5)),
        num_buckets=int(options.get("minhash_buckets", 14)),
        hashes_per_bucket=int(options.get("minhash_hashes_per_bucket", 8)),
        seed=1,
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )


MAX_BUCKETS = 256  # open bucket files per reading task


class _SigBuckets:
    """A reading task's (hash, document, line) signatures, appended to one file a hash
    bucket in blocks (memory: a block a bucket); files renamed into place by ``close``."""

    BLOCK = 1 << 14

    def __init__(self, work: Path, rank: int, buckets: int) -> None:
        self.paths = [work / f"sig-{rank:05d}-{b:05d}.bin" for b in range(buckets)]
        self.tmp = [p.with_name(p.name + ".part") for p in self.paths]
        self.files = [open(t, "wb") for t in self.tmp]  # noqa: SIM115 (closed in close)
        self.buf: list[list[tuple[int, int, int]]] = [[] for _ in range(buckets)]

    def add(self, h: int, doc: int, line: int) -> None:
        b = h % len(self.files)
        self.buf[b].append((h, doc, line))
        if len(self.buf[b]) >= self.BLOCK:
            self._flush(b)

    def _flush(self, b: int) -> None:
        self.files[b].write(np.array(self.buf[b], dtype=SIG_DTYPE).tobytes())
        self.buf[b].clear()

    def close(self) -> None:
        for b, f in enumerate(self.files):
            self._flush(b)
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, path in zip(self.tmp, self.paths):
            os.replace(tmp, path)


SIG_DTYPE = np.dtype([("h", "<u8"), ("doc", "<i8"), ("line", "<i8")])


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _removals(job: SourceJob, t: int, mode: str) -> dict[int, set[int]]:
    """Task ``t``'s duplicates: document -> lines (whole documents: {0})."""
    out: dict[int, set[int]] = {}
    if mode in ("lines", "docs"):
        for b in range(job.buckets):
            for doc, line in np.load(job.work / f"dup-{b:05d}-{t:05d}.npy").tolist():
                out.setdefault(doc, set()).add(line)
    elif mode in ("books", "minhash"):
        for task, doc in np.load(job.work / f"{mode}-dup.npy").tolist():
            if task == t:
                out[doc] = {0}
    return out


def _task_shards(out: Path, split: str, dtype: np.dtype, limit: int, task: int) -> ShardWriter:
    """shards.ShardWriter with the task in the shard names: ``train-TTTTT-NNNNN.bin``."""
    return ShardWriter(out, f"{split}-{task:05d}", dtype, limit)


# ----------------------------------------------------------------------------- books


def _book_signature(text: str, opts: Any) -> tuple[int, np.ndarray] | None:
    from datasketch import MinHash

    from llamaforge.data.books import _words, shingle_hashes, sorted_unique

    words = _words(text)
    if len(words) < opts.shingle_size:
        return None
    uniq = sorted_unique(shingle_hashes(words, opts.shingle_size))
    mh = MinHash(num_perm=opts.num_perm, scheme="affine64", hashfunc=int)
    for start in range(0, len(uniq), 4096):
        mh.update_batch(uniq[start : start + 4096].tolist())
    return len(uniq), np.asarray(mh.hashvalues, dtype=np.uint64)


def _book_clusters(job: SourceJob) -> set[tuple[int, int]]:
    """books.read_books's near-duplicate rule on the signatures of every reading task."""
    from datasketch import MinHash, MinHashLSHEnsemble

    from llamaforge.data.base import parse_options
    from llamaforge.data.books import (
        BooksOptions,
        _words,
        shingle_hashes,
        sorted_unique,
        word_overlap,
    )

    opts = parse_options(BooksOptions, job.src.options, "books")
    k = opts.shingle_size
    signed: list[tuple[tuple[int, int], int, int, Any]] = []  # (key, offset, count, minhash)
    for t in range(job.tasks):
        z = np.load(job.work / f"books-{t:05d}.npz")
        for doc, off, count, hv in zip(z["doc"], z["offset"], z["count"], z["minhash"]):
            mh = MinHash(num_perm=opts.num_perm, hashvalues=hv, scheme="affine64", hashfunc=int)
            signed.append(((t, int(doc)), int(off), int(count), mh))
    dropped: set[tuple[int, int]] = set()
    if len(signed) <= 1:
        return dropped
    where = {key: off for key, off, _, _ in signed}
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def shingles(key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if key not in cache:
            with open(job.work / f"read-{key[0]:05d}.jsonl", "rb") as f:
                f.seek(where[key])
                text = json.loads(f.readline())["text"]
            h = shingle_hashes(_words(text), k)
            if len(cache) >= 8:
                cache.pop(next(iter(cache)))
            cache[key] = (h, sorted_unique(h))
        return cache[key]

    threshold = max(0.05, opts.overlap**k - 0.1)
    lsh = MinHashLSHEnsemble(threshold=threshold, num_perm=opts.num_perm, num_part=8)
    lsh.index((key, mh, count) for key, _, count, mh in signed)
    ordered = sorted(signed, key=lambda b: (-b[2], b[0]))
    rank = {b[0]: i for i, b in enumerate(ordered)}
    for key, _, count, mh in ordered:
        candidates = [
            c for c in lsh.query(mh, count) if c != key and c not in dropped and rank[c] < rank[key]
        ]
        if not candidates:
            continue
        mine = shingles(key)
        for other in sorted(candidates, key=lambda c: rank[c]):
            if word_overlap(mine[0], shingles(other)[1], k) >= opts.overlap:
                dropped.add(key)
                break
    return dropped


# ----------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str
    tasks: int
    pipeline: list[Any]


def source_stages(job: SourceJob) -> list[Stage]:
    steps = _make_steps()
    stats = FilterStats
    if not job.dedup:
        s = stats()
        read = [
            steps["SourceReader"](job, s, raw=False),
            steps["TokenizeStep"](job),
            steps["ShardWriter"](job, s, "tokenize"),
        ]
        stages = [Stage("tokenize", job.tasks, read)]
    else:
        s1 = stats()
        stages = [
            Stage(
                "read",
                job.tasks,
                [steps["SourceReader"](job, s1, raw=True), steps["DocStore"](job, s1)],
            )
        ]
        if job.dedup == "books":
            stages.append(Stage("clusters", 1, [steps["BookClusters"](job)]))
        else:
            stages.append(Stage(job.dedup, job.buckets, [steps["FindDuplicates"](job)]))
        s2 = stats()
        tok = [steps["DedupFilter"](job, s2)]
        if job.dedup == "lines":
            tok.append(steps["WebFilters"](job, s2))
        if job.minhash:
            cfg = minhash_config(job.src.options)
            mh = job.work / "minhash"
            filt = tok + [
                steps["DocStore"](job, s2, stage="filter", sigs=False),
                steps["MinhashSignatures"](str(mh / "sigs"), cfg),
            ]
            stages.append(Stage("filter", job.tokenize_tasks, filt))
            buckets = steps["MinhashDedupBuckets"](
                input_folder=str(mh / "sigs"), output_folder=str(mh / "buckets"), config=cfg
            )
            stages.append(Stage("minhash-buckets", cfg.num_buckets, [buckets]))
            stages.append(Stage("minhash-clusters", 1, [steps["MinhashClusters"](job)]))
            s2 = stats()
            tok = [steps["DedupFilter"](job, s2, mode="minhash")]
        tok += [steps["TokenizeStep"](job), steps["ShardWriter"](job, s2, "tokenize")]
        stages.append(Stage("tokenize", job.tokenize_tasks, tok))
    stages.append(Stage("finalize", 1, [steps["Finalize"](job)]))
    return stages


def finalize_source(job: SourceJob) -> dict[str, Any]:
    """meta.json of a source from its tasks' outputs (DataError when one is missing)."""
    from llamaforge.tokenizer import Tokenizer

    cfg, src = job.cfg, job.src
    parts = []
    for j in range(job.tokenize_tasks):
        p = job.work / f"task-{j:05d}.json"
        if not p.is_file():
            raise DataError(f"source {src.name}: task {j} has no output ({p}); run again")
        parts.append(json.loads(p.read_text(encoding="utf-8")))
    stage_stats = []
    if job.dedup:
        for t in range(job.tasks):
            stage_stats.append(json.loads(_task_stats_path(job, "read", t).read_text()))
    if job.minhash:
        for t in range(job.tokenize_tasks):
            stage_stats.append(json.loads(_task_stats_path(job, "filter", t).read_text()))
    clean_parts = [p["clean"] for p in parts]
    # the read stage counts documents out before dedup, the dedup filter subtracts the
    # duplicates: the sums are the source's counts
    clean = _merge_stats(stage_stats + clean_parts)
    clean["files"] = job.files
    clean["peak_rss_mb"] = max([p.get("peak_rss_mb", 0) for p in stage_stats + clean_parts])
    if src.errors != "strict":
        clean["errors_mode"] = src.errors
    splits = {}
    for s in SPLITS:
        splits[s] = {
            "tokens": sum(p["splits"][s]["tokens"] for p in parts),
            "documents": sum(p["splits"][s]["documents"] for p in parts),
            "shards": [sh for p in parts for sh in p["splits"][s]["shards"]],
        }
    if not splits["train"]["documents"] + splits["val"]["documents"]:
        skipped = "; ".join(clean.get("errors", [])[:3])
        raise DataError(
            f"source {src.name}: no documents left of {clean['files']} file(s)"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    tok = Tokenizer(job.tokenizer)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": src.name,
        "kind": src.kind,
        "weight": src.weight,
        "fingerprint": source_fingerprint(cfg, src, tok.sha256()),
        "tokenizer": job.tokenizer,
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "dtype": token_dtype(tok.vocab_size).name,
        "bos": cfg.bos,
        "eos": cfg.eos,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "splits": splits,
        "clean": clean,
        "seconds": round(sum(p["clean"].get("seconds", 0) for p in parts), 2),
        "tasks": job.tasks,
        "complete": True,
    }
    _write_json(Path(job.out) / META_FILE, meta)
    return meta


# ----------------------------------------------------------------------------- running


def logging_root(cfg: DataConfig) -> Path:
    ex = cfg.executor
    return Path(ex.logging_dir).expanduser() if ex.logging_dir else Path(cfg.output) / "_datatrove"


def make_job(cfg: DataConfig, src: SourceConfig, tokenizer: str) -> SourceJob:
    tasks = cfg.executor.tasks
    paths = source_paths(cfg, src)
    if src.kind == "web":
        units = web_range_units(paths, src.options, cfg.executor.split_bytes)
    else:
        units = plan_units(src.kind, src.options, paths)
    dedup = dedup_mode(src)
    if _global_classifier(src) and not dedup:
        tasks = 1  # the classifier's negatives are all the pages: one task sees them
    if src.kind == "stdlib_docs" and src.options.get("max_bytes") is not None:
        tasks = 1  # a cap on the documents read so far, in order: one task reads them
    # absolute paths: Slurm and Ray workers need not start in this working directory
    units = [[os.path.abspath(p) for p in u] for u in units]
    src = copy.deepcopy(src)
    for key, value in src.options.items():
        if key.endswith("_paths") and isinstance(value, list):
            src.options[key] = [os.path.abspath(os.path.expanduser(v)) for v in value]
    return SourceJob(
        cfg=cfg,
        src=src,
        tokenizer=os.path.abspath(tokenizer),
        out=os.path.abspath(Path(cfg.output).expanduser() / src.name),
        tasks=tasks,
        units=units,
        bounds=split_units(units, tasks),
        dedup=dedup,
        tokenize_tasks=1 if _global_classifier(src) else tasks,
        files=len(paths),
        minhash=src.kind == "web" and bool(src.options.get("minhash", False)),
    )


def _reset_if_stale(job: SourceJob, fingerprint: str, logs: Path) -> None:
    """Start the source afresh when its plan (config, tokenizer, tasks, units) changed."""
    plan = {"fingerprint": fingerprint, "tasks": job.tasks, "units": job.units}
    out = Path(job.out)
    p = job.work / PLAN
    try:
        same = json.loads(p.read_text(encoding="utf-8")) == plan
    except (OSError, ValueError):
        same = False
    if same:
        return
    shutil.rmtree(job.work, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    (out / META_FILE).unlink(missing_ok=True)
    for old in out.glob("*.bin"):
        if old.is_file():
            old.unlink()
    job.work.mkdir(parents=True, exist_ok=True)
    _write_json(p, plan)


def prepare_source_pipeline(
    cfg: DataConfig, src: SourceConfig, tokenizer: str, log=print, progress: bool = False
) -> dict[str, Any]:
    """Prepare one source with the configured datatrove executor; returns its meta (or
    ``{"name", "error", "complete": False}``; for ``slurm`` ``{"submitted": True}``)."""
    from llamaforge.tokenizer import Tokenizer

    out = Path(cfg.output) / src.name
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = source_fingerprint(cfg, src, Tokenizer(tokenizer).sha256())
    meta = read_meta(out)
    if meta and meta.get("fingerprint") == fingerprint and meta.get("complete"):
        meta["skipped"] = True
        return meta
    job = make_job(cfg, src, tokenizer)
    logs = logging_root(cfg) / src.name
    _reset_if_stale(job, fingerprint, logs)
    (out / META_FILE).unlink(missing_ok=True)
    stages = source_stages(job)
    ex = cfg.executor
    try:
        if ex.type == "local":
            for stage in stages:
                if progress:
                    log(f"  {src.name}: stage {stage.name} ({stage.tasks} task(s))")
                _run_local(stage, ex.workers, logs / stage.name, src.name)
        elif ex.type == "ray":
            _run_ray(stages, ex, logs, src.name)
        else:
            write_slurm_jobs(stages, ex, logs, src.name, submit=ex.submit)
            return {"name": src.name, "submitted": ex.submit, "complete": False, "logs": str(logs)}
    except (DataError, ValueError, OSError) as e:
        return {"name": src.name, "error": str(e), "complete": False}
    except subprocess.CalledProcessError as e:  # sbatch refused a job
        return {"name": src.name, "error": f"{e} (logs: {logs})", "complete": False}
    meta = read_meta(out)
    if not meta or not meta.get("complete"):
        return {"name": src.name, "error": "meta.json was not written", "complete": False}
    return meta


def _local_executor_class() -> type:
    from datatrove.executor import LocalPipelineExecutor

    class ProcessPerTaskExecutor(LocalPipelineExecutor):
        """datatrove's local executor, one forked process per task: a task that raises or
        whose process dies is reported by rank, and the other tasks still run."""

        def run_tasks(self) -> dict[int, str]:
            self._launched = True
            ranks = self.get_incomplete_ranks()
            if not ranks:
                return {}
            self.save_executor_as_json()
            ctx = multiprocessing.get_context("fork")
            running: dict[Any, tuple[int, Any]] = {}
            failed: dict[int, str] = {}
            pending = list(ranks)
            errors = Path(self.logging_dir.path) / "errors"
            errors.mkdir(parents=True, exist_ok=True)
            while pending or running:
                while pending and len(running) < self.workers:
                    rank = pending.pop(0)
                    (errors / f"{rank:05d}.txt").unlink(missing_ok=True)
                    proc = ctx.Process(target=self._child, args=(rank, errors), daemon=False)
                    proc.start()
                    running[proc.sentinel] = (rank, proc)
                for sentinel in wait_sentinels(list(running)):
                    rank, proc = running.pop(sentinel)
                    proc.join()
                    if proc.exitcode != 0 or not self.is_rank_completed(rank):
                        err = errors / f"{rank:05d}.txt"
                        failed[rank] = (
                            err.read_text(encoding="utf-8").strip()
                            if err.is_file()
                            else f"worker process died (exit code {proc.exitcode})"
                        )
            return failed

        def _child(self, rank: int, errors: Path) -> None:
            code = 0
            try:
                self._run_for_rank(rank, local_rank=1)  # console: errors only (log file: all)
            except BaseException as e:  # reported by the parent, with the rank
                msg = f"{type(e).__name__}: {e}"
                if not isinstance(e, (DataError, OSError)):
                    msg += "\n" + "".join(traceback.format_exception(e)[-3:])
                (errors / f"{rank:05d}.txt").write_text(msg, encoding="utf-8")
                code = 1
            finally:
                os._exit(code)

    return ProcessPerTaskExecutor


def _run_local(stage: Stage, workers: int, logs: Path, name: str) -> None:
    cls = _local_executor_class()
    ex = cls(
        stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks), logging_dir=str(logs)
    )
    failed = ex.run_tasks()
    if failed:
        lines = "; ".join(
            f"task {r}: {m.splitlines()[0] if m else m}" for r, m in sorted(failed.items())
        )
        raise DataError(
            f"source {name}: stage {stage.name}: {len(failed)} of {stage.tasks} task(s) failed "
            f"({lines}); the others are complete, run again to redo only the failed ones "
            f"(logs: {logs})"
        )


def _run_ray(stages: list[Stage], ex: ExecutorConfig, logs: Path, name: str) -> None:
    import ray
    from datatrove.executor import RayPipelineExecutor

    if not ray.is_initialized():
        ray.init(address=ex.address or None, include_dashboard=False)
    prev = None
    execs = []
    for stage in stages:
        prev = RayPipelineExecutor(
            stage.pipeline,
            tasks=stage.tasks,
            workers=min(ex.workers, stage.tasks),
            logging_dir=str(logs / stage.name),
            depends=prev,
            cpus_per_task=ex.cpus_per_task,
            mem_per_cpu_gb=ex.mem_per_cpu_gb,
        )
        execs.append((stage, prev))
    for stage, e in execs:
        e.run()
        missing = e.get_incomplete_ranks(skip_completed=True)
        if missing:
            raise DataError(
                f"source {name}: stage {stage.name}: task(s) {missing} of {stage.tasks} did not "
                f"complete on Ray (logs: {logs / stage.name}); run again to redo only those"
            )


def write_slurm_jobs(
    stages: list[Stage], ex: ExecutorConfig, logs: Path, name: str, submit: bool
) -> list[Path]:
    """One Slurm array job a stage, each depending on the previous one. ``submit``: call
    sbatch (datatrove's launch_job); otherwise write each stage's ``launch_script.slurm``,
    ``executor.pik`` and ``ranks_to_run.json`` into its logging folder and return the
    scripts' paths."""
    import dill
    from datatrove.executor import SlurmPipelineExecutor

    prev = None
    scripts = []
    for stage in stages:
        e = SlurmPipelineExecutor(
            stage.pipeline,
            tasks=stage.tasks,
            time=ex.time,
            partition=ex.partition,
            cpus_per_task=ex.cpus_per_task,
            mem_per_cpu_gb=int(max(1, round(ex.mem_per_cpu_gb))),
            workers=min(ex.workers, stage.tasks) if ex.workers else -1,
            job_name=f"llamaforge-{name}-{stage.name}",
            env_command=ex.env_command or None,
            sbatch_args=dict(ex.sbatch_args) or None,
            logging_dir=str((logs / stage.name).resolve()),
            depends=prev,
            qos="",
        )
        if submit:
            prev = e
            continue
        folder = logs / stage.name
        folder.mkdir(parents=True, exist_ok=True)
        ranks = e.get_incomplete_ranks()
        with open(folder / "executor.pik", "wb") as f:
            dill.dump(e, f, fmode=dill.CONTENTS_FMODE)
        _write_json(folder / "ranks_to_run.json", ranks)
        script = e.get_launch_file_contents(
            e.get_sbatch_args(max(1, len(ranks))),
            f"srun -l -n 1 launch_pickled_pipeline {(folder / 'executor.pik').resolve()}",
        )
        (folder / "launch_script.slurm").write_text(script, encoding="utf-8")
        scripts.append(folder / "launch_script.slurm")
        prev = None
    if submit and prev is not None:
        prev.run()  # launches its dependencies first, with afterok dependencies
        return scripts
    # the stages in order, each after the previous one succeeded
    lines = ["#!/bin/bash", f"# submits the Slurm jobs of source {name}, stage by stage", "set -e"]
    for i, script in enumerate(scripts):
        dep = "" if i == 0 else ' --dependency="afterok:$jid"'
        lines.append(
            f'jid=$(sbatch --parsable --export=ALL,RUN_OFFSET=0{dep} "{script.resolve()}")'
        )
        lines.append(f'echo "{script.parent.name}: job $jid"')
    (logs / "submit.sh").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (logs / "submit.sh").chmod(0o755)
    return scripts
