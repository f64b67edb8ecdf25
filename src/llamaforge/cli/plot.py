"""``llamaforge plot RUN_DIR``: a run's loss curve."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``plot`` command."""
    pl = subparsers.add_parser("plot", help="loss curve (train and validation vs tokens) of a run")
    pl.add_argument("run_dir", help="a run directory with metrics.jsonl")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/loss.png)")
    pl.set_defaults(func=_plot)


def _plot(a: argparse.Namespace) -> int:
    from llamaforge.training.metrics import plot_run

    print(plot_run(a.run_dir, a.out))
    return 0
