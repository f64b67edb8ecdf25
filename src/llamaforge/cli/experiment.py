"""``llamaforge experiment run/report``: the study of the paper's claims (science/)."""

from __future__ import annotations

import argparse

EXPERIMENTS = ("ladder", "norm", "scaling")
CORPORA = ("stdlib", "shared")


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``experiment`` command and its actions."""
    e = subparsers.add_parser(
        "experiment", help="the paper's architecture and scaling claims, measured small"
    )
    esub = e.add_subparsers(dest="experiment_command", required=True, metavar="ACTION")
    run = esub.add_parser(
        "run",
        help="train the study's cells (finished ones are skipped; interrupted ones resume)",
        description="Train every unfinished cell of the study into OUT/cells: the ablation "
        "ladder from GPT-2's block to LLaMA's (lr sweep, then seeds at the best lr), pre- "
        "against post-norm over learning rates, and three LLaMA sizes on one token stream. "
        "Stop it at any time; the next run skips finished cells and resumes the others "
        "from their checkpoints. The published study (docs/science.md) took about 1 h 50 min on 2 "
        "cores.",
    )
    run.add_argument("--out", default="runs/science", help="study folder (default runs/science)")
    run.add_argument(
        "--only",
        default=",".join(EXPERIMENTS),
        help=f"comma-separated experiments to run (default {','.join(EXPERIMENTS)})",
    )
    run.add_argument(
        "--corpora",
        default=None,
        help="comma-separated corpora: stdlib (the Python standard library) and shared "
        "(../shared/data/pretrain, or $LLAMAFORGE_SHARED_DATA); default both",
    )
    run.add_argument("--jobs", type=int, default=2, help="cells trained at once (default 2)")
    run.add_argument(
        "--short",
        action="store_true",
        help="tiny sizes and budgets that check the machinery in seconds (not results)",
    )
    run.set_defaults(func=_run)
    rep = esub.add_parser(
        "report",
        help="tables, plots and a verdict per claim from the finished cells",
        description="Write the study's results (mean ± std over seeds, the claims' "
        "verdicts, plots) into PAGE between its <!-- results:start/end --> markers, keeping "
        "the text around them, and the plots into PAGE's science/ folder.",
    )
    rep.add_argument("--out", default="runs/science", help="study folder (default runs/science)")
    rep.add_argument("--page", default=None, help="markdown page to write (default OUT/science.md)")
    rep.set_defaults(func=_report)


def _choices(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    picked = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        raise ValueError(f"{flag} {value!r}: expected a comma-separated subset of {allowed}")
    return picked


def _run(a: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from llamaforge.science.study import FULL, SHORT, run_study

    if a.jobs < 1:
        raise ValueError(f"--jobs {a.jobs}: expected at least 1")
    only = _choices(a.only, EXPERIMENTS, "--only")
    sc = SHORT if a.short else FULL
    if a.corpora is not None:
        sc = replace(sc, corpora=tuple(_choices(a.corpora, CORPORA, "--corpora")))
    out = Path(a.out)
    progress = run_study(sc, out, only, jobs=a.jobs)
    print(
        f"{progress.done} cells trained, {progress.skipped} already done, "
        f"{len(progress.failed)} failed"
    )
    for line in progress.failed:
        print(f"failed: {line}")
    print(f"next: llamaforge experiment report --out {out}")
    return 1 if progress.failed else 0


def _report(a: argparse.Namespace) -> int:
    from pathlib import Path

    from llamaforge.science.report import write_page

    out = Path(a.out)
    page = write_page(out, Path(a.page) if a.page else out / "science.md")
    print(f"wrote {page} and its plots in {page.parent / 'science'}")
    print(f"next: cat {page}")
    return 0
