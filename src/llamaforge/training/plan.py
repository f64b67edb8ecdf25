"""A plan before the run (``llamaforge pretrain|finetune CONFIG --dry-run``).

The configuration is resolved as the run resolves it — the same ``Trainer`` (layout, batch
arithmetic and their checks) and its model on the meta device (nothing is allocated) — and
the plan says what follows: tokens or examples, steps and epochs, the learning-rate
schedule with a text plot, the layout, memory per GPU by component (``flops.layout_memory``
and ``activation_memory`` for the activations), and the time at a stated MFU on a named
GPU (``device.DEVICES``). Pretraining's plan is ``plan_pretrain``; finetuning reads and
tokenizes its data first (``llamaforge.finetune.run.plan_finetune``). A plan is a dict
(``--json`` prints it) that ``format_plan`` writes as text.

The model of the plan: ``init``'s params.json when it exists, else ``--preset SIZE``
(``planned_model``); a pretraining run without ``init`` takes the config's ``model``
section, which ``--preset`` overrides. Finetuning counts its examples by reading and
tokenizing ``data.paths`` with init's tokenizer, or takes ``--examples N`` (each example
then counts as ``data.max_len`` tokens: an upper bound). The time is the real tokens × the
trainer's FLOPs per token (``flops_per_token``: a frozen base does no weight gradients)
at the MFU, the definition the run's metrics use. Memory figures are estimates: fp32
master weights, gradients and AdamW states, bf16 working copies, and activations per
micro-batch of full rows (finetuning's padded rows are usually shorter); the CUDA context
and fragmentation are left to a 10 % margin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from llamaforge.config import ConfigError
from llamaforge.device import DEVICES, DeviceSpec, device_spec
from llamaforge.parallel import DistInfo, is_quantised
from llamaforge.training.flops import (
    AC_FOR_LAYOUT,
    activation_memory,
    carbon,
    count_params,
    layout_memory,
)
from llamaforge.training.trainer import TrainConfig, Trainer
from llamaforge.units import human_bytes, human_count

DEFAULT_GPU = "A100"  # the paper's GPU (80 GB, 400 W), when this machine has none
DEFAULT_MFU = 0.4
MARGIN = 0.9  # a total fits in 90 % of a GPU: the CUDA context and fragmentation get the rest
GIB = 1024**3
C = TypeVar("C", bound=TrainConfig)


@dataclass(frozen=True)
class Target:
    """What a plan is for: ``world_size`` processes, one per GPU named ``gpu`` (None: this
    machine's GPU, else the A100), running at ``mfu``; ``gpu_memory_gib`` 0: the table's."""

    world_size: int = 1
    gpu: str | None = None
    mfu: float = DEFAULT_MFU
    gpu_memory_gib: float = 0.0

    def spec(self) -> DeviceSpec:
        """The GPU's row of the accelerator table; a ValueError names an unknown one."""
        if self.world_size < 1:
            raise ValueError(f"--world-size {self.world_size}: expected at least 1")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu {self.mfu}: expected a fraction in (0, 1]")
        name = self.gpu
        if name is None:
            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else DEFAULT_GPU
        spec = device_spec(name)
        if spec is None:
            known = ", ".join(d.name for d in DEVICES)
            raise ValueError(f"--gpu {name}: not in the accelerator table ({known})")
        return spec

    def memory_bytes(self, spec: DeviceSpec) -> int:
        return int((self.gpu_memory_gib or spec.memory_gib) * GIB)


class NoData:
    """The loader of a trainer that only plans: it is never read."""

    def __next__(self) -> Any:
        raise RuntimeError("a planning trainer has no data")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def planning_info(cfg: TrainConfig, world_size: int) -> DistInfo:
    """Rank 0 of ``world_size`` on the kind of device the run will use (a GPU unless the
    config says cpu): it decides bf16 for ``dtype=auto``. Nothing is allocated on it."""
    kind = "cpu" if cfg.device.startswith("cpu") else "cuda"
    return DistInfo(rank=0, world_size=world_size, device=torch.device(kind))


def planned_model(cfg: C, preset: str | None) -> tuple[C, str]:
    """The config whose model the plan builds, and where that model comes from: ``init``'s
    params.json when there is one, else ``preset`` (``--preset``; for a run without
    ``init`` it overrides ``model.preset``). A missing ``init`` without a preset is a
    ConfigError that says so."""
    if cfg.init and (Path(cfg.init) / "params.json").is_file():
        ignored = f"; --preset {preset} not used" if preset is not None else ""
        return cfg, f"init {cfg.init} (params.json{ignored})"
    model = cfg.model
    if preset is not None:
        model = dataclasses.replace(model, preset=preset)  # type: ignore[type-var]
    elif cfg.init:
        raise ConfigError(
            f"init={cfg.init!r}: no params.json there to plan with; give --preset SIZE "
            "(e.g. --preset 7B) for the model's shape"
        )
    note = f" (init={cfg.init!r} not found)" if cfg.init else ""
    return dataclasses.replace(cfg, init="", model=model), f"preset {model.preset}{note}"


# -- the parts of a plan ---------------------------------------------------------------------


def lr_plot(
    lr_at: Callable[[int], float], steps: int, width: int = 60, height: int = 4
) -> list[str]:
    """The schedule as ``height`` lines of block characters, ``width`` steps across (each
    column the lr at its step), under an axis from step 0 to ``steps``."""
    cols = [lr_at(round(i * (steps - 1) / max(1, width - 1))) for i in range(width)]
    top = max(cols) or 1.0
    blocks = " ▁▂▃▄▅▆▇█"
    lines = []
    for row in range(height):
        floor = (height - 1 - row) * 8
        cells = [blocks[max(0, min(8, round(v / top * height * 8) - floor))] for v in cols]
        label = f"{top:.2e}" if row == 0 else ("0" if row == height - 1 else "")
        lines.append(f"{label:>9} │{''.join(cells)}")
    lines.append(" " * 10 + "└" + "─" * width)
    lines.append(" " * 11 + "0" + f"step {steps:,}".rjust(width - 1))
    return lines


def _activations(trainer: Trainer, mode: str) -> int:
    """Activation bytes of one micro-batch of full rows under checkpointing ``mode``:
    Korthikanti et al.'s count (``layout_memory``) in bf16, ``activation_memory`` in fp32."""
    args, layout, cfg = trainer.args, trainer.layout, trainer.cfg
    if trainer.amp is not None:
        mem = layout_memory(
            args, tp=layout.tp, seq_len=trainer.seq_len, micro_batch=cfg.micro_batch, mode=mode
        )
        return mem["activations"]
    tokens = cfg.micro_batch * trainer.seq_len
    return activation_memory(args, tokens, mode, act_bytes=4) // layout.tp


def memory_per_gpu(
    trainer: Trainer,
    model: torch.nn.Module,
    buffer_bytes: Callable[[torch.nn.Module], int] | None = None,
) -> dict[str, Any]:
    """Bytes per GPU by component, from the meta model (``trainer.meta_model()``): what
    trains keeps fp32 weights, gradients and AdamW's two moments, split over the FSDP2 and
    tensor-parallel ranks; a frozen base (LoRA) its weights only, a quantised one its packed
    storage (``buffer_bytes`` when the meta model's own parameters do not price it), sharded
    like the rest. Working
    copies: FSDP2's gathered bf16 blocks, or without FSDP2 autocast's bf16 copies of the
    trained weights (cached for the forward pass) and of the frozen ones (kept for the
    backward pass: every block's without activation checkpointing, else one block's)."""
    cfg, layout, args = trainer.cfg, trainer.layout, trainer.args
    shards = layout.tp * (layout.dp_shard if layout.data == "fsdp" else 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trained_bytes = sum(p.numel() * p.element_size() for p in trainable)
    # a quantised layer's frozen tensors (packed weight, scales) are the quantised base
    quantised = {
        id(p)
        for m in model.modules()
        if any(is_quantised(q) for q in m.parameters(recurse=False))
        for p in m.parameters(recurse=False)
        if not p.requires_grad
    }
    sizes = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    frozen = sum(
        sizes[id(p)] for p in model.parameters() if not p.requires_grad and id(p) not in quantised
    )
    base = sum(sizes[i] for i in quantised)
    base += sum(b.numel() * b.element_size() for b in model.buffers())
    if buffer_bytes is not None:
        base = buffer_bytes(model)
    mode = cfg.activation_checkpointing
    if trainer.fsdp:
        copies = layout_memory(args, tp=layout.tp, mode=mode)["gathered"]
    elif trainer.amp is not None:
        every = count_params(args)["total"] + trainer.param_counts["adapters"]
        frozen_values = every - sum(p.numel() for p in trainable)
        kept = frozen_values if mode == "none" else frozen_values // args.n_layers
        copies = 2 * (sum(p.numel() for p in trainable) + kept) // layout.tp
    else:
        copies = 0
    parts = {
        "weights": trained_bytes // shards,
        "frozen": frozen // shards,
        "buffers": base // shards,
        "gradients": trained_bytes // shards,
        "optimizer": 2 * trained_bytes // shards,
        "copies": copies,
    }
    activations = {m: _activations(trainer, m) for m in AC_FOR_LAYOUT}
    return {
        "parts": parts,
        "activations": activations,
        "mode": mode,
        "total": sum(parts.values()) + activations[mode],
    }


def time_at(trainer: Trainer, tokens: float, target: Target) -> dict[str, Any]:
    """Training FLOPs (the trainer's FLOPs per token × ``tokens``, the real ones) and the
    time they take at ``target.mfu`` of the GPUs' peak, with the paper's carbon estimate."""
    spec = target.spec()
    flops = trainer.flops_per_token * tokens
    seconds = flops / (target.mfu * spec.peak_flops * target.world_size)
    gpu_hours = seconds * target.world_size / 3600
    return {
        "gpu": spec.name,
        "peak_flops": spec.peak_flops,
        "mfu": target.mfu,
        "flops_per_token": trainer.flops_per_token,
        "flops": flops,
        "seconds": seconds,
        "gpu_hours": gpu_hours,
        "carbon": carbon(gpu_hours, spec.watts),
    }


def training_plan(
    trainer: Trainer,
    target: Target,
    *,
    model_source: str,
    tokens: float,
    data: dict[str, Any],
    buffer_bytes: Callable[[torch.nn.Module], int] | None = None,
) -> dict[str, Any]:
    """The plan of ``trainer``'s run over ``tokens`` real tokens; ``data`` describes where
    they come from (its ``lines`` are printed); ``buffer_bytes`` prices the meta model's
    buffers when their own sizes do not (``memory_per_gpu``)."""
    cfg, args, layout = trainer.cfg, trainer.args, trainer.layout
    model = trainer.meta_model()
    spec = target.spec()
    memory = memory_per_gpu(trainer, model, buffer_bytes)
    memory["gpu_bytes"] = target.memory_bytes(spec)
    memory["fits"] = memory["total"] <= MARGIN * memory["gpu_bytes"]
    o = cfg.optim
    return {
        "command": trainer.name,
        "model": {
            "source": model_source,
            "params": count_params(args)["total"] + trainer.param_counts["adapters"],
            "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "args": args.to_dict(),
        },
        "layout": {
            "world_size": target.world_size,
            "describe": layout.describe(),
            **dataclasses.asdict(layout),
            "precision": "bf16" if trainer.amp is not None else "fp32",
            "activation_checkpointing": cfg.activation_checkpointing,
        },
        "batch": {
            "tokens": cfg.batch_tokens,
            "accumulation": trainer.accum,
            "micro_batch": cfg.micro_batch,
            "seq_len": trainer.seq_len,
            "dp": layout.dp,
        },
        "data": data,
        "steps": cfg.steps,
        "tokens": tokens,
        "lr": {
            "peak": o.lr,
            "warmup_steps": o.warmup_steps,
            "final": o.lr * o.final_lr_ratio,
            "plot": lr_plot(trainer.lr_at, cfg.steps),
        },
        "memory": memory,
        "time": time_at(trainer, tokens, target),
    }


# -- pretraining -----------------------------------------------------------------------------


def _pretrain_data(cfg: Any, tokenizer_sha: str | None) -> dict[str, Any]:
    """The prepared data's train tokens per source (their meta.json) and the epochs of each
    that the run draws; a folder that is not prepared is a note, not an error."""
    from llamaforge.data.base import DataError
    from llamaforge.data.mixture import MixtureSampler, open_sources

    seq_len = cfg.data.seq_len
    samples = cfg.steps * (cfg.batch_tokens // seq_len)
    try:
        sources, weights = open_sources(cfg.data.dir, "train", tokenizer_sha)
        sampler = MixtureSampler(sources, weights, seq_len, cfg.data.seed)
    except (DataError, OSError) as e:
        return {"prepared": False, "lines": [f"{e} (the plan counts the config's tokens)"]}
    epochs = {
        s.name: samples * float(w) / n
        for s, w, n in zip(sampler.sources, sampler.weights, sampler.windows)
    }
    tokens = {s.name: s.tokens for s in sampler.sources}
    shown = ", ".join(f"{name} {e:.2f}" for name, e in epochs.items())
    lines = [
        f"{cfg.data.dir}: {len(tokens)} source(s), {human_count(sum(tokens.values()))} train "
        f"tokens; epochs drawn: {shown}"
    ]
    return {"prepared": True, "source_tokens": tokens, "epochs": epochs, "lines": lines}


def plan_pretrain(cfg: Any, target: Target, preset: str | None = None) -> dict[str, Any]:
    """The plan of ``llamaforge pretrain`` with ``cfg`` (a PretrainConfig) on ``target``:
    the vocabulary from the data's tokenizer when it is there (else the preset's), the
    tokens steps × batch_tokens, the epochs from the prepared data's meta.json."""
    from llamaforge.presets import get_preset
    from llamaforge.tokenizer import Tokenizer
    from llamaforge.training.trainer import check_config, model_args

    check_config(cfg)
    cfg, source = planned_model(cfg, preset)
    sha = None
    if Path(cfg.data.tokenizer).is_file():
        tok = Tokenizer(cfg.data.tokenizer)
        vocab, sha = tok.vocab_size, tok.sha256()
    else:
        vocab = get_preset(cfg.model.preset).vocab_size
        source += f"; vocabulary {vocab} ({cfg.data.tokenizer} not found)"
    args = model_args(cfg, vocab, cfg.data.seq_len)
    trainer = Trainer(
        cfg,
        planning_info(cfg, target.world_size),
        args=args,
        seq_len=cfg.data.seq_len,
        loader=NoData(),
        name="pretrain",
    )
    data = _pretrain_data(cfg, sha)
    tokens = float(cfg.steps * cfg.batch_tokens)
    return training_plan(trainer, target, model_source=source, tokens=tokens, data=data)


# -- as text ---------------------------------------------------------------------------------

PART_LABELS = {
    "weights": "weights that train (fp32)",
    "frozen": "frozen weights",
    "buffers": "quantised base",
    "gradients": "gradients (fp32)",
    "optimizer": "AdamW states (fp32)",
    "copies": "bf16 working copies",
}


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.1f} minutes"


def _memory_lines(plan: dict[str, Any]) -> list[str]:
    mem, spec = plan["memory"], plan["time"]["gpu"]
    lines = [f"memory     per GPU (estimate; {spec}, {human_bytes(mem['gpu_bytes'])}):"]
    for key, n in mem["parts"].items():
        if n:
            lines.append(f"             {PART_LABELS[key]:<28}{human_bytes(n):>11}")
    acts = mem["activations"]
    others = ", ".join(f"{m} {human_bytes(n)}" for m, n in acts.items() if m != mem["mode"])
    b = plan["batch"]
    lines.append(
        f"             {'activations, ' + mem['mode']:<28}{human_bytes(acts[mem['mode']]):>11}"
        f"   (micro-batch {b['micro_batch']} × {b['seq_len']}; {others})"
    )
    verdict = "fits" if mem["fits"] else "does NOT fit"
    lines.append(
        f"             {'total':<28}{human_bytes(mem['total']):>11}   {verdict} in "
        f"{int(MARGIN * 100)} % of {human_bytes(mem['gpu_bytes'])}"
    )
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the text ``--dry-run`` prints."""
    m, lay, b, t, lr = plan["model"], plan["layout"], plan["batch"], plan["time"], plan["lr"]
    a = m["args"]
    lines = [
        f"plan of llamaforge {plan['command']} (dry run: nothing allocated, nothing trained)",
        f"model      {m['source']}: {human_count(m['params'])} parameters, "
        f"{human_count(m['trained'])} trained; {a['n_layers']} layers, dim {a['dim']}, "
        f"vocab {a['vocab_size']}",
        f"layout     {lay['world_size']} GPU(s): {lay['describe']}; {lay['precision']}, "
        f"activation checkpointing {lay['activation_checkpointing']}",
        f"batch      {b['tokens']:,} positions a step = {b['accumulation']} accumulation × "
        f"{b['micro_batch']} rows of {b['seq_len']} × {b['dp']} data-parallel ranks",
    ]
    lines += [
        f"{'data' if i == 0 else '':<11}{line}" for i, line in enumerate(plan["data"]["lines"])
    ]
    bound = "at most " if plan["data"].get("upper_bound") else ""
    lines.append(
        f"steps      {plan['steps']:,}: {bound}{human_count(plan['tokens'])} real tokens"
        + (f", {plan['epochs']:.2f} epochs" if plan.get("epochs") is not None else "")
    )
    lines.append(
        f"lr         warmup {lr['warmup_steps']:,} steps to {lr['peak']:.3g}, cosine to "
        f"{lr['final']:.3g} at step {plan['steps']:,}"
    )
    lines += ["  " + line for line in lr["plot"]]
    lines += _memory_lines(plan)
    c, hours = t["carbon"], t["gpu_hours"]
    shown = f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"
    lines.append(
        f"time       {t['flops']:.3g} FLOPs ({t['flops_per_token']:.3g} a token) at MFU "
        f"{t['mfu']:.0%} of {lay['world_size']} × {t['gpu']} ({t['peak_flops'] / 1e12:.0f} "
        f"TFLOP/s): {_duration(t['seconds'])}, {shown} GPU-hours, "
        f"{c['tco2eq']:.3g} tCO2eq (the paper's formula)"
    )
    if "evaluation" in plan:
        lines.append(f"evaluation {plan['evaluation']['line']}")
    return "\n".join(lines)
