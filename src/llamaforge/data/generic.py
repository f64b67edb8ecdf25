"""Generic text sources: plain text, JSON lines, Parquet and Hugging Face ``datasets``.

Kind ``generic`` reads already-clean corpora with minimal normalisation: each document is
stripped, and empty ones are dropped (counted ``empty``). Formats, chosen by file suffix:

* ``.txt`` (and any unknown suffix): one document per file (``split="file"``) or one per
  blank-line-separated block (``split="paragraph"``);
* ``.jsonl`` / ``.json``: one JSON object per line (a ``.json`` file starting with ``[`` is
  read as one JSON array), the document is field ``text_field``; a malformed line is counted
  ``bad_json_line`` and reported as ``file:line`` in ``stats.errors``, the other lines go on;
* ``.parquet``: column ``text_field``, read in batches of ``batch_size`` rows with pyarrow;
* a directory written by ``datasets.Dataset.save_to_disk`` (any of its files given), read
  with ``datasets.load_from_disk``.

With ``loader="datasets"`` the files are read by ``datasets.load_dataset("json" | "parquet" |
"text", data_files=...)`` instead of the built-in readers; ``hf_dataset`` names a dataset on
the Hugging Face hub (it needs a network, which may be unreachable: that is a ``DataError``
with the reason). The module also holds the option parsing shared by the other kinds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from llamaforge.data.base import DataError, FilterStats, parse_options, read_text

T = TypeVar("T")

# ----------------------------------------------------------------------------- options


# ----------------------------------------------------------------------------- readers


def split_blocks(text: str) -> list[str]:
    """Blank-line-separated blocks of ``text`` (lines with only spaces count as blank)."""
    blocks: list[str] = []
    cur: list[str] = []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def iter_text_file(path: Path, split: str, stats: FilterStats) -> Iterator[str]:
    """Raw documents of a text file (not counted in ``stats``; unreadable: reported)."""
    text = read_text(path, stats)
    if text is None:
        return
    if not text.strip():
        stats.error(path, "empty file")
        return
    if split == "paragraph":
        yield from split_blocks(text)
    else:
        yield text


def _record_text(record: Any, field: str, where: str, stats: FilterStats) -> str | None:
    if not isinstance(record, dict):
        stats.errors.append(f"{where}: expected a JSON object, got {type(record).__name__}")
        stats.drop("bad_json_line")
        return None
    if field not in record:
        stats.errors.append(f"{where}: no field {field!r} (fields: {sorted(record)[:10]})")
        stats.drop("missing_field")
        return None
    value = record[field]
    if not isinstance(value, str):
        stats.errors.append(f"{where}: field {field!r} is {type(value).__name__}, not a string")
        stats.drop("missing_field")
        return None
    return value


def iter_json_file(path: Path, field: str, stats: FilterStats) -> Iterator[str]:
    """Field ``field`` of each JSON object of a JSON-lines file (or a JSON array file)."""
    text = read_text(path, stats)
    if text is None:
        return
    if not text.strip():
        stats.error(path, "empty file")
        return
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            stats.error(path, f"malformed JSON array (line {e.lineno}: {e.msg})")
            return
        for i, rec in enumerate(records):
            value = _record_text(rec, field, f"{path}[{i}]", stats)
            if value is not None:
                yield value
        return
    yield from json_lines(text, field, stats, lambda lineno: f"{path}:{lineno}")


def json_lines(
    text: str, field: str, stats: FilterStats, where: Callable[[int], str]
) -> Iterator[str]:
    """Field ``field`` of each JSON object of JSON-lines ``text``; a malformed line is
    counted and reported as ``where(line number): malformed JSON (…)``."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            stats.errors.append(f"{where(lineno)}: malformed JSON ({e.msg})")
            stats.drop("bad_json_line")
            continue
        value = _record_text(rec, field, where(lineno), stats)
        if value is not None:
            yield value


def iter_parquet_file(
    path: Path, field: str, stats: FilterStats, batch_size: int = 1024
) -> Iterator[str]:
    """Column ``field`` of a Parquet file, read in batches."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for bad files
        stats.error(path, f"not a readable Parquet file ({e})")
        return
    names = pf.schema_arrow.names
    if field not in names:
        stats.error(path, f"no column {field!r} (columns: {names})")
        return
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=[field]):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str):
                    yield value
                else:
                    stats.drop("missing_field")
    except Exception as e:
        stats.error(path, f"error while reading Parquet ({e})")


def is_saved_dataset_dir(folder: Path) -> bool:
    """Whether ``folder`` was written by ``datasets.Dataset.save_to_disk``."""
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _iter_hf_dataset(ds: Any, field: str, where: str, stats: FilterStats) -> Iterator[str]:
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict
        for split in ds:
            yield from _iter_hf_dataset(ds[split], field, f"{where}[{split}]", stats)
        return
    if field not in ds.column_names:
        stats.error(where, f"no column {field!r} (columns: {ds.column_names})")
        return
    for value in ds[field] if len(ds) < 100_000 else (row[field] for row in ds):
        if isinstance(value, str):
            yield value
        else:
            stats.drop("missing_field")


def iter_saved_dataset(folder: Path, field: str, stats: FilterStats) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        stats.error(folder, f"cannot load saved dataset ({e})")
        return
    yield from _iter_hf_dataset(ds, field, str(folder), stats)


_HF_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def iter_with_datasets(
    paths: list[Path], field: str, stats: FilterStats, cache_dir: str | None, split: str = "file"
) -> Iterator[str]:
    """Files read by ``datasets.load_dataset`` (one builder per suffix, each file alone so
    that one bad file is reported by name and the others go on)."""
    import datasets

    for path in paths:
        builder = _HF_BUILDERS.get(path.suffix.lower(), "text")
        extra: dict[str, Any] = {}
        if builder == "text":
            extra["sample_by"] = "document" if split == "file" else "paragraph"
        try:
            ds = datasets.load_dataset(
                builder, data_files=[str(path)], split="train", cache_dir=cache_dir, **extra
            )
        except Exception as e:
            stats.error(path, f"datasets.load_dataset({builder!r}) failed ({e})")
            continue
        yield from _iter_hf_dataset(ds, "text" if builder == "text" else field, str(path), stats)


def iter_hub_dataset(
    name: str, config: str | None, split: str, field: str, stats: FilterStats, cache: str | None
) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=cache)
    except Exception as e:
        raise DataError(
            f"generic: cannot load Hugging Face dataset {name!r} (split {split!r}): "
            f"{type(e).__name__}: {e}. The hub needs a network; use local files instead "
            "(jsonl/parquet/txt or a save_to_disk directory)."
        ) from e
    yield from _iter_hf_dataset(ds, field, f"hf:{name}", stats)


def iter_raw_documents(
    paths: Iterable[Path],
    stats: FilterStats,
    *,
    text_field: str = "text",
    split: str = "file",
    batch_size: int = 1024,
) -> Iterator[tuple[Path, str]]:
    """``(path, raw document)`` of every file, by suffix, with the built-in readers (saved
    ``datasets`` directories included). Unreadable files are reported and skipped."""
    seen_dirs: set[Path] = set()
    for path in paths:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if is_saved_dataset_dir(folder):
            if folder not in seen_dirs:
                seen_dirs.add(folder)
                for doc in iter_saved_dataset(folder, text_field, stats):
                    yield folder, doc
            continue
        if path.is_dir():
            stats.error(path, "is a directory (not a saved dataset)")
            continue
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            docs: Iterator[str] = iter_json_file(path, text_field, stats)
        elif suffix == ".parquet":
            docs = iter_parquet_file(path, text_field, stats, batch_size)
        else:
            docs = iter_text_file(path, split, stats)
        for doc in docs:
            yield path, doc


# ----------------------------------------------------------------------------- kind


@dataclass
class GenericOptions:
    """Options of kind ``generic``."""

    split: Literal["file", "paragraph"] = "file"  # documents of a .txt file
    text_field: str = "text"  # JSON field / Parquet or datasets column
    loader: Literal["builtin", "datasets"] = "builtin"  # who reads the files
    batch_size: int = 1024  # Parquet rows per batch
    hf_dataset: str | None = None  # a hub dataset name (needs a network)
    hf_config: str | None = None
    hf_split: str = "train"
    hf_cache_dir: str | None = None  # datasets cache (default: datasets' own)


def read_generic(paths: list[Path], options: dict[str, Any], stats: FilterStats) -> Iterator[str]:
    """Documents of plain text / JSON lines / Parquet / ``datasets`` files (see module doc)."""
    opts = parse_options(GenericOptions, options, "generic")
    if opts.batch_size < 1:
        raise DataError(f"generic: option 'batch_size' must be >= 1, got {opts.batch_size}")
    if opts.hf_dataset is not None:
        raw: Iterable[str] = iter_hub_dataset(
            opts.hf_dataset,
            opts.hf_config,
            opts.hf_split,
            opts.text_field,
            stats,
            opts.hf_cache_dir,
        )
    elif opts.loader == "datasets":
        raw = iter_with_datasets(list(paths), opts.text_field, stats, opts.hf_cache_dir, opts.split)
    else:
        raw = (
            doc
            for _, doc in iter_raw_documents(
                paths,
                stats,
                text_field=opts.text_field,
                split=opts.split,
                batch_size=opts.batch_size,
            )
        )
    for doc in raw:
        stats.documents_in += 1
        stats.bytes_in += len(doc.encode("utf-8"))
        text = doc.strip()
        if not text:
            stats.drop("empty")
            continue
        stats.documents_out += 1
        stats.bytes_out += len(text.encode("utf-8"))
        yield text
