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
import re
import sys

from llamaforge import __version__

# module -> the commands it registers (in the order `llamaforge --help` lists them)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("llamaforge.cli.train", "quickstart, pretrain"),
    ("llamaforge.cli.eval", "eval"),
    ("llamaforge.cli.plot", "plot"),
    ("llamaforge.cli.checkpoint", "info, init, generate"),
    ("llamaforge.cli.chat", "chat"),
    ("llamaforge.cli.serve", "serve"),
    ("llamaforge.cli.convert", "convert"),
    ("llamaforge.cli.data", "data prepare/stats/show"),
    ("llamaforge.cli.tokenizer", "tokenizer train/encode/decode"),
    ("llamaforge.cli.experiment", "experiment run/report"),
)

# usage, configuration and input errors: one line on stderr, exit status 2
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # ConfigError, DataError, EvalError, CheckpointError are ValueErrors
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


# commands whose failures (a disk filling up mid-run, a checkpoint write) exit with 1
TRAINING_COMMANDS = frozenset({"quickstart", "quickstart-instruct", "pretrain", "finetune"})

# libraries whose exceptions (RuntimeError from pybind/Rust, their own types) are reported
# as one line at the command boundary rather than as a traceback
LIBRARIES = frozenset({"torch", "sentencepiece", "gguf", "safetensors", "safetensors_rust"})


# distributions imported under another name than their own (scikit-learn: sklearn)
IMPORT_NAMES = {
    "scikit-learn": "sklearn",
    "protobuf": "google.protobuf",
    "llama-cpp-python": "llama_cpp",
}


def optional_dependencies() -> dict[str, list[str]]:
    """pyproject.toml's ``[project.optional-dependencies]``: each extra's distribution names
    (requirements on llamaforge itself left out). Read from the source tree's pyproject.toml
    when this package runs from a checkout, else from the installed distribution's metadata;
    empty when neither is found."""
    from pathlib import Path

    name = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
    extras: dict[str, list[str]] = {}
    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    table = None
    if pyproject.is_file():
        from llamaforge.config import tomllib

        try:
            project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        except (OSError, ValueError):
            project = {}
        if project.get("name") == "llamaforge":
            table = project.get("optional-dependencies", {})
    if table is None:  # an installed package: Requires-Dist: fastapi>=0.110; extra == "serve"
        from importlib import metadata

        try:
            requires = metadata.requires("llamaforge") or []
        except metadata.PackageNotFoundError:
            requires = []
        table = {}
        for req in requires:
            extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
            if extra:
                table.setdefault(extra.group(1), []).append(req)
    for extra, reqs in table.items():
        dists = [m.group(1) for m in map(name.match, reqs) if m]
        extras[extra] = [d for d in dists if d.lower() != "llamaforge"]
    return extras


def missing_extra(e: BaseException, command: str = "") -> str | None:
    """The extra that installs the module a ModuleNotFoundError names (``fastapi`` →
    ``serve``), or None when no extra does; among several, the one named like ``command``'s
    first word (``datasets`` is in ``data`` and ``eval``), else the first."""
    missing = getattr(e, "name", None)
    if not isinstance(e, ModuleNotFoundError) or not missing:
        return None
    found = []
    for extra, dists in optional_dependencies().items():
        for dist in dists:
            module = IMPORT_NAMES.get(dist.lower(), re.sub(r"[-.]", "_", dist.lower()))
            # the module or one of its submodules (sklearn.utils), or the package around it
            if f"{missing}.".startswith(f"{module}.") or module.startswith(f"{missing}."):
                found.append(extra)
    first = command.split(" ")[0]
    return first if first in found else found[0] if found else None


def missing_extra_message(e: BaseException, command: str = "") -> str | None:
    """``this command needs the 'serve' extra (no module named fastapi): pip install
    'llamaforge[serve]'`` for a ModuleNotFoundError an extra would fix, else None."""
    extra = missing_extra(e, command)
    if extra is None:
        return None
    return (
        f"this command needs the '{extra}' extra (no module named {getattr(e, 'name', '')}): "
        f"pip install 'llamaforge[{extra}]'"
    )


def lm_eval_main(argv: list[str] | None = None) -> int:
    """``llamaforge-lm-eval``: lm-eval's command line with the "llamaforge" model registered
    (`llamaforge.eval.harness`); without the 'eval' extra, one line naming it (exit 2)."""
    try:
        from llamaforge.eval.harness import cli_main
    except ModuleNotFoundError as e:
        message = missing_extra_message(e, "eval")
        if message is None:
            raise
        print(f"llamaforge-lm-eval: error: {message}", file=sys.stderr)
        return 2
    cli_main(argv)
    return 0


def _debug(a: argparse.Namespace | None = None) -> bool:
    import os

    env = os.environ.get("LLAMAFORGE_DEBUG", "").strip().lower()
    return bool(getattr(a, "debug", False)) or env not in ("", "0", "false", "no")


def os_error_message(e: OSError) -> str:
    """One line for an OSError, naming its path: ``no space left on device: PATH``."""
    import errno

    if e.errno == errno.ENOSPC:
        what = "no space left on device"
    else:
        what = e.strerror or str(e)
    paths = [str(f) for f in (e.filename, e.filename2) if f is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else what


def _from_library(e: BaseException) -> bool:
    """Whether ``e`` was raised by one of `LIBRARIES`: its type is theirs, or a
    RuntimeError whose innermost Python frame is in their code."""
    if type(e).__module__.split(".")[0] in LIBRARIES:
        return True
    if not isinstance(e, RuntimeError):
        return False
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    name = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
    return str(name).split(".")[0] in LIBRARIES


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def error_message(e: BaseException) -> str | None:
    """The one-line message for an exception the command boundary reports (an OSError, a
    library's RuntimeError, DCP's CheckpointException), or None when it is not one."""
    if type(e).__name__ == "CheckpointException" and hasattr(e, "failures"):
        failures = e.failures or {}
        for rank, pair in sorted(failures.items()):
            inner = pair[0] if isinstance(pair, tuple) else pair
            if isinstance(inner, OSError):
                why = os_error_message(inner)
            else:
                why = f"{type(inner).__name__}: {_one_line(str(inner))}"
            return f"distributed checkpoint failed on rank {rank}: {why}"
        return "distributed checkpoint failed"
    if isinstance(e, OSError):
        return os_error_message(e)
    if _from_library(e):
        return f"{type(e).__name__}: {_one_line(str(e))}"
    return None


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
    p.add_argument(
        "--debug",
        action="store_true",
        help="print the full traceback of an error (also LLAMAFORGE_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module, _ in COMMANDS:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``llamaforge ARGV``; the exit status: the handler's, 2 for a usage, config or
    input error (one ``llamaforge CMD: error: ...`` line on stderr), an exception's integer
    ``exit_code`` attribute (e.g. 1 for a training failure), 130 on Ctrl-C, 2 with the extra
    to install for a module that one of pyproject.toml's extras provides. An OSError
    (``no space left on device: PATH``), a RuntimeError from torch, sentencepiece, gguf or
    safetensors, and DCP's CheckpointException are one line too: exit 1 for a training
    command, else 2. ``--debug`` or ``LLAMAFORGE_DEBUG=1`` prints the traceback as well.

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
            from llamaforge.threads import configure_threads

            configure_threads()
        return int(a.func(a))
    except KeyboardInterrupt:
        print(f"llamaforge {what}: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise
        code = getattr(e, "exit_code", None)
        if isinstance(code, int) and not isinstance(code, bool):
            message = str(e)
        elif isinstance(e, USAGE_ERRORS):
            message, code = str(e), 2
        elif (needs := missing_extra_message(e, what)) is not None:
            message, code = needs, 2
        else:
            message = error_message(e)  # type: ignore[assignment]
            if message is None:
                raise
            code = 1 if what.split(" ")[0] in TRAINING_COMMANDS else 2
        if _debug(a):
            import traceback

            traceback.print_exception(e)
        print(f"llamaforge {what}: error: {message}", file=sys.stderr)
        return code
