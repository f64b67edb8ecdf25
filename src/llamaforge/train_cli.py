"""The training commands — ``quickstart``, ``pretrain`` — registered with the CLI. Their
modules import torch, so they are imported only when a command runs (or its --help)."""

from __future__ import annotations

import argparse

from .cli import flag_overrides
from .config import add_config_help


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_quickstart(subparsers)
    _register_pretrain(subparsers)


def _quickstart_config() -> type:
    from .quickstart import QuickstartConfig

    return QuickstartConfig


def _pretrain_config() -> type:
    from .pretrain import PretrainConfig

    return PretrainConfig


def _register_quickstart(subparsers: argparse._SubParsersAction) -> None:
    """``llamaforge quickstart [--out DIR] [KEY=VALUE ...]``."""
    p = subparsers.add_parser(
        "quickstart",
        help="corpus → tokenizer → train a small LLaMA → checkpoint → samples, on this machine",
        description="Build a corpus from the Python standard library, train a tokenizer and a "
        "small LLaMA on it with `llamaforge pretrain`, report validation loss against the "
        "unigram baseline, save a checkpoint and print samples. Defaults come from the "
        "packaged quickstart.toml; any setting is a KEY=VALUE override (e.g. steps=200 "
        "model.dim=96 device=cpu).",
        add_help=False,
    )
    add_config_help(p, _quickstart_config, "Settings (quickstart.toml's values):")
    p.add_argument("--out", help="run directory (same as out=...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_quickstart)


def _quickstart(a: argparse.Namespace) -> int:
    """Exit 0 when the model beats the unigram baseline."""
    from .quickstart import quickstart_config, run_quickstart

    summary = run_quickstart(quickstart_config([*a.overrides, *flag_overrides(a, "out")]))
    return 0 if summary["val_loss"] < summary["unigram_loss"] else 1


def _register_pretrain(subparsers: argparse._SubParsersAction) -> None:
    """``llamaforge pretrain [CONFIG] [KEY=VALUE ...] [--resume R] [--out DIR]``."""
    p = subparsers.add_parser(
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
        p,
        _pretrain_config,
        "Settings and defaults (TOML tables for the dotted ones; model.* null = the "
        "preset's value):",
    )
    p.add_argument("config", nargs="?", help="a TOML file (configs/pretrain/*.toml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--resume", help="same as resume=...: auto (the default), none, or a step-N dir")
    p.add_argument("--out", help="same as out=...: the run directory")
    p.set_defaults(func=_pretrain)


def _pretrain(a: argparse.Namespace) -> int:
    from .config import load_config
    from .pretrain import PretrainConfig, run_pretrain

    config, overrides = a.config, list(a.overrides)
    if config is not None and "=" in config:  # no config file, only overrides
        config, overrides = None, [config, *overrides]
    run_pretrain(
        load_config(PretrainConfig, config, [*overrides, *flag_overrides(a, "resume", "out")])
    )
    return 0
