"""``llamaforge eval``: evaluate a native checkpoint on the paper's benchmarks.

    llamaforge eval --ckpt DIR --tasks arc_easy,hellaswag [--shots K] [--limit N]
                    [--data-dir D] [--output OUT.json] [--report OUT.md] ...

The data directory defaults to $LLAMAFORGE_EVAL_DATA, else $LLAMAFORGE_SHARED_DATA/eval.
A task whose files are not there is read from its public Hugging Face dataset
(`hub.HUB`, through ``datasets`` and its cache); ``--data-source local|hub`` forces one.
Results go to --output (JSON) and the markdown tables to stdout (and --report).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llamaforge.cli.loading import add_trust_args
from llamaforge.eval.base import EvalError
from llamaforge.eval.hub import default_data_dir, local_data_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``eval`` command."""
    p = subparsers.add_parser(
        "eval",
        help="the paper's benchmarks on a checkpoint",
        description="Evaluate a checkpoint on the paper's benchmarks. Each task reads its "
        "files from the data directory ($LLAMAFORGE_EVAL_DATA, else "
        "$LLAMAFORGE_SHARED_DATA/eval, or --data-dir) when they are there, else its public "
        "Hugging Face dataset through `datasets` (downloaded once into its cache; "
        "HF_DATASETS_OFFLINE=1 reads the cache alone). The results JSON records each task's "
        "data source (the dataset id, config, split and revision). --list-tasks shows every "
        "task with its options.",
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
    p.add_argument(
        "--data-source",
        choices=("auto", "local", "hub"),
        default="auto",
        help="auto (default): the data directory when it has the task's files, else the "
        "Hugging Face dataset; local: the data directory only; hub: the Hugging Face "
        "dataset only",
    )
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--report", help="write the markdown report here")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU)"
    )
    add_trust_args(p)
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
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallelism: split the model over N processes (run under torchrun "
        "--nproc_per_node N; rank 0 writes; no results cache)",
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
    from llamaforge.config import ConfigError, parse_value

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        task, dot, opt = key.strip().partition(".")
        if not eq or not dot or not task or not opt or "." in opt:
            raise ConfigError(f"--task-option {item!r}: expected TASK.KEY=VALUE")
        out.setdefault(task, {})[opt] = parse_value(raw.strip())
    return out


PAPER_TABLES = {
    "3": "3 common sense",
    "4": "4 NaturalQuestions",
    "5": "5 TriviaQA",
    "6": "6 RACE",
    "7": "7 math",
    "8": "8 code",
    "9": "9 MMLU",
    "11": "11 RealToxicity",
    "12": "12 CrowS-Pairs",
    "13": "13 WinoGender",
    "14": "14 TruthfulQA",
    "-": "- (not in paper)",
}


def _list_tasks() -> int:
    from llamaforge.eval.hub import HUB
    from llamaforge.eval.tasks import TASKS

    print(
        "Tasks with the paper's table they appear in, default shots, main metric and the "
        "Hugging Face dataset read when the data directory lacks the task's files; then "
        "their options (--task-option TASK.KEY=VALUE). Every task also takes "
        "TASK.path=FILE: the evaluated file, absolute or relative to --data-dir.\n"
    )
    rows = [("task", "paper table", "shots", "metric", "Hugging Face dataset (when no local copy)")]
    for name in sorted(TASKS):
        info = getattr(TASKS[name], "info", None)
        if info is None:  # `info` is set per instance by some tasks
            rows.append((name, "", "", "", ""))
            continue
        hub = HUB.get(name)
        first = hub.splits[0] if hub else None
        dataset = "- (local files only)"
        if hub and first:
            splits = " + ".join(s.split for s in hub.splits)
            dataset = f"{first.dataset}" + (f" {first.config}" if first.config else "")
            dataset += f" {splits}"
        rows.append(
            (
                name,
                PAPER_TABLES.get(info.table, info.table),
                str(info.default_shots),
                info.main_metric,
                dataset,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if j == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * len(r[-1]))
    print()
    for name in sorted(TASKS):
        options_help = getattr(TASKS[name], "options_help", None)
        if options_help is not None:
            lines = options_help(common=False).splitlines()[1:]
            if lines:
                print(f"{name} options:")
                for line in lines:
                    print(f"    {name}.{line.strip()}")
    return 0


def resolve_task_data(
    names: list[str],
    options: dict[str, dict[str, Any]],
    local: Path | None,
    mode: str = "auto",
    hub_dir: Path | None = None,
) -> dict[str, tuple[Path, tuple[str, ...], dict[str, Any]]]:
    """Per task not read from ``local``: its Hugging Face data (folder, files, source), the
    options that layout needs merged into ``options`` (the user's win). ``mode`` auto: the
    local folder when it holds the task's files (or the user gave TASK.path), else the Hub;
    local: never the Hub; hub: always."""
    from llamaforge.eval.hub import fetch_task_data, hub_source
    from llamaforge.eval.tasks import TASKS

    out: dict[str, tuple[Path, tuple[str, ...], dict[str, Any]]] = {}
    for name in names:
        if name not in TASKS:
            continue  # get_task names the unknown task
        user = options.get(name, {})
        files = TASKS[name].info.files
        has_local = local is not None and all((local / f).exists() for f in files)
        if mode == "local" or (mode == "auto" and (has_local or "path" in user)):
            continue
        if hub_source(name) is None:
            where = f"{local} has no {files[0]}" if local is not None else "no --data-dir"
            raise EvalError(
                f"{name}: {where} and no Hugging Face dataset is known for it; pass "
                "--data-dir with a local copy"
            )
        hd = fetch_task_data(name, hub_dir)
        out[name] = (hd.data_dir, hd.files, hd.source)
        options[name] = {**hd.options, **user}
    return out


def run(a: argparse.Namespace) -> int:
    if a.list_tasks:
        return _list_tasks()
    if not a.ckpt:
        raise ValueError("--ckpt DIR is required")
    if not a.tasks:
        raise ValueError("--tasks is required (comma-separated names; see --list-tasks)")
    from llamaforge.checkpoint.native import CheckpointError

    if not Path(a.ckpt).is_dir():
        raise CheckpointError(f"{a.ckpt}: no such checkpoint directory (--ckpt)")
    names = [t.strip() for t in a.tasks.split(",") if t.strip()]
    tasks, data_dir, task_data = _tasks_and_data(a, names)

    from llamaforge.eval.report import render
    from llamaforge.eval.runner import evaluate
    from llamaforge.files import atomic_write

    lm, rank = _language_model(a)
    results = evaluate(
        lm,
        tasks,
        data_dir,
        shots=a.shots,
        limit=a.limit,
        seed=a.seed,
        cache_dir=a.cache_dir,
        progress=not a.no_progress,
        # a result cached on one rank's view but not another's would desynchronise them
        use_cache=not a.no_cache and a.tp == 1,
        log_samples=a.log_samples,
        on_task=_print_task_line if rank == 0 else None,
        task_data=task_data,
    )
    if rank != 0:
        return 0
    if a.output:
        atomic_write(Path(a.output), json.dumps(results, indent=2) + "\n")
    report = render(results, title=f"Evaluation of {a.ckpt}")
    if a.report:
        atomic_write(Path(a.report), report)
    print(report, end="")
    return 0


def _data_dir(a: argparse.Namespace) -> Path | None:
    """The local data directory: --data-dir, else the environment's (None when that is not
    there: the Hub then); --data-source local needs one."""
    local = Path(a.data_dir) if a.data_dir else local_data_dir()
    if a.data_source == "local" and local is None:
        local = default_data_dir()  # the error that says how to name one
    if local is not None and not local.is_dir():
        if a.data_dir or a.data_source == "local":
            raise EvalError(f"{local}: no such data directory (--data-dir)")
        local = None  # an environment default that is not there: the Hub
    return local


def _tasks_and_data(a: argparse.Namespace, names: list[str]) -> tuple[list, Path, dict]:
    """The configured tasks, the data directory and the tasks' Hugging Face data (fetched
    only once names and options are known to be good)."""
    from llamaforge.eval.tasks import get_tasks

    options = parse_task_options(a.task_option)
    local = _data_dir(a)
    get_tasks(names, options)  # bad names and options fail before any download
    task_data = resolve_task_data(names, options, local, a.data_source)
    data_dir = local if local is not None else next(iter(task_data.values()))[0]
    return get_tasks(names, options), data_dir, task_data


def _language_model(a: argparse.Namespace) -> tuple[Any, int]:
    """The checkpoint as a LlamaforgeLM, on one device or (--tp) split over the torchrun
    processes, which all run every batch; and this process's rank."""
    from llamaforge.eval.lm import LlamaforgeLM

    if a.tp == 1:
        lm = LlamaforgeLM.from_checkpoint(
            a.ckpt,
            device=a.device,
            dtype=a.dtype,
            batch_size=a.batch_size,
            max_length=a.max_length,
            batch_tokens=a.batch_tokens,
            progress=not a.no_progress,
            sample_mode=a.sample_mode,
            strict=a.strict,
            force=a.force,
        )
        return lm, 0
    from llamaforge.cli.loading import load_tensor_parallel
    from llamaforge.device import resolve_device

    gpu = resolve_device(a.device).type == "cuda"
    dtype = a.dtype or ("bfloat16" if gpu else "float32")  # as from_checkpoint
    model, tok, rank = load_tensor_parallel(a.ckpt, a.tp, a.device, dtype, None, a.strict, a.force)
    lm = LlamaforgeLM(
        model,
        tok,
        batch_size=a.batch_size,
        max_length=a.max_length,
        batch_tokens=a.batch_tokens,
        progress=not a.no_progress and rank == 0,
        ckpt_dir=a.ckpt,
        sample_mode=a.sample_mode,
        share_context=False,  # a shared prefix's KV cache is sized for whole heads
    )
    return lm, rank


def _print_task_line(name: str, entry: dict[str, Any]) -> None:
    """A task's main metric on stderr once it is done."""
    main = entry["metrics"].get(entry["main_metric"], {})
    how = "cached" if entry.get("cached") else f"{entry['seconds']:.1f}s"
    print(
        f"{name}: {entry['main_metric']} = {main.get('value')} ({entry['n_docs']} docs, {how})",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """``llamaforge eval ARGS``: the same as ``llamaforge.cli.main(["eval", *ARGS])``."""
    from llamaforge.cli.main import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
