"""The ``llamaforge`` command line: one subcommand per job.

Each command lives in the module that owns it, which registers it with
``register(subparsers)``: it adds its subparser(s) and sets ``func``, the handler
``(argparse.Namespace) -> int`` (the exit status). Command modules import nothing heavy
(torch, sentencepiece ...) at module level, so ``llamaforge --help``, ``--version``, a usage
error and every ``--help`` that needs no config class run without importing torch
(tests/test_cli.py checks it); handlers import what they need. Errors become exit codes
here, in `main`, and nowhere else. Run as a program (``argv`` not given), `main` sets the
CPU threads before any command imports torch (`llamaforge.threads`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# module -> the commands it registers (in the order `llamaforge --help` lists them)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("llamaforge.train_cli", "quickstart, pretrain"),
    ("llamaforge.eval.cli", "eval"),
    ("llamaforge.metrics", "plot"),
    ("llamaforge.checkpoint_cli", "info, init, generate"),
    ("llamaforge.chat_cli", "chat"),
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


def flag_overrides(a: argparse.Namespace, *names: str) -> list[str]:
    """``--resume X`` / ``--out Y`` as the overrides ``resume=X`` / ``out=Y`` (last wins)."""
    return [f"{k}={getattr(a, k)}" for k in names if getattr(a, k) is not None]


def tokenizer_path(path: str | None) -> str | None:
    """A ``--tokenizer``/``--model`` argument: a SentencePiece ``.model`` file, or a folder
    holding ``tokenizer.model`` (Meta's download, a Hugging Face LLaMA repository, a native
    checkpoint) that stands for it."""
    if path is None:
        return None
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.model").is_file():
            raise FileNotFoundError(
                f"{p}: a folder without tokenizer.model (expected the SentencePiece model "
                "of Meta's download or of a Hugging Face LLaMA repository, or the file itself)"
            )
        return str(p / "tokenizer.model")
    return str(p)


# ----------------------------------------------------------------------------- the tree


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaforge",
        description="LLaMA (Touvron et al. 2023) in PyTorch: data preparation, tokenizers, "
        "pretraining, instruction finetuning and LoRA, the paper's evaluations, checkpoint "
        "conversion (Meta, Hugging Face, GGUF, llama2.c), generation and chat.",
        epilog="`llamaforge COMMAND --help` describes a command. CPU threads: "
        "LLAMAFORGE_THREADS=N (default: the cores this process may use, divided by the "
        "processes per node under torchrun; OMP_WAIT_POLICY=PASSIVE unless set).",
    )
    p.add_argument("--version", action="version", version=f"llamaforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module, _ in COMMANDS:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``llamaforge ARGV``; the exit status: the handler's, 2 for a usage, config or
    input error (one ``llamaforge CMD: error: ...`` line on stderr), an exception's integer
    ``exit_code`` attribute (e.g. 1 for a training failure), 130 on Ctrl-C.

    Without ``argv`` (the program's entry point: ``llamaforge``, ``python -m llamaforge``,
    torchrun) the process's CPU threads are set first (`threads.configure_threads`); a call
    with an explicit ``argv`` (tests, other programs) leaves the caller's threads alone."""
    entry = argv is None
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
        if entry:
            from .threads import configure_threads

            configure_threads()
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
