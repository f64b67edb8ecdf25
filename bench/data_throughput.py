"""`llamaforge data prepare` throughput on datatrove: MB of raw input per second per core,
for each source kind of a data config, with 1 and 2 workers (local executor, the same
tasks), plus datatrove's own built-in web filters (Gopher repetition + Gopher quality + C4
quality + FineWeb quality, spaCy word tokenizer) on the same web pages in the same run,
and the scaling arithmetic for the paper's 4.75 TB (../shared/SPEC.md Table 1).

    python bench/data_throughput.py --config configs/data/shared.toml --workers 1 2 \\
        --tasks 4 --out /tmp/llamaforge-bench-data --json bench-data.json

Each (workers, source) run starts from an empty output folder; the wall clock includes
process start-up, reading, every stage and tokenization. MB/s/core = raw input bytes (the
source's files on disk) / 1e6 / seconds / workers. A quiet machine with at least as many
free cores as the largest worker count is needed for meaningful numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

# Table 1's disk sizes (GB) by the source kind that prepares them
PAPER_GB = {
    "web": 3300 + 783,  # CommonCrawl (CCNet) + C4
    "code": 328,  # Github
    "wikipedia": 83,
    "books": 85,
    "arxiv": 92,
    "stackexchange": 78,
}
TASK_GB = 2.0  # input per task in the arithmetic (one CommonCrawl WET shard group)


def raw_bytes(cfg: Any, src: Any) -> int:
    from llamaforge.data.prepare import source_paths

    if src.kind == "stdlib_docs":
        return 0
    return sum(p.stat().st_size for p in source_paths(cfg, src) if p.is_file())


def run_source(cfg: Any, src: Any, out: Path, tasks: int, workers: int, split: int) -> dict:
    from llamaforge.data.prepare import prepare

    one = copy.deepcopy(cfg)
    one.sources = [copy.deepcopy(src)]
    one.output = str(out)
    one.executor.tasks, one.executor.workers, one.executor.split_bytes = tasks, workers, split
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    (meta,) = prepare(one, progress=False, log=lambda _m: None)
    seconds = time.perf_counter() - t0
    if not meta.get("complete"):
        return {"error": meta.get("error")}
    size = raw_bytes(cfg, src)
    return {
        "seconds": round(seconds, 3),
        "raw_mb": round(size / 1e6, 3),
        "mb_per_s_per_core": round(size / 1e6 / seconds / workers, 4),
        "documents_out": meta["clean"]["documents_out"],
        "tokens": meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"],
        "peak_rss_mb": meta["clean"].get("peak_rss_mb"),
    }


def datatrove_filters(cfg: Any, src: Any, out: Path, tasks: int, workers: int, split: int) -> dict:
    """datatrove's Gopher / C4 / FineWeb quality filters on the source's raw web pages."""
    from datatrove.data import Document
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    from llamaforge.data.base import FilterStats
    from llamaforge.data.pipeline import (
        _local_executor_class,
        iter_web_units,
        split_units,
        web_range_units,
    )
    from llamaforge.data.prepare import source_paths
    from llamaforge.data.web import web_options

    paths = source_paths(cfg, src)
    units = web_range_units(paths, src.options, split)
    bounds = split_units(units, tasks)
    opts = web_options(dict(src.options))

    class Pages(PipelineStep):
        name = "web pages"
        type = "📖 - READER"

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1):
            mine = [p for u in units[bounds[rank] : bounds[rank + 1]] for p in u]
            for i, (text, _) in enumerate(iter_web_units(mine, opts, FilterStats())):
                yield Document(text=text, id=str(i))

    class Count(PipelineStep):
        name = "count"
        type = "💽 - WRITER"

        def run(self, data: Any = None, rank: int = 0, world_size: int = 1):
            n = sum(1 for _ in data or ())
            (out / f"kept-{rank:05d}").write_text(str(n))
            return
            yield

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pipeline = [
        Pages(),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
        Count(),
    ]
    ex = _local_executor_class()(
        pipeline, tasks=tasks, workers=workers, logging_dir=str(out / "logs")
    )
    t0 = time.perf_counter()
    failed = ex.run_tasks()
    seconds = time.perf_counter() - t0
    if failed:
        return {"error": str(failed)}
    size = raw_bytes(cfg, src)
    return {
        "seconds": round(seconds, 3),
        "raw_mb": round(size / 1e6, 3),
        "mb_per_s_per_core": round(size / 1e6 / seconds / workers, 4),
        "documents_out": sum(int(p.read_text()) for p in out.glob("kept-*")),
    }


def arithmetic(rates: dict[str, float]) -> list[dict]:
    """Tasks, core-hours and disk for the paper's corpus at the measured rates."""
    rows = []
    for kind, gb in PAPER_GB.items():
        rate = rates.get(kind)
        if not rate:
            continue
        core_h = gb * 1e3 / rate / 3600
        rows.append(
            {
                "kind": kind,
                "input_gb": gb,
                "tasks": max(1, round(gb / TASK_GB)),
                "mb_per_s_per_core": rate,
                "core_hours": round(core_h, 1),
                # kinds with a dedup stage keep a copy of their documents until it is done
                "peak_disk_gb": round(gb * (2.0 if kind in ("web", "code", "books") else 1.0), 1),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/data/shared.toml")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tasks", type=int, default=4, help="tasks per source (all worker counts)")
    p.add_argument("--sources", help="comma-separated source names (default: all)")
    p.add_argument("--split-bytes", type=int, default=256 << 10, help="web byte-range size")
    p.add_argument("--out", default="/tmp/llamaforge-bench-data")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--no-datatrove-filters", action="store_true")
    a = p.parse_args()

    from llamaforge.data.prepare import load_data_config

    cfg = load_data_config(a.config)
    sources = [s for s in cfg.sources if not a.sources or s.name in a.sources.split(",")]
    out = Path(a.out)
    results: dict[str, Any] = {
        "config": a.config,
        "tasks": a.tasks,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "runs": [],
    }
    print(f"{'source':<14}{'kind':<19}{'workers':>8}{'raw MB':>9}{'s':>9}{'MB/s/core':>11}")
    for w in a.workers:
        for src in sources:
            r = run_source(cfg, src, out / f"w{w}" / src.name, a.tasks, w, a.split_bytes)
            r.update(source=src.name, kind=src.kind, workers=w)
            results["runs"].append(r)
            _row(r)
            if src.kind == "web" and not a.no_datatrove_filters:
                d = datatrove_filters(
                    cfg, src, out / f"w{w}" / "dt-filters", a.tasks, w, a.split_bytes
                )
                d.update(source=src.name, kind="datatrove-filters", workers=w)
                results["runs"].append(d)
                _row(d)
    best: dict[str, float] = {}
    for r in results["runs"]:
        if "mb_per_s_per_core" in r and r["workers"] == max(a.workers):
            best[r["kind"]] = r["mb_per_s_per_core"]
    results["paper_corpus"] = arithmetic(best)
    print(f"\nthe paper's corpus at the {max(a.workers)}-worker rates ({TASK_GB} GB a task):")
    for row in results["paper_corpus"]:
        print(
            f"  {row['kind']:<14}{row['input_gb']:>7} GB {row['tasks']:>6} tasks "
            f"{row['core_hours']:>10} core-h  peak disk {row['peak_disk_gb']} GB"
        )
    total = sum(r["core_hours"] for r in results["paper_corpus"])
    print(f"  total {total:.0f} core-hours (+ tokens: 1.4T x 2 bytes = 2.8 TB of shards)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


def _row(r: dict) -> None:
    if "error" in r:
        print(f"{r['source']:<14}{r['kind']:<19}{r['workers']:>8}  FAILED: {r['error']}")
        return
    print(
        f"{r['source']:<14}{r['kind']:<19}{r['workers']:>8}{r['raw_mb']:>9.2f}"
        f"{r['seconds']:>9.2f}{r['mb_per_s_per_core']:>11.3f}"
    )


if __name__ == "__main__":
    main()
