"""The training commands — ``quickstart``, ``quickstart-instruct``,
``quickstart-preference``, ``pretrain``,
``finetune``, ``lora merge`` —
registered with the CLI. Their modules import torch, so they are imported only when a
command runs (or its --help)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamaforge.cli.help import add_config_help
from llamaforge.cli.main import flag_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_quickstart(subparsers)
    _register_quickstart_instruct(subparsers)
    _register_quickstart_preference(subparsers)
    _register_pretrain(subparsers)
    _register_finetune(subparsers)
    _register_lora(subparsers)


def _quickstart_config() -> type:
    from llamaforge.demos.quickstart import QuickstartConfig

    return QuickstartConfig


def _quickstart_instruct_config() -> type:
    from llamaforge.demos.instruct import QuickstartInstructConfig

    return QuickstartInstructConfig


def _finetune_config() -> type:
    from llamaforge.finetune.run import FinetuneConfig

    return FinetuneConfig


def _pretrain_config() -> type:
    from llamaforge.training.pretrain import PretrainConfig

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
    from llamaforge.demos.quickstart import quickstart_config, run_quickstart

    summary = run_quickstart(quickstart_config([*a.overrides, *flag_overrides(a, "out")]))
    return 0 if summary["val_loss"] < summary["unigram_loss"] else 1


# the flags of a --dry-run (each an error without it)
PLAN_FLAGS = ("world_size", "gpu", "gpu_memory", "mfu", "preset", "examples", "json")


def _training_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    config_class: Callable[[], type],
    intro: str,
    run: Callable[[str | None, list[str]], None],
    plan: Callable[[str | None, list[str], argparse.Namespace], dict[str, Any]],
    **parser_kwargs: Any,
) -> None:
    """``llamaforge NAME [CONFIG] [KEY=VALUE ...] [--resume R] [--out DIR]``: a TOML config,
    overrides, and two flags that are overrides too; ``--dry-run`` prints ``plan``'s plan
    instead of running."""
    p = subparsers.add_parser(name, add_help=False, **parser_kwargs)
    add_config_help(p, config_class, intro)
    p.add_argument("config", nargs="?", help=f"a TOML file (configs/{name}/*.toml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--resume", help="same as resume=...: auto (the default), none, or a step-N dir")
    p.add_argument("--out", help="same as out=...: the run directory")
    _add_plan_flags(p, examples=name == "finetune")

    def handler(a: argparse.Namespace) -> int:
        config, overrides = a.config, list(a.overrides)
        if config is not None and "=" in config:  # no config file: only overrides
            config, overrides = None, [config, *overrides]
        overrides += flag_overrides(a, "resume", "out")
        if a.dry_run:
            _print_plan(plan(config, overrides, a), as_json=a.json)
            return 0
        given = [f for f in PLAN_FLAGS if getattr(a, f, None) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ValueError(f"{flag}: a flag of the plan; add --dry-run (or leave it out)")
        run(config, overrides)
        return 0

    p.set_defaults(func=handler)


def _add_plan_flags(p: argparse.ArgumentParser, *, examples: bool) -> None:
    g = p.add_argument_group(
        "plan (--dry-run)",
        "Resolve the run as it would run (config, overrides, data) with the model on the "
        "meta device, print its plan and exit without training: tokens or examples, steps "
        "and epochs, the lr schedule, the layout, memory per GPU by component and the time "
        "at --mfu on --gpu. The model: init's params.json, else --preset.",
    )
    g.add_argument("--dry-run", action="store_true", help="print the plan; train nothing")
    g.add_argument(
        "--world-size",
        "--gpus",
        dest="world_size",
        type=int,
        metavar="N",
        help="GPUs (processes) to plan for (default: torchrun's WORLD_SIZE, else 1)",
    )
    g.add_argument(
        "--gpu", metavar="NAME", help="e.g. H100, A100, L4 (default: this machine's GPU, else A100)"
    )
    g.add_argument("--gpu-memory", type=float, metavar="GIB", help="per GPU (default: the GPU's)")
    g.add_argument("--mfu", type=float, help="model FLOPs utilisation for the time (default 0.4)")
    g.add_argument("--preset", help="model size when init's params.json is not there (e.g. 7B)")
    if examples:
        g.add_argument(
            "--examples",
            type=int,
            metavar="N",
            help="training examples, instead of reading data.paths (each then counts as "
            "data.max_len tokens: an upper bound)",
        )
    g.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan_target(a: argparse.Namespace) -> Any:
    """The ``Target`` of the plan flags; the world size of torchrun when it runs us."""
    import os

    from llamaforge.training.plan import DEFAULT_MFU, Target

    return Target(
        world_size=a.world_size or int(os.environ.get("WORLD_SIZE", "1")),
        gpu=a.gpu,
        mfu=DEFAULT_MFU if a.mfu is None else a.mfu,
        gpu_memory_gib=a.gpu_memory or 0.0,
    )


def _print_plan(plan: dict[str, Any], *, as_json: bool) -> None:
    """On rank 0 only (every torchrun process plans the same run)."""
    import json
    import os

    from llamaforge.training.plan import format_plan

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(plan, indent=2) if as_json else format_plan(plan))


def _register_quickstart_instruct(subparsers: argparse._SubParsersAction) -> None:
    """``llamaforge quickstart-instruct [--out DIR] [--base DIR] [KEY=VALUE ...]``."""
    p = subparsers.add_parser(
        "quickstart-instruct",
        help="instruction finetuning demo: stdlib instructions, exact match before/after",
        description="Finetune the quickstart model (runs/quickstart/model; pretrained now, "
        "in fewer steps, when there is none) on instructions generated from the Python "
        "standard library's sources — the name, first parameter or parameter count of a "
        "`def` line, the module of an import — and report exact match on held-out "
        "instructions about functions and modules not finetuned on, before and after. "
        "About 5 minutes on 2 CPU cores with the pretraining. Any setting is a KEY=VALUE "
        "override (e.g. finetune.steps=200 pretrain.steps=100).",
        add_help=False,
    )
    add_config_help(p, _quickstart_instruct_config, "Settings and defaults:")
    p.add_argument("--out", help="run directory (same as out=...)")
    p.add_argument("--base", help="base checkpoint directory (same as base=...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_quickstart_instruct)


def _quickstart_instruct(a: argparse.Namespace) -> int:
    """Exit 0 when the finetuned model answers more held-out instructions than the base."""
    from llamaforge.demos.instruct import quickstart_instruct_config, run_quickstart_instruct

    cfg = quickstart_instruct_config([*a.overrides, *flag_overrides(a, "out", "base")])
    scores = run_quickstart_instruct(cfg)["held_out"]
    after, before = scores["after"]["all"], scores["before"]["all"]
    return 0 if after["exact_match"] > before["exact_match"] else 1


def _quickstart_preference_config() -> type:
    from llamaforge.demos.preference import QuickstartPreferenceConfig

    return QuickstartPreferenceConfig


def _register_quickstart_preference(subparsers: argparse._SubParsersAction) -> None:
    """``llamaforge quickstart-preference [--out DIR] [--sft DIR] [KEY=VALUE ...]``."""
    p = subparsers.add_parser(
        "quickstart-preference",
        help="preference tuning demo: DPO after quickstart-instruct, accuracy before/after",
        description="DPO on the model quickstart-instruct finetuned (run first when there "
        "is none) with preference pairs from the same standard-library facts: the answer "
        "`ast` confirms against a plausible wrong one from the same code. Reports held-out "
        "preference accuracy and exact match before and after. About a minute on 2 CPU "
        "cores after quickstart-instruct. Any setting is a KEY=VALUE override (e.g. "
        "dpo.steps=50 pairs=800).",
        add_help=False,
    )
    add_config_help(p, _quickstart_preference_config, "Settings and defaults:")
    p.add_argument("--out", help="run directory (same as out=...)")
    p.add_argument("--sft", help="instruction-finetuned checkpoint (same as sft=...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_quickstart_preference)


def _quickstart_preference(a: argparse.Namespace) -> int:
    """Exit 0 when the tuned model prefers the confirmed answer on more held-out pairs."""
    from llamaforge.demos.preference import quickstart_preference_config, run_quickstart_preference

    cfg = quickstart_preference_config([*a.overrides, *flag_overrides(a, "out", "sft")])
    scores = run_quickstart_preference(cfg)["held_out"]
    after, before = scores["after"], scores["before"]
    return 0 if after["preference_accuracy"] > before["preference_accuracy"] else 1


def _register_pretrain(subparsers: argparse._SubParsersAction) -> None:
    def run(config: str | None, overrides: list[str]) -> None:
        from llamaforge.config import load_config
        from llamaforge.training.pretrain import PretrainConfig, run_pretrain

        cfg = load_config(PretrainConfig, config, overrides)
        try:
            run_pretrain(cfg)
        except (OSError, ValueError) as e:  # the tokenizer or the shards are not there
            check_prepared(Path(cfg.data.dir), Path(cfg.data.tokenizer), cause=e)
            raise

    def plan(config: str | None, overrides: list[str], a: argparse.Namespace) -> dict[str, Any]:
        from llamaforge.config import load_config
        from llamaforge.training.plan import plan_pretrain
        from llamaforge.training.pretrain import PretrainConfig

        cfg = load_config(PretrainConfig, config, overrides)
        return plan_pretrain(cfg, _plan_target(a), a.preset)

    _training_command(
        subparsers,
        "pretrain",
        _pretrain_config,
        "Settings and defaults (TOML tables for the dotted ones; model.* null = the "
        "preset's value):",
        run,
        plan,
        help="train a LLaMA from scratch on prepared data (one process, or many via torchrun)",
        description="Pretrain with the paper's recipe (AdamW 0.9/0.95, wd 0.1, clip 1.0, "
        "warmup + cosine to 10 %) on shards from `llamaforge data prepare`. Writes "
        "OUT/metrics.jsonl, OUT/checkpoints/step-N (resumable; resume=auto by default), "
        "OUT/model (native checkpoint), OUT/loss.png and OUT/summary.json.",
        epilog="Many processes: torchrun --nproc_per_node N -m llamaforge pretrain CONFIG "
        "[KEY=VALUE ...] (FSDP2 by default; parallel.data=ddp for DDP, parallel.tp=T for "
        "tensor + sequence parallelism over T of them: docs/parallelism.md).",
    )


def check_prepared(
    data_dir: Path,
    tokenizer: Path,
    configs: Path = Path("configs/data"),
    cause: BaseException | None = None,
) -> None:
    """The token shards and the tokenizer of a pretraining run exist, else a DataError that
    says which ``llamaforge data prepare CONFIG`` makes them (the data config in ``configs``
    whose ``output`` is ``data_dir``, when there is one)."""
    from llamaforge.data.base import DataError
    from llamaforge.data.shards import MIXTURE_FILE

    missing = [p for p in (data_dir / MIXTURE_FILE, tokenizer) if not p.exists()]
    if not missing:
        return
    config = "CONFIG"
    for candidate in sorted(configs.glob("*.toml")) if configs.is_dir() else []:
        try:
            from llamaforge.config import tomllib

            output = tomllib.loads(candidate.read_text(encoding="utf-8")).get("output")
        except (OSError, ValueError):
            continue
        if isinstance(output, str) and Path(output).resolve() == data_dir.resolve():
            config = candidate.as_posix()
            break
    what = "the tokenizer" if missing[0] == tokenizer else "the prepared data"
    raise DataError(
        f"{missing[0]}: not found ({what}): prepare the data first with `llamaforge data "
        f"prepare {config}` (a data config whose output is {data_dir}; it also trains the "
        "tokenizer), then rerun this command"
    ) from cause


def pretrain_command(data_dir: str, tokenizer: str, data_config: str | Path) -> str:
    """The command that pretrains on data ``llamaforge data prepare DATA_CONFIG`` has just
    written: the quickest (fewest steps × batch_tokens) pretrain config beside the data
    config (``configs/pretrain/`` for ``configs/data/X.toml``) that reads ``data_dir`` with
    ``tokenizer``, else pretrain's defaults with ``data.dir`` and ``data.tokenizer`` set
    (and a shell comment on the settings that size the run)."""
    import shlex

    from llamaforge.config import tomllib

    def same(a: object, b: str) -> bool:
        return isinstance(a, str) and Path(a).resolve() == Path(b).resolve()

    best: tuple[float, Path] | None = None
    for candidate in sorted((Path(data_config).parent.parent / "pretrain").glob("*.toml")):
        try:
            cfg = tomllib.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        data = cfg.get("data", {})
        if same(data.get("dir"), data_dir) and same(data.get("tokenizer"), tokenizer):
            size = float(cfg.get("steps", math.inf)) * float(cfg.get("batch_tokens", math.inf))
            if best is None or size < best[0]:
                best = (size, candidate)
    if best is not None:
        return shlex.join(["llamaforge", "pretrain", best[1].as_posix()])
    overrides = [f"data.dir={data_dir}", f"data.tokenizer={tokenizer}"]
    return shlex.join(["llamaforge", "pretrain", *overrides]) + (
        "  # the paper's 4M-token steps: batch_tokens=N steps=N model.preset=P for another run"
    )


def _register_finetune(subparsers: argparse._SubParsersAction) -> None:
    def run(config: str | None, overrides: list[str]) -> None:
        from llamaforge.config import load_config
        from llamaforge.finetune.run import FinetuneConfig, run_finetune

        cfg = load_config(FinetuneConfig, config, overrides)
        if cfg.method != "sft":  # preference tuning (method dpo or simpo)
            from llamaforge.finetune.preference import run_preference

            run_preference(cfg)
            return
        run_finetune(cfg)

    def plan(config: str | None, overrides: list[str], a: argparse.Namespace) -> dict[str, Any]:
        from llamaforge.config import load_config
        from llamaforge.finetune.run import FinetuneConfig, plan_finetune

        cfg = load_config(FinetuneConfig, config, overrides)
        return plan_finetune(cfg, _plan_target(a), examples=a.examples, preset=a.preset)

    _training_command(
        subparsers,
        "finetune",
        _finetune_config,
        "Settings and defaults (model.* come from init):",
        run,
        plan,
        help="instruction finetuning (LLaMA-I): full or LoRA, on the pretraining machinery",
        description="Finetune the native checkpoint `init` on instruction data (Alpaca, "
        "Dolly, self-instruct, ShareGPT, OpenAI messages, question/answer JSON(L) or saved "
        "HF datasets) rendered with a chat template, the loss on the assistant's tokens "
        "only; optional packing and LoRA (lora.enabled=true). Writes OUT/model (and "
        "OUT/adapter with LoRA), checkpoints, metrics, loss.png and summary.json with the "
        "held-out answers before and after.",
        epilog="Many processes: torchrun --nproc_per_node N -m llamaforge finetune CONFIG "
        "[KEY=VALUE ...].",
    )


def _register_lora(subparsers: argparse._SubParsersAction) -> None:
    """``llamaforge lora merge BASE ADAPTER OUT [--force]``."""
    p = subparsers.add_parser("lora", help="LoRA adapters (PEFT format): merge into a base")
    sub = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    m = sub.add_parser(
        "merge",
        help="fold an adapter into its base: a plain native checkpoint",
        description="Fold the PEFT LoRA adapter ADAPTER (made by llamaforge or by peft for "
        "the HF export of BASE) into the native checkpoint BASE: W += scaling·B·A, shard by "
        "shard in BASE's dtype, written as the native checkpoint OUT with BASE's shards.",
    )
    m.add_argument("base", type=Path, help="native base checkpoint directory")
    m.add_argument("adapter", type=Path, help="PEFT adapter directory")
    m.add_argument("out", type=Path, help="output native checkpoint directory")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists")
    m.set_defaults(func=_lora_merge)


def _lora_merge(a: argparse.Namespace) -> int:
    from llamaforge.finetune.merge import merge_command

    print(merge_command(a.base, a.adapter, a.out, force=a.force))
    return 0
