"""The ``llamaforge`` command line: one subcommand per job.

Each command lives in the module that owns it, which registers it with
``register(subparsers)``: it adds its subparser(s) and sets ``func``, the handler
``(argparse.Namespace) -> int`` (the exit status). Command modules import nothing heavy
(torch, sentencepiece ...) at module level, so ``llamaforge --help`` stays cheap; handlers
import what they need. Errors become exit codes here, in `main`, and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# module -> the commands it registers (in the order `llamaforge --help` lists them)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("llamaforge.cli", "quickstart, pretrain"),  # moves to quickstart.py / pretrain.py
    ("llamaforge.eval.cli", "eval"),
    ("llamaforge.metrics", "plot"),
    ("llamaforge.checkpoint_cli", "info, init, generate"),
    ("llamaforge.convert.cli", "convert"),
    ("llamaforge.data.cli", "data prepare/stats/show"),
    ("llamaforge.tokenizer_cli", "tokenizer train/encode/decode"),
)

# usage, configuration and input errors: one line on stderr, exit status 2
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # ConfigError, DataError, EvalError, CheckpointError are ValueErrors
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


# ----------------------------------------------------------------------------- pretrain,
# quickstart: moves to pretrain.py / quickstart.py (as their `register`)


def _pretrain_config() -> type:
    from .pretrain import PretrainConfig

    return PretrainConfig


def _quickstart_config() -> type:
    from .quickstart import QuickstartConfig

    return QuickstartConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """``quickstart`` and ``pretrain``.  # moves to quickstart.py / pretrain.py"""
    from .config import add_config_help

    q = subparsers.add_parser(
        "quickstart",
        help="corpus → tokenizer → train a small LLaMA → checkpoint → samples, on this machine",
        description="Build a corpus from the Python standard library, train a tokenizer and a "
        "small LLaMA on it, report validation loss against the unigram baseline, save a "
        "checkpoint and print samples. Settings are KEY=VALUE overrides (e.g. steps=200 "
        "dim=96 device=cpu).",
        add_help=False,
    )
    add_config_help(q, _quickstart_config)
    q.add_argument("--out", help="run directory (same as out=...)")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    q.set_defaults(func=_quickstart)

    pt = subparsers.add_parser(
        "pretrain",
        help="train a LLaMA from scratch on prepared data (one process, or many via torchrun)",
        description="Pretrain with the paper's recipe (AdamW 0.9/0.95, wd 0.1, clip 1.0, "
        "warmup + cosine to 10 %) on shards from `llamaforge data prepare`. Writes "
        "OUT/metrics.jsonl, OUT/checkpoints/step-N (resumable; resume=auto by default), "
        "OUT/model (native checkpoint), OUT/loss.png and OUT/summary.json.",
        epilog="Many processes: torchrun --nproc_per_node N -m llamaforge pretrain CONFIG "
        "[KEY=VALUE ...] (FSDP2 by default; parallel=ddp for DDP).",
        add_help=False,
    )
    add_config_help(
        pt,
        _pretrain_config,
        "Settings and defaults (TOML tables for the dotted ones; model.* null = the "
        "preset's value):",
    )
    pt.add_argument("config", nargs="?", help="a TOML file (configs/pretrain/*.toml)")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    pt.add_argument(
        "--resume", help="same as resume=...: auto (the default), none, or a step-N dir"
    )
    pt.add_argument("--out", help="same as out=...: the run directory")
    pt.set_defaults(func=_pretrain)


def _flag_overrides(a: argparse.Namespace, *names: str) -> list[str]:
    """``--resume X`` / ``--out Y`` as the overrides ``resume=X`` / ``out=Y``."""
    return [f"{k}={getattr(a, k)}" for k in names if getattr(a, k) is not None]


def _quickstart(a: argparse.Namespace) -> int:
    from .config import apply_overrides
    from .quickstart import QuickstartConfig, run_quickstart

    cfg = apply_overrides(QuickstartConfig(), a.overrides + _flag_overrides(a, "out"))
    summary = run_quickstart(cfg)
    return 0 if summary["val_loss"] < summary["unigram_loss"] else 1


def _pretrain(a: argparse.Namespace) -> int:
    from .pretrain import main as pretrain_main

    config = [a.config] if a.config else []
    return pretrain_main(config + a.overrides + _flag_overrides(a, "resume", "out"))


# ----------------------------------------------------------------------------- the tree


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaforge",
        description="LLaMA (Touvron et al. 2023) in PyTorch: data, tokenizer, pretraining, "
        "evaluation, conversion and generation.",
    )
    p.add_argument("--version", action="version", version=f"llamaforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module, _ in COMMANDS:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``llamaforge ARGV``; the exit status: the handler's, 2 for a usage, config or
    input error (one ``llamaforge CMD: error: ...`` line on stderr), an exception's integer
    ``exit_code`` attribute (e.g. 1 for a training failure), 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        a, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # --help, --version, argparse's own usage errors (status 2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    # KEY=VALUE overrides may come after --flags (argparse stops a positional list at them)
    if unknown and hasattr(a, "overrides") and all("=" in u and u[0] != "-" for u in unknown):
        a.overrides += unknown
    elif unknown:
        try:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 2
    what = " ".join(v for k, v in vars(a).items() if k.endswith("command") and v)
    try:
        return int(a.func(a))
    except KeyboardInterrupt:
        print(f"llamaforge {what}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if isinstance(code, int) and not isinstance(code, bool):
            print(f"llamaforge {what}: error: {e}", file=sys.stderr)
            return code
        if isinstance(e, USAGE_ERRORS):
            print(f"llamaforge {what}: error: {e}", file=sys.stderr)
            return 2
        raise
