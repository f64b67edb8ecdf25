"""What a prepared data folder holds: the paper's Table 1 for a run, and sample documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamaforge.data.base import DataError
from llamaforge.data.mixture import TokenSource, open_sources
from llamaforge.data.prepare import CLEAN_FILE
from llamaforge.tokenizer import Tokenizer


def table1(data_dir: str | Path, run_tokens: int) -> list[dict[str, Any]]:
    """Per source: sampling proportion, epochs (tokens drawn / available) for a run of
    ``run_tokens`` tokens, disk size of the shards and of the cleaned text, tokens."""
    root = Path(data_dir)
    sources, weights = open_sources(root)
    total = sum(weights)
    rows = []
    for s, w in zip(sources, weights):
        shard_bytes = sum(
            (root / s.name / sh["file"]).stat().st_size
            for split in s.meta["splits"].values()
            for sh in split["shards"]
        )
        clean = root / s.name / CLEAN_FILE
        rows.append(
            {
                "source": s.name,
                "kind": s.meta["kind"],
                "proportion": w / total,
                "epochs": (run_tokens * w / total) / s.tokens if s.tokens else float("inf"),
                "text_bytes": s.meta["clean"]["bytes_out"],
                "disk_bytes": shard_bytes + (clean.stat().st_size if clean.is_file() else 0),
                "tokens": s.tokens,
                "documents": s.meta["splits"]["train"]["documents"],
            }
        )
    return rows


def format_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An aligned text table: a header row, a rule, the rows; the first ``left`` columns
    left-aligned, the others right-aligned (numbers), two spaces between columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_table1(rows: list[dict[str, Any]], run_tokens: int) -> str:
    """The paper's Table 1 for this folder: per source its sampling proportion, epochs over
    a run of ``run_tokens`` tokens, disk size and tokens."""
    from llamaforge.units import human_bytes, human_count

    header = ["Dataset", "Kind", "Sampling prop.", "Epochs", "Disk size", "Tokens", "Documents"]
    body = [
        [
            r["source"],
            str(r["kind"]),
            f"{r['proportion'] * 100:.1f}%",
            f"{r['epochs']:,.2f}",
            human_bytes(r["disk_bytes"]),
            human_count(r["tokens"]),
            f"{r['documents']:,}",
        ]
        for r in rows
    ]
    title = f"Mixture for a run of {human_count(run_tokens)} tokens"
    return title + "\n" + format_table(header, body, left=2)


def first_documents(
    data_dir: str | Path,
    source: str,
    n: int = 3,
    tokenizer: str | Path | None = None,
    split: str = "train",
) -> list[str]:
    """The first ``n`` documents of a source's shards, decoded back to text."""
    root = Path(data_dir)
    directory = root / source
    if not directory.is_dir():
        names = sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file())
        raise DataError(f"{root}: no source {source!r}; prepared sources: {names}")
    src = TokenSource(directory, split)
    tok = Tokenizer(tokenizer or src.meta["tokenizer"])
    if tok.sha256() != src.meta["tokenizer_sha256"]:
        raise DataError(f"{tok.path}: not the tokenizer these shards were built with")
    marker = src.meta["bos_id"] if src.meta["bos"] else src.meta["eos_id"]
    docs: list[str] = []
    pos = 0
    chunk = 1 << 16
    current: list[int] = []
    while len(docs) < n and pos < src.tokens:
        ids = src.read(pos, min(chunk, src.tokens - pos))
        pos += len(ids)
        for t in ids.tolist():
            boundary = t == marker
            if boundary and src.meta["bos"]:
                if current:
                    docs.append(tok.decode(current))
                current = []
            elif boundary:
                docs.append(tok.decode(current))
                current = []
            elif not (t == src.meta["eos_id"] and src.meta["eos"]):
                current.append(t)
            if len(docs) >= n:
                break
    if len(docs) < n and current:
        docs.append(tok.decode(current))
    return docs[:n]
