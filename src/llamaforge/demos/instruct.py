"""``llamaforge quickstart-instruct``: instruction following, measurably, on a 2-core CPU
with nothing but the package.

1. a base model: ``base`` if set, else the quickstart's ``runs/quickstart/model``, else an
   earlier ``OUT/base/model``, else one pretrained now with the quickstart's machinery
   (``[pretrain]``: quickstart.toml with fewer steps);
2. an instruction set generated from the standard library's sources
   (:mod:`llamaforge.demos.stdlib_tasks`: function names, first parameters, parameter
   counts, imported modules), held-out examples about functions and modules that no training
   example is about;
3. ``run_finetune`` on it (full finetuning, ``[finetune]``);
4. greedy answers to the held-out instructions from the base and the finetuned model: exact
   match overall and per task, next to the most-frequent-answer baseline, and a few examples.

Writes OUT/data/instructions.jsonl, OUT/finetune (the finetuning run: model, metrics,
loss.png), OUT/answers.jsonl (every held-out instruction with both answers) and
OUT/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.config import ConfigError, load_config, setting
from llamaforge.demos.quickstart import CONFIG_FILE, QuickstartConfig, run_quickstart
from llamaforge.demos.stdlib_tasks import (
    QUESTIONS,
    TASKS,
    StdlibTask,
    generate_tasks,
    split_tasks,
    write_jsonl,
)
from llamaforge.files import atomic_write
from llamaforge.finetune.data import InstructDataConfig
from llamaforge.finetune.run import FinetuneConfig, answer_scores, run_finetune

QUICKSTART_MODEL = "runs/quickstart/model"


def _pretrain_section() -> QuickstartConfig:
    """quickstart.toml, shortened so that pretraining, finetuning and the evaluation fit in
    5 minutes on 2 CPU cores (``data.dir``/``data.tokenizer`` empty: OUT/base/data)."""
    return load_config(
        QuickstartConfig,
        CONFIG_FILE,
        ["steps=240", "optim.warmup_steps=24", "eval_every=0", "eval_batches=4", "samples=0",
         "progress=false", "plot=false"],
    )  # fmt: skip


def _finetune_section() -> FinetuneConfig:
    """Full finetuning tuned for the 1.3M quickstart model on 2 CPU cores (about 2 minutes):
    examples packed into rows of 128 positions (about 3 per row), 16 rows a step, 1000 steps
    (about 6 epochs of the training examples) at a peak lr of 5e-3, cosine to 0. Copying an
    unseen name (function_name, imported_module) appears only between 500 and 1000 steps:
    3 % → 56 % of function names on the quickstart model."""
    # llama2's "[/INST] answer" puts the answer after a space, so a name in the answer is
    # the same SentencePiece pieces as in the `def` line (alpaca's "Response:\n" is not)
    return FinetuneConfig(
        data=InstructDataConfig(template="llama2", max_len=128, val_fraction=0.05, packing=True),
        optim=dataclasses.replace(FinetuneConfig().optim, lr=5e-3),
        steps=1000,
        batch_size=16,
        micro_batch=16,
        warmup_ratio=0.05,
        eval_batches=4,
        gen_eval=0,  # the demo answers every held-out instruction itself, per task
        checkpoint=dataclasses.replace(FinetuneConfig().checkpoint, every=0, keep=1),
        resume="none",
        progress=False,
        tensorboard=False,
    )


@dataclass
class TasksSection:
    per_task: int = setting(3000, "examples per task at most (function names are never reused)")
    max_chars: int = setting(72, "longest code line asked about")
    seed: int = setting(0, "seed of the choice of lines and tasks")


@dataclass
class QuickstartInstructConfig:
    """The demo: a base model, the stdlib instruction set, finetuning, before/after."""

    base: str = setting(
        "",
        f"base checkpoint (empty: {QUICKSTART_MODEL}, else OUT/base/model, else pretrain one "
        "with pretrain.* into OUT/base); the demo sets pretrain.out, finetune.init, "
        "finetune.out (OUT/finetune) and finetune.data.paths",
    )
    out: str = setting("runs/quickstart-instruct", "run directory")
    tasks: TasksSection = field(default_factory=TasksSection)
    pretrain: QuickstartConfig = field(default_factory=_pretrain_section)
    finetune: FinetuneConfig = field(default_factory=_finetune_section)
    held_out: int = setting(0, "held-out instructions answered before and after (0: all)")
    max_new_tokens: int = setting(16, "tokens generated per answer")
    examples: int = setting(8, "held-out examples printed")


def quickstart_instruct_config(overrides: list[str] | None = None) -> QuickstartInstructConfig:
    """The defaults with ``key=value`` overrides (``finetune.steps=100 pretrain.steps=50``)."""
    return load_config(QuickstartInstructConfig, None, overrides or [])


def resolve_base(
    cfg: QuickstartInstructConfig, log: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any] | None]:
    """The base checkpoint, pretraining one into OUT/base when there is none; returns it and
    the pretraining summary (None when an existing model was used)."""
    if cfg.base:
        base = Path(cfg.base)
        if not (base / "params.json").is_file():
            raise ConfigError(f"base={cfg.base!r}: not a native checkpoint directory")
        return base, None
    for candidate in (Path(QUICKSTART_MODEL), Path(cfg.out) / "base" / "model"):
        if (candidate / "params.json").is_file():
            return candidate, None
    pre = dataclasses.replace(cfg.pretrain, out=str(Path(cfg.out) / "base"))
    if not pre.data.dir:  # as quickstart_config does
        pre.data.dir = str(Path(pre.out) / "data")
    if not pre.data.tokenizer:
        pre.data.tokenizer = str(Path(pre.data.dir) / "tokenizer.model")
    summary = run_quickstart(pre, log=lambda s: log("    " + s if s.strip() else s))
    return Path(summary["checkpoint"]), summary


def answer(ckpt: Path, tasks: list[StdlibTask], template: str, max_new_tokens: int) -> list[str]:
    """Greedy answers of the checkpoint to the tasks' instructions, rendered as in training."""
    from llamaforge.chat_templates import encode_text, load_template
    from llamaforge.checkpoint.native import load
    from llamaforge.device import resolve_device
    from llamaforge.inference.generate import generate_completions

    model, tok = load(ckpt, device=resolve_device("auto"))
    tpl = load_template(template)
    prompts = [
        encode_text(tok, tpl.render(t.messages()[:1], add_generation_prompt=True)) for t in tasks
    ]
    done = generate_completions(
        model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0, truncate=True
    )
    return [c.text.strip() for c in done]


def _scores(tasks: list[StdlibTask], preds: list[str]) -> dict[str, Any]:
    refs = [t.answer for t in tasks]
    out: dict[str, Any] = {"all": answer_scores(preds, refs)}
    for name in TASKS:
        idx = [i for i, t in enumerate(tasks) if t.task == name]
        if idx:
            out[name] = answer_scores([preds[i] for i in idx], [refs[i] for i in idx])
    return out


def majority_baseline(train: list[StdlibTask], held: list[StdlibTask]) -> dict[str, float]:
    """Exact match of always giving each task's most frequent training answer."""
    out: dict[str, float] = {}
    for name in TASKS:
        answers = Counter(t.answer for t in train if t.task == name)
        h = [t for t in held if t.task == name]
        if answers and h:
            top = answers.most_common(1)[0][0]
            out[name] = sum(t.answer == top for t in h) / len(h)
    return out


def run_quickstart_instruct(
    cfg: QuickstartInstructConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    log("1/4 base model")
    base, pretrain = resolve_base(cfg, log)
    log(f"    {base}" + (" (pretrained now)" if pretrain else " (reused)"))

    log("2/4 instructions from the standard library's sources")
    tasks = generate_tasks(cfg.tasks.seed, cfg.tasks.per_task, cfg.tasks.max_chars)
    data_path = write_jsonl(tasks, out / "data" / "instructions.jsonl")
    train, held = split_tasks(tasks, cfg.finetune.data.val_fraction)
    if cfg.held_out:
        held = held[: cfg.held_out]
    counts = Counter(t.task for t in tasks)
    log(f"    {len(tasks)} examples ({', '.join(f'{k} {v}' for k, v in counts.items())}): "
        f"{len(train)} train, {len(held)} held out — {data_path}")  # fmt: skip

    log("3/4 finetune (llamaforge finetune, full)")
    ft = dataclasses.replace(
        cfg.finetune,
        init=str(base),
        out=str(out / "finetune"),
        data=dataclasses.replace(cfg.finetune.data, paths=[str(data_path)], format="openai"),
    )
    t_ft = time.time()
    ft_summary = run_finetune(ft)
    ft_seconds = time.time() - t_ft
    model = Path(ft_summary["model"])

    log("4/4 held-out instructions, greedy answers before and after")
    template, n = ft.data.template, cfg.max_new_tokens
    before = answer(base, held, template, n)
    after = answer(model, held, template, n)
    scores = {"before": _scores(held, before), "after": _scores(held, after)}
    baseline = majority_baseline(train, held)
    rows = [
        {"task": t.task, "instruction": t.instruction, "reference": t.answer,
         "before": b, "after": a, "module": t.module}
        for t, b, a in zip(held, before, after)
    ]  # fmt: skip
    with open(out / "answers.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    summary: dict[str, Any] = {
        "base": str(base),
        "pretrained": pretrain is not None,
        "pretrain": None if pretrain is None else {
            "val_loss": pretrain["val_loss"], "unigram_loss": pretrain["unigram_loss"],
            "steps": cfg.pretrain.steps, "seconds": pretrain["seconds"]},
        "data": {"path": str(data_path), "examples": len(tasks), "train": len(train),
                 "held_out": len(held), "tasks": dict(counts)},
        "finetune": {"model": str(model), "steps": ft_summary.get("step"),
                     "seconds": round(ft_seconds, 1), "run": str(ft.out)},
        "held_out": scores,
        "majority_baseline": baseline,
        "examples": rows[: cfg.examples],
        "seconds": round(time.time() - t0, 1),
    }  # fmt: skip
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(format_report(summary))
    return summary


def format_report(summary: dict[str, Any]) -> str:
    b, a = summary["held_out"]["before"], summary["held_out"]["after"]
    base = summary["majority_baseline"]
    lines = [
        "",
        f"held-out instructions ({a['all']['n']}, about functions and modules no training "
        f"example is about): exact match {b['all']['exact_match']:.1%} → "
        f"{a['all']['exact_match']:.1%}",
    ]
    for name in TASKS:
        if name in a:
            extra = f"  (most frequent answer: {base[name]:.1%})" if name in base else ""
            lines.append(
                f"  {name:<16} {b[name]['exact_match']:6.1%} → {a[name]['exact_match']:6.1%}"
                f"   n={a[name]['n']}{extra}"
            )
    for r in summary["examples"]:
        lines += [
            "--- " + r["instruction"].replace("\n", "\n    "),
            f"    reference {r['reference']!r}   before {r['before']!r}   after {r['after']!r}",
        ]
    lines.append(
        f"\nfinetuned model: {summary['finetune']['model']}   "
        f"answers: {Path(summary['finetune']['run']).parent / 'answers.jsonl'}   "
        f"({summary['seconds']} s)"
    )
    return "\n".join([*lines, *chat_hint(summary)])


def chat_hint(summary: dict[str, Any]) -> list[str]:
    """How to ask the finetuned model a question of the demo's (a question and a line of
    code: one message of two lines) in ``llamaforge chat``; the last line is the command."""
    from llamaforge.inference.chat import next_command

    rows = summary["examples"]
    example = rows[0]["instruction"] if rows else f"{QUESTIONS['function_name']}\ndef f(x):"
    lines = example.split("\n")
    typed = [
        f"    {'...' if i else '>>>'} {line}" + ("\\" if i < len(lines) - 1 else "")
        for i, line in enumerate(lines)
    ]
    return [
        "ask it a held-out question (one message: a line ending with \\ goes on to the next), "
        "greedily as measured:",
        *typed,
        f"next: {next_command(summary['finetune']['model'])} --temperature 0",
    ]
