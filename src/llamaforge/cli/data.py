"""``llamaforge data prepare/stats/show``: clean, tokenize and inspect training data."""

from __future__ import annotations

import argparse
import json
import sys

from llamaforge.cli.help import add_config_help


def _data_config() -> type:
    from llamaforge.data.config import DataConfig

    return DataConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``data`` command and its actions."""
    d = subparsers.add_parser("data", help="clean, tokenize and inspect training data")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dp = dsub.add_parser(
        "prepare",
        help="sources → cleaned text → token shards (see configs/data/)",
        description="Read every [[sources]] entry of CONFIG (TOML), clean it with its kind's "
        "filters, tokenize and write memory-mappable shards and meta.json per source. "
        "Re-running skips finished sources. With --tasks N (or an [executor] section) each "
        "source runs as datatrove stages of N tasks on local processes, Slurm or Ray, with "
        "the same output; a rerun redoes only unfinished tasks.",
        add_help=False,
    )
    add_config_help(dp, _data_config)
    dp.add_argument("config", help="data config (TOML)")
    dp.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    dp.add_argument("--quiet", action="store_true", help="no progress bars")
    dp.add_argument(
        "--force",
        action="store_true",
        help="re-tokenize an output folder prepared with another tokenizer",
    )
    dp.add_argument(
        "--executor",
        choices=("local", "slurm", "ray"),
        help="datatrove executor (the config's [executor] type; default local)",
    )
    dp.add_argument(
        "--tasks",
        type=int,
        help="datatrove tasks per source (0: the in-process path, no datatrove; default 0)",
    )
    dp.add_argument("--workers", type=int, help="tasks run at once (default 1)")
    dp.add_argument("--logging-dir", help="datatrove logs and completion marks (OUTPUT/_datatrove)")
    dp.set_defaults(func=_prepare)
    ds = dsub.add_parser("stats", help="the paper's Table 1 for a run of N tokens")
    ds.add_argument("data_dir", help="prepared data folder (the config's output)")
    ds.add_argument("--tokens", type=float, required=True, help="tokens in the run, e.g. 1.4e12")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(func=_stats)
    dw = dsub.add_parser("show", help="print the first cleaned documents of a source")
    dw.add_argument("data_dir", help="prepared data folder")
    dw.add_argument("--source", required=True)
    dw.add_argument("-n", type=int, default=3)
    dw.add_argument("--split", default="train", choices=("train", "val"))
    dw.add_argument("--tokenizer", help="default: the one named in meta.json")
    dw.add_argument("--max-chars", type=int, default=2000, help="cut each document (0: no cut)")
    dw.set_defaults(func=_show)


def _prepare(a: argparse.Namespace) -> int:
    from llamaforge.data.config import check_config, load_data_config
    from llamaforge.data.prepare import prepare

    cfg = load_data_config(a.config, a.overrides)
    for flag, key in (("executor", "type"), ("tasks", "tasks"), ("workers", "workers")):
        if getattr(a, flag) is not None:
            setattr(cfg.executor, key, getattr(a, flag))
    if a.logging_dir is not None:
        cfg.executor.logging_dir = a.logging_dir
    check_config(cfg)
    print(f"preparing {len(cfg.sources)} source(s) into {cfg.output}")
    results = prepare(cfg, progress=not a.quiet, force=a.force)
    failed = [r["name"] for r in results if not r.get("complete") and "submitted" not in r]
    if failed:
        print(f"failed sources: {', '.join(failed)}", file=sys.stderr)
        return 1
    if not any("submitted" in r for r in results):  # a Slurm job still has to run
        from llamaforge.cli.train import pretrain_command

        print(f"next: {pretrain_command(cfg.output, cfg.tokenizer, a.config)}")
    return 0


def _stats(a: argparse.Namespace) -> int:
    from llamaforge.data.report import format_table1, table1

    rows = table1(a.data_dir, int(a.tokens))
    print(json.dumps(rows, indent=2) if a.json else format_table1(rows, int(a.tokens)))
    return 0


def _show(a: argparse.Namespace) -> int:
    from llamaforge.cli.main import tokenizer_path
    from llamaforge.data.report import first_documents

    docs = first_documents(a.data_dir, a.source, a.n, tokenizer_path(a.tokenizer), a.split)
    for i, doc in enumerate(docs):
        text = doc if a.max_chars <= 0 or len(doc) <= a.max_chars else doc[: a.max_chars] + " …"
        print(f"=== {a.source} document {i} ({len(doc)} characters)\n{text}")
    return 0
