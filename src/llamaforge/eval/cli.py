"""``llamaforge eval``: evaluate a native checkpoint on the paper's benchmarks.

    llamaforge eval --ckpt DIR --tasks arc_easy,hellaswag [--shots K] [--limit N]
                    [--data-dir D] [--output OUT.json] [--report OUT.md] ...

The data directory defaults to $LLAMAFORGE_EVAL_DATA, else $LLAMAFORGE_SHARED_DATA/eval.
Results go to --output (JSON) and the markdown tables to stdout (and --report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .base import EvalError


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``eval`` command."""
    p = subparsers.add_parser(
        "eval",
        help="the paper's benchmarks on a checkpoint",
        description="Evaluate a checkpoint on the paper's benchmarks. The data directory "
        "defaults to $LLAMAFORGE_EVAL_DATA, else $LLAMAFORGE_SHARED_DATA/eval; --list-tasks "
        "shows every task with its options.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="native checkpoint directory")
    p.add_argument("--tasks", help="comma-separated task names (see --list-tasks)")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples (default: paper's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N docs per task")
    p.add_argument(
        "--data-dir",
        default=None,
        help="benchmark data (default: $LLAMAFORGE_EVAL_DATA, else $LLAMAFORGE_SHARED_DATA/eval)",
    )
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--report", help="write the markdown report here")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU)"
    )
    p.add_argument(
        "--batch-tokens", type=int, default=None, help="scoring batch budget, rows × padded length"
    )
    p.add_argument("--batch-size", type=int, default=None, help="cap on rows per batch")
    p.add_argument("--max-length", type=int, default=None, help="context length to use")
    p.add_argument(
        "--sample-mode",
        choices=("per_sample", "per_request"),
        default="per_sample",
        help="seeding of sampled generations (per_request: batched, faster)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument(
        "--cache-dir", default=None, help="results cache (default ~/.cache/llamaforge/eval)"
    )
    p.add_argument("--seed", type=int, default=1234, help="few-shot and sampling seed")
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="TASK.KEY=VALUE",
        help="a task option, e.g. gsm8k.maj_k=8 or mmlu.subjects=anatomy,virology (values "
        "as in KEY=VALUE overrides: TOML literals, else strings; --list-tasks shows each "
        "task's options); repeatable",
    )
    p.add_argument("--log-samples", action="store_true", help="add per-doc results to the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--list-tasks", action="store_true", help="list the tasks and their options, and exit"
    )


def parse_task_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """["gsm8k.maj_k=8", "mmlu.subjects=[\"anatomy\"]"] → {"gsm8k": {"maj_k": 8}, ...}.

    Values are parsed like every ``KEY=VALUE`` override (``config.parse_value``: TOML
    literals, else plain strings); the task's options class then checks and coerces them."""
    from ..config import ConfigError, parse_value

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        task, dot, opt = key.strip().partition(".")
        if not eq or not dot or not task or not opt or "." in opt:
            raise ConfigError(f"--task-option {item!r}: expected TASK.KEY=VALUE")
        out.setdefault(task, {})[opt] = parse_value(raw.strip())
    return out


def default_data_dir() -> Path:
    env = os.environ.get("LLAMAFORGE_EVAL_DATA")
    if env:
        return Path(env)
    shared = os.environ.get("LLAMAFORGE_SHARED_DATA")
    if shared:
        return Path(shared) / "eval"
    raise EvalError(
        "no benchmark data directory: pass --data-dir, or set LLAMAFORGE_EVAL_DATA "
        "(or LLAMAFORGE_SHARED_DATA, whose eval/ folder is used)"
    )


def _list_tasks() -> int:
    from .tasks import TASKS

    print(
        "Tasks, their paper table, shots and main metric, and their options "
        "(--task-option TASK.KEY=VALUE). Every task also takes TASK.path=FILE: the evaluated "
        "file, absolute or relative to --data-dir, e.g. a full public set.\n"
    )
    for name in sorted(TASKS):
        info = getattr(TASKS[name], "info", None)
        if info is None:  # `info` is set per instance by some tasks
            print(name)
            continue
        print(f"{name:24} table {info.table:>3}  {info.default_shots:>2}-shot  {info.main_metric}")
        options_help = getattr(TASKS[name], "options_help", None)
        if options_help is not None:
            for line in options_help(common=False).splitlines()[1:]:
                print(f"    {name}.{line.strip()}")
    return 0


def run(a: argparse.Namespace) -> int:
    if a.list_tasks:
        return _list_tasks()
    if not a.ckpt:
        raise ValueError("--ckpt DIR is required")
    if not a.tasks:
        raise ValueError("--tasks is required (comma-separated names; see --list-tasks)")
    from ..checkpoint import CheckpointError

    if not Path(a.ckpt).is_dir():
        raise CheckpointError(f"{a.ckpt}: no such checkpoint directory (--ckpt)")
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    options = parse_task_options(a.task_option)
    data_dir = Path(a.data_dir) if a.data_dir else default_data_dir()
    if not data_dir.is_dir():
        raise EvalError(f"{data_dir}: no such data directory (--data-dir)")

    from .tasks import get_task

    tasks = [get_task(n, **options.pop(n, {})) for n in names]  # bad names fail before loading
    if options:
        raise EvalError(f"--task-option for task(s) not in --tasks: {sorted(options)}")

    from .lm import LlamaforgeLM
    from .report import render
    from .runner import evaluate

    lm = LlamaforgeLM.from_checkpoint(
        a.ckpt,
        device=a.device,
        dtype=a.dtype,
        batch_size=a.batch_size,
        max_length=a.max_length,
        batch_tokens=a.batch_tokens,
        progress=not a.no_progress,
        sample_mode=a.sample_mode,
    )

    def done(name: str, entry: dict[str, Any]) -> None:
        main = entry["metrics"].get(entry["main_metric"], {})
        how = "cached" if entry.get("cached") else f"{entry['seconds']:.1f}s"
        print(
            f"{name}: {entry['main_metric']} = {main.get('value')} ({entry['n_docs']} docs, {how})",
            file=sys.stderr,
        )

    results = evaluate(
        lm,
        tasks,
        data_dir,
        shots=a.shots,
        limit=a.limit,
        seed=a.seed,
        cache_dir=a.cache_dir,
        progress=not a.no_progress,
        use_cache=not a.no_cache,
        log_samples=a.log_samples,
        on_task=done,
    )
    from ..files import atomic_write

    if a.output:
        atomic_write(Path(a.output), json.dumps(results, indent=2) + "\n")
    report = render(results, title=f"Evaluation of {a.ckpt}")
    if a.report:
        atomic_write(Path(a.report), report)
    print(report, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``llamaforge eval ARGS``: the same as ``llamaforge.cli.main(["eval", *ARGS])``."""
    from ..cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
