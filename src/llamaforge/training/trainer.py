"""The training core that pretraining and finetuning share.

``TrainConfig`` holds what every training run has (model, optimizer, checkpoints, batch,
precision, parallelism, logging); a command adds its own data section (``pretrain.py``).
``Trainer`` runs one: ``build`` (model on the meta device → activation checkpointing →
compile → FSDP2/DDP → materialised shards → optimizer), ``resume``, ``train_step(x, y)``,
``validate``, ``save``, ``fit`` (the loop: schedule, metrics, signals, non-finite steps) and
``finalize`` (native checkpoint, loss plot, summary with the carbon estimate). The data is
pluggable — any iterator of (inputs, targets) batches with ``state_dict``/
``load_state_dict`` — and so is the loss.

Host synchronisations: a step keeps its loss, gradient norm, "finite" flag and token
counts on the device; the host reads them only on logging steps (``log_every``),
checkpoint steps and every ``sync_every`` steps, where the SIGTERM/SIGINT flag and the
tokens ride on the loss all-reduce that happens anyway. Throughput and MFU count real
tokens: a loader with padding says how many a batch holds (``Loader.real_tokens``). A
non-finite step is skipped on the device (fused AdamW's ``found_inf``) on a GPU, and with a
host check on the CPU, where it costs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import torch

from llamaforge import parallel as D
from llamaforge.config import ConfigError, setting, to_dict
from llamaforge.device import device_name, device_peak_flops, device_watts
from llamaforge.device import peak_memory_bytes as _peak_memory
from llamaforge.files import atomic_write
from llamaforge.model import ModelArgs, build_model
from llamaforge.presets import get_preset
from llamaforge.training.checkpointer import Checkpointer, CheckpointerError
from llamaforge.training.flops import carbon, flops_per_token
from llamaforge.training.metrics import MetricsWriter, plot_run
from llamaforge.training.optim import build_optimizer, cross_entropy, lr_at

# -- configuration ----------------------------------------------------------------------


def _model_section() -> type:
    """``ModelSection``: a preset plus every ``ModelArgs`` field as an optional override
    (None: the preset's value), derived from ModelArgs so the two never drift apart."""
    hints = typing.get_type_hints(ModelArgs)
    overrides = [
        (f.name, hints[f.name] | None, setting(None, f"ModelArgs.{f.name} (null: the preset's)"))
        for f in dataclasses.fields(ModelArgs)
    ]
    preset = ("preset", str, setting("1M", "a size from llamaforge.presets (1M … 65B)"))
    cls = dataclasses.make_dataclass("ModelSection", [preset, *overrides])
    cls.__module__ = __name__
    return cls


ModelSection = _model_section()


@dataclass
class OptimSection:
    lr: float = setting(3e-4, "peak learning rate")
    warmup_steps: int = setting(2000, "linear warmup steps")
    final_lr_ratio: float = setting(0.1, "cosine decays to this fraction of lr (paper: 10 %)")
    weight_decay: float = setting(0.1, "AdamW weight decay on every matrix (not the norms)")
    betas: list[float] = setting(doc="AdamW betas (paper: 0.9, 0.95)", factory=lambda: [0.9, 0.95])
    eps: float = setting(1e-8, "AdamW epsilon")
    clip: float = setting(1.0, "gradient clipping by global norm")


@dataclass
class CheckpointSection:
    every: int = setting(1000, "steps between checkpoints (0: only at the end / on a signal)")
    keep: int = setting(3, "newest checkpoints kept (0: all)")
    dir: str = setting("", "checkpoint directory (default OUT/checkpoints)")


@dataclass
class ParallelSection:
    data: Literal["fsdp", "ddp"] = setting(
        "fsdp", "data parallelism over the data ranks: FSDP2 sharding or DDP (tp=1 only)"
    )
    tp: int = setting(1, "tensor (+ sequence) parallel ranks per model replica")
    dp_shard: int = setting(-1, "FSDP2 sharding ranks (-1: world size / (tp × dp_replicate))")
    dp_replicate: int = setting(1, "replicas of the FSDP2 shards (HSDP when > 1)")
    async_tp: bool = setting(False, "micro-pipelined tensor parallelism (CUDA + compile)")


@dataclass
class TrainConfig:
    """Settings every training run has; commands subclass it with their data section."""

    model: ModelSection = field(default_factory=ModelSection)  # type: ignore[valid-type]
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    batch_tokens: int = setting(4_194_304, "global tokens per optimizer step (paper: 4M)")
    micro_batch: int = setting(8, "sequences per rank per forward pass")
    steps: int = setting(1000, "length of the schedule, in optimizer steps")
    stop_at: int = setting(0, "stop with a checkpoint after this step (job time limits)")
    dtype: Literal["auto", "fp32", "bf16"] = setting("auto", "auto: bf16 on CUDA, fp32 on CPU")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    parallel: ParallelSection | Literal["fsdp", "ddp"] = setting(
        doc='the [parallel] table (a bare "fsdp"/"ddp" is parallel.data)',
        factory=ParallelSection,
    )
    activation_checkpointing: Literal["none", "full", "selective", "manual"] = setting(
        "none", "selective: keep matmul outputs, recompute the rest; manual: the same, by hand"
    )
    compile: bool | Literal["auto"] = setting("auto", "torch.compile per block (auto: on CUDA)")
    max_skipped_steps: int = setting(5, "consecutive non-finite steps skipped before stopping")
    eval_every: int = setting(0, "steps between validation losses (0: only at the end)")
    eval_batches: int = setting(8, "validation batches of micro_batch sequences")
    out: str = setting("runs/train", "run directory")
    resume: str = setting("auto", "auto (newest complete checkpoint) | none | a step-N path")
    init: str = setting("", "start from this native checkpoint's weights (empty: random init)")
    seed: int = setting(0, "initialisation seed")
    log_every: int = setting(1, "steps between metrics.jsonl rows (host syncs happen there)")
    sync_every: int = setting(10, "at most this many steps between host syncs (signal checks)")
    peak_flops: float = setting(0.0, "per-device peak FLOP/s for MFU (0: the GPU table)")
    power_watts: float = setting(0.0, "per-device watts for the carbon estimate (0: table)")
    progress: bool = setting(True, "tqdm progress bar on rank 0")
    save_model: bool = setting(True, "write OUT/model (native checkpoint) at the end")
    plot: bool = setting(True, "write OUT/loss.png at the end")
    tensorboard: bool | Literal["auto"] = setting("auto", "OUT/tensorboard (auto: if installed)")
    wandb_project: str = setting("", "log to Weights & Biases under this project")
    wandb_run: str = setting("", "W&B run name")

    def __post_init__(self) -> None:
        # configs from before the [parallel] table said parallel = "fsdp" | "ddp"
        if isinstance(self.parallel, str):
            self.parallel = ParallelSection(data=self.parallel)  # type: ignore[arg-type]


def layout_of(cfg: TrainConfig, world_size: int) -> D.Layout:
    """The parallel layout ``cfg.parallel`` asks for on ``world_size`` processes; a
    ConfigError names the numbers when they do not multiply out."""
    p = cfg.parallel
    assert isinstance(p, ParallelSection)
    try:
        return D.make_layout(
            world_size,
            data=p.data,
            tp=p.tp,
            dp_shard=p.dp_shard,
            dp_replicate=p.dp_replicate,
            async_tp=p.async_tp,
        )
    except D.LayoutError as e:
        raise ConfigError(str(e)) from None


def check_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the first setting that cannot work (the config loader has
    already checked types and the allowed values of every Literal)."""
    for key in ("steps", "log_every", "sync_every"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)}: must be positive")
    for key in ("max_skipped_steps", "stop_at", "eval_every", "eval_batches"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)}: must be >= 0")
    for key in ("warmup_steps", "lr"):
        if getattr(cfg.optim, key) < 0:
            raise ConfigError(f"optim.{key}={getattr(cfg.optim, key)}: must be >= 0")
    for key in ("every", "keep"):
        if getattr(cfg.checkpoint, key) < 0:
            raise ConfigError(f"checkpoint.{key}={getattr(cfg.checkpoint, key)}: must be >= 0")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas}: expected two numbers")


def model_args(cfg: TrainConfig, vocab_size: int, seq_len: int) -> ModelArgs:
    """The preset with the config's overrides (or, with ``init``, the checkpoint's own
    params.json: then only ``model.max_seq_len`` may change); vocab_size None: the
    tokenizer's size, max_seq_len None: at least ``seq_len``."""
    m = cfg.model
    overrides: dict[str, Any] = {
        f.name: getattr(m, f.name)
        for f in dataclasses.fields(ModelArgs)
        if getattr(m, f.name) is not None
    }
    if cfg.init:
        from llamaforge.checkpoint.native import read_params

        args, _ = read_params(cfg.init)
        clash = {k: v for k, v in overrides.items() if k != "max_seq_len" and getattr(args, k) != v}
        if clash:
            raise ConfigError(
                f"model.{next(iter(clash))}={next(iter(clash.values()))}: the model comes from "
                f"init={cfg.init!r}, whose params.json says otherwise; leave model.* unset"
            )
        args = dataclasses.replace(args, **overrides)
    else:
        overrides.setdefault("vocab_size", vocab_size)
        try:
            args = get_preset(m.preset, **overrides)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None
    if m.max_seq_len is None and args.max_seq_len < seq_len:
        args = dataclasses.replace(args, max_seq_len=seq_len)
    if args.max_seq_len < seq_len:
        raise ConfigError(
            f"model.max_seq_len={args.max_seq_len} is shorter than data.seq_len={seq_len}"
        )
    if args.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    return args.validate()


def grad_accum_steps(cfg: TrainConfig, seq_len: int, world_size: int) -> int:
    """batch_tokens / (micro_batch · seq_len · world_size), which must be a whole number;
    ``world_size`` counts the data-parallel ranks (a tensor group reads one batch)."""
    per_pass = cfg.micro_batch * seq_len * world_size
    if cfg.micro_batch <= 0 or seq_len <= 0 or cfg.batch_tokens <= 0:
        raise ConfigError("batch_tokens, micro_batch and data.seq_len must be positive")
    if cfg.batch_tokens % per_pass:
        nearest = max(1, round(cfg.batch_tokens / per_pass)) * per_pass
        raise ConfigError(
            f"batch_tokens={cfg.batch_tokens} is not divisible by micro_batch ({cfg.micro_batch})"
            f" × seq_len ({seq_len}) × data-parallel ranks ({world_size}) = {per_pass}; "
            f"use a multiple of {per_pass}, e.g. {nearest}"
        )
    return cfg.batch_tokens // per_pass


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why."""

    exit_code = 1


# -- the pluggable parts ------------------------------------------------------------------


class Loader(Protocol):
    """This rank's batches of micro_batch × accumulation rows each: (inputs, targets) or
    (inputs, targets, extras), extras being model keyword arguments (one row per row).

    A loader whose rows hold padding also has ``real_tokens``: the positions of the batch
    ``__next__`` last returned that are not padding (a host int it knows from the lengths);
    without it every position of a batch counts as a real token."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x, y, *rest = batch
    return x, y, (rest[0] if rest else {})


def _split_extras(
    extras: dict[str, torch.Tensor] | None, rows: int, parts: int
) -> list[dict[str, torch.Tensor]]:
    """Per micro-batch keyword arguments: each extra split by rows like the inputs."""
    if not extras:
        return [{}] * parts
    split = {k: v.split(rows) for k, v in extras.items()}
    return [{k: v[i] for k, v in split.items()} for i in range(parts)]


def load_native_weights(
    model: torch.nn.Module,
    ckpt_dir: str,
    args: ModelArgs,
    info: D.DistInfo,
    load_state: Callable[..., Any] | None = None,
) -> None:
    """Copy a native checkpoint's weights into ``model`` (sharded or not, with adapters or
    not). A sharded model (FSDP2, tensor parallelism: DTensor parameters) has every rank
    read only its own block of each tensor from the files (``read_parts``), with no
    collective; otherwise — and for a quantised base, which quantises whole tensors — rank 0
    reads the files and the other ranks get its weights. ``load_state``: what takes (model,
    full state, options=...) instead of torch's ``set_model_state_dict`` (LoRA's, for a
    quantised base)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from llamaforge.checkpoint.native import checked, iter_tensors

    params = list(model.parameters())
    quantised = any(D.is_quantised(p.to_local() if _is_dtensor(p) else p) for p in params)
    if any(_is_dtensor(p) for p in params) and not quantised:
        _load_own_parts(model, ckpt_dir, args)
        return
    broadcast = info.world_size > 1
    state: dict[str, torch.Tensor] = {}
    if info.is_main or not broadcast:
        state = dict(checked(iter_tensors(ckpt_dir), args, str(ckpt_dir)))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=False)
    (load_state or set_model_state_dict)(model, state, options=options)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _own_block(p: Any) -> tuple[slice, ...] | None:
    """The block of the full tensor that this rank's shard of the DTensor ``p`` holds, one
    slice per dimension; None when the shard is not one block (FSDP2 over tensor-parallel
    shards of the same dimension: a strided shard)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(type(pl) not in (Shard, Replicate) for pl in p.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(p.to_local().shape):
        return None
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def _load_own_parts(model: torch.nn.Module, ckpt_dir: str, args: ModelArgs) -> None:
    """Every parameter's own block read from the checkpoint; a shard that is not one block
    reads the whole tensor and keeps its piece. Parameters the checkpoint lacks (adapters)
    keep their values."""
    from llamaforge.checkpoint.native import CheckpointError, read_parts, tensor_shapes
    from llamaforge.parallel.apply import shard_of

    shapes = tensor_shapes(ckpt_dir, args)  # names and shapes checked against params.json
    params = {D.unwrapped_name(n): p for n, p in model.named_parameters()}
    blocks: dict[str, tuple[slice, ...]] = {}
    for name in shapes:
        p = params.get(name)
        if p is None or not p.is_floating_point():
            raise CheckpointError(
                f"{ckpt_dir}: {name} is not a floating-point parameter of this sharded model "
                "(quantised base weights load in one process or under DDP)"
            )
        blocks[name] = (_own_block(p) if _is_dtensor(p) else None) or (slice(None),)
    for name, part in read_parts(ckpt_dir, blocks):
        p = params[name]
        local = p.to_local() if _is_dtensor(p) else p
        if blocks[name] == (slice(None),) and local is not p:
            part = shard_of(part.to(local.dtype), p)
        local.copy_(part)


LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the next sync step and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)
        self._old.clear()


@dataclass
class StepResult:
    """One optimizer step, on the device: summed loss / global target count, the global
    gradient norm (before clipping), whether the update was applied, and the tokens the
    step computed over every data-parallel rank (``tokens``: real ones, padding excluded;
    ``positions``: every position of the padded rows)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor
    stop: torch.Tensor  # > 0 when some rank received SIGTERM/SIGINT before the step
    tokens: torch.Tensor
    positions: torch.Tensor


@dataclass
class _Loop:
    """What the training loop carries from step to step: counters kept on the device (the
    host reads them on sync steps only) and the host's readings at the last sync."""

    end: int
    first_step: int
    peak_flops: float | None
    writer: MetricsWriter | None
    bar: Any  # tqdm on rank 0, or None
    tokens: torch.Tensor  # real tokens since the run began (float64; checkpointed)
    positions: torch.Tensor  # positions computed, padding included, in this process
    skipped_run: torch.Tensor  # consecutive skipped steps
    skipped_count: torch.Tensor
    last_saved: int
    t_train: float
    t_last: float
    tokens_last: float
    positions_last: float = 0.0
    loss: float = math.nan
    grad_norm: float = math.nan
    val_loss: float | None = None
    stopped: bool = False
    skipped_total: int = 0

    def count(self, r: StepResult) -> None:
        """Add a step's results, on the device."""
        self.skipped_run = (self.skipped_run + 1) * (~r.finite)
        self.skipped_count = self.skipped_count + (~r.finite)
        self.tokens += r.tokens
        self.positions += r.positions

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def trained_params(model: torch.nn.Module, base: set[str]) -> dict[str, int]:
    """``flops_per_token``'s counts for a model on any device (a DTensor counts its global
    shape): ``weights`` (the parameters in ``base``, the plain model's names, that take
    part in a matmul), ``trained`` (parameters that get a gradient) and ``adapters``
    (parameters not in ``base``). Lookup tables take no matmul: the model's ``lookups``
    names them (default: the input embedding table)."""
    lookups = getattr(model, "lookups", {"tok_embeddings.weight"})
    weights = trained = adapters = 0
    for name, p in model.named_parameters():
        name = D.unwrapped_name(name)
        if name in lookups:
            continue
        trained += p.numel() if p.requires_grad else 0
        if name in base:
            weights += p.numel()
        else:
            adapters += p.numel()
    return {"weights": weights, "trained": trained, "adapters": adapters}


# -- the trainer ----------------------------------------------------------------------------


def _check_model_fn(cfg: TrainConfig, tp: int) -> None:
    """What a model other than ``model.py``'s (``Trainer(model_fn=...)``) cannot do: be
    written as a native (Meta-named) checkpoint, run the hand-written LLaMA block backward,
    or take LLaMA's tensor-parallel plan."""
    if cfg.save_model:
        raise ConfigError(
            "save_model=true: a native checkpoint holds model.py's LLaMA, and this run trains "
            "another model (model_fn); set save_model=false (its DCP checkpoints still resume)"
        )
    if cfg.activation_checkpointing == "manual" or tp > 1:
        raise ConfigError(
            f"activation_checkpointing={cfg.activation_checkpointing}, parallel.tp={tp}: the "
            "hand-written backward and tensor parallelism are LLaMA's block's; another model "
            "(model_fn) takes none/selective/full checkpointing and tp=1"
        )


class Trainer:
    """One training run. ``all_targets_count``: every target of every batch counts (no
    ignore_index), so the global target count is known without a collective.
    ``prepare_model`` changes the model on the meta device before it is parallelised (e.g.
    adds LoRA adapters); ``load_state`` loads ``init``'s tensors in place of torch's
    ``set_model_state_dict`` (see ``load_native_weights``); ``after_init`` runs once the
    weights are initialised or loaded from ``init``; ``logits_where_trained`` computes the
    output layer only at positions whose target counts (finetuning, where prompts and
    padding are most positions); ``model_fn`` builds another module than ``model.py``'s
    Transformer from the args (the ablation blocks, ``science/blocks.py``), with the same
    ``init_std``/``num_params`` and a ``forward(tokens)``. A batch is ``(inputs,
    targets)`` or ``(inputs, targets, extras)`` with ``extras`` model keyword arguments
    split with the rows (packing's positions, mask)."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: D.DistInfo,
        *,
        args: ModelArgs,
        seq_len: int,
        loader: Loader,
        val_batches: list[Any] | None = None,
        loss_fn: LossFn = cross_entropy,
        all_targets_count: bool = True,
        name: str = "train",
        stop: StopFlag | None = None,
        prepare_model: Callable[[torch.nn.Module], None] | None = None,
        after_init: Callable[[torch.nn.Module], None] | None = None,
        load_state: Callable[..., Any] | None = None,
        logits_where_trained: bool = False,
        model_fn: Callable[[ModelArgs], torch.nn.Module] | None = None,
    ) -> None:
        check_config(cfg)
        self.cfg, self.info, self.args, self.seq_len = cfg, info, args, seq_len
        self.loader, self.val = loader, list(val_batches or [])
        self.loss_fn, self.all_targets_count, self.name = loss_fn, all_targets_count, name
        self.stop_flag = stop or StopFlag()
        self.prepare_model, self.after_init = prepare_model, after_init
        self.load_state = load_state
        self.logits_where_trained = logits_where_trained
        self.model_fn = model_fn
        self.layout = layout_of(cfg, info.world_size)
        self.tp = self.layout.tp
        if model_fn is not None:
            _check_model_fn(cfg, self.tp)
        if self.tp > 1:
            try:
                D.check_tp_divisible(args, self.tp, seq_len)
            except D.LayoutError as e:
                raise ConfigError(str(e)) from None
            if logits_where_trained:
                raise ConfigError(
                    f"parallel.tp={self.tp}: tensor parallelism is for pretraining; "
                    f"{name} computes logits at selected positions only, which the "
                    "vocabulary-parallel loss does not do (use tp=1)"
                )
        self.accum = grad_accum_steps(cfg, seq_len, self.layout.dp)
        self.device = info.device
        self.amp = (
            torch.bfloat16
            if cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
            else None
        )
        self.fsdp = self.layout.data == "fsdp" and self.layout.dp > 1
        self.compiled = cfg.compile is True or (
            cfg.compile == "auto" and self.device.type == "cuda"
        )
        self.out = Path(cfg.out)
        self.checkpointer = Checkpointer(
            Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.out / "checkpoints",
            keep=cfg.checkpoint.keep,
            info=info,
        )
        self.step, self.tokens_seen = 0, 0
        self.resumed_from: Path | None = None
        self.outputs: dict[str, Any] = {}  # extra paths for the summary (e.g. an adapter)
        self.model: torch.nn.Module
        self.optimizer: torch.optim.AdamW
        self.flops_per_token = flops_per_token(args, seq_len)  # exact once the model is built

    # -- build ----------------------------------------------------------------------------

    def build(self) -> Trainer:
        """Model, parallelism and optimizer. The model is built on the meta device; FSDP2
        shards it there and every rank materialises only its shards, with values that do
        not depend on the sharding (``distributed.init_params``)."""
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed)
        self._zero = torch.zeros((), device=self.device)
        self._one = torch.ones((), device=self.device)
        model = self.meta_model()
        sharded = self.fsdp or self.tp > 1  # materialised shard by shard after parallelize
        if not sharded:  # DDP broadcasts rank 0's weights when it wraps: materialise first
            model = model.to_empty(device=self.device)
            self._init_weights(model)
        model = D.parallelize(
            model,
            info,
            activation_checkpointing=cfg.activation_checkpointing,
            compile=self.compiled,
            param_dtype=self.amp if self.fsdp else None,
            layout=self.layout,
        )
        if sharded:
            model = model.to_empty(device=self.device)
            self._init_weights(model)
        model.train()
        self.model = model
        frozen = any(not p.requires_grad for p in model.parameters())
        if frozen:  # checkpoints hold what trains; the rest comes from ``init``
            self.checkpointer.keys = {
                D.unwrapped_name(n) for n, p in model.named_parameters() if p.requires_grad
            }
        betas = (float(cfg.optim.betas[0]), float(cfg.optim.betas[1]))
        self.optimizer = build_optimizer(
            model, cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=betas, eps=cfg.optim.eps
        )
        # FSDP2's MixedPrecisionPolicy casts the parameters itself; otherwise autocast does
        self.autocast = None if self.fsdp else self.amp
        return self

    def meta_model(self) -> torch.nn.Module:
        """The model on the meta device (nothing allocated) with ``prepare_model`` applied;
        sets ``n_params`` and ``flops_per_token`` (which counts what trains: a frozen base
        skips its weight gradients). ``build`` starts here, and so does a plan."""
        if self.model_fn is None:
            model: torch.nn.Module = build_model(self.args, device="meta", init=False)
        else:
            with torch.device("meta"):
                model = self.model_fn(self.args)
        self.n_params = model.num_params()  # type: ignore[operator]
        base = {name for name, _ in model.named_parameters()}
        if self.prepare_model is not None:
            self.prepare_model(model)
        self.param_counts = trained_params(model, base)
        self.flops_per_token = flops_per_token(self.args, self.seq_len, **self.param_counts)
        return model

    def _init_weights(self, model: torch.nn.Module) -> None:
        """Random init (sharding-independent), then ``init``'s weights when given."""
        D.init_params(model, self.cfg.seed)
        if self.cfg.init:
            load_native_weights(model, self.cfg.init, self.args, self.info, self.load_state)
        if self.after_init is not None:
            self.after_init(model)

    def resume(self) -> Path | None:
        """Load ``cfg.resume`` (auto: the newest checkpoint that passes verification, damaged
        newer ones skipped with a warning); returns its path."""
        r = self.cfg.resume
        if r in ("", "none", "no", "false"):
            return None
        try:
            if r == "auto":  # the newest good one: damaged newer ones skipped with a warning
                path = self.checkpointer.latest_good()
                if path is None:
                    return None
            else:
                path = Path(r)
            meta = self.checkpointer.load(path, self.model, self.optimizer)
        except CheckpointerError as e:
            raise ConfigError(f"resume={r!r}: {e}") from None
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens"])
        self.loader.load_state_dict(meta["loader"])
        D.print0(f"resumed from {path} at step {self.step}")
        self.resumed_from = path
        return path

    # -- one step -------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast)

    def _loss_parallel(self) -> contextlib.AbstractContextManager:
        """With tensor parallelism the logits stay split over the vocabulary: the cross
        entropy (forward and backward) runs on the shards, never gathering them."""
        if self.tp <= 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def _loss(
        self, x: torch.Tensor, y: torch.Tensor, kw: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one micro-batch. With ``logits_where_trained`` the output layer runs
        only where a target counts (a host sync for the selection's size, repaid by
        skipping the vocabulary-wide matmul and log-softmax on prompts and padding)."""
        if self.logits_where_trained:
            keep = y != -100
            return self.loss_fn(self.model(x, only=keep, **kw), y[keep])
        return self.loss_fn(self.model(x, **kw), y)

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return lr_at(
            step,
            peak=o.lr,
            warmup=o.warmup_steps,
            total=self.cfg.steps,
            final_ratio=o.final_lr_ratio,
        )

    def target_count(self, y: torch.Tensor) -> float | torch.Tensor:
        """What a step's summed loss is divided by: the targets of the global batch, all of
        them (``all_targets_count``) or those that are not -100, counted on the device and
        summed over the data-parallel ranks. A loss that counts something else (preference
        pairs) overrides it."""
        if self.all_targets_count:
            return float(self.cfg.batch_tokens)
        return (D.all_sum((y != -100).sum().double()) / self.tp).clamp(min=1.0)

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: float | None = None,
        extras: dict[str, torch.Tensor] | None = None,
        tokens: int | None = None,
    ) -> StepResult:
        """Forward and backward over this rank's micro-batches, clip, and the AdamW update
        unless the loss or gradient norm is non-finite. Nothing here waits for the device.
        ``tokens``: the batch's real (non-padding) tokens, default every position of x.

        loss = Σ per-token losses over every micro-batch and rank / global target count.
        DDP and FSDP2 average gradients over the data-parallel ranks, hence the dp factor in
        ``scale``; FSDP2 reduce-scatters after every micro-batch (see grad_sync). Tensor
        parallelism's gradients are exact sums already (DTensor's backward)."""
        cfg, model = self.cfg, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) if lr is None else lr
        tp = self.tp  # a tensor group's ranks hold the same batch: every sum counts it tp times
        count = self.target_count(y)
        scale = self.layout.dp / count
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        xs, ys = x.split(cfg.micro_batch), y.split(cfg.micro_batch)
        kws = _split_extras(extras, cfg.micro_batch, len(xs))
        for i, (xm, ym, kw) in enumerate(zip(xs, ys, kws)):
            with D.grad_sync(model, i == len(xs) - 1), self._autocast(), self._loss_parallel():
                loss, _ = self._loss(xm, ym, kw)
            with self._loss_parallel():
                (loss * scale).backward()
            loss_sum += D.full_tensor(loss.detach()).double()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        norm = D.full_tensor(norm)  # a global norm: the same on every rank
        stop = self._one if self.stop_flag.signum is not None else self._zero
        # the loss all-reduce carries the stop flag and the token counts: one collective, and
        # no host sync (new_full passes the host's counts to a fill kernel, not a copy)
        real = x.numel() if tokens is None else tokens
        counts = [loss_sum.new_full((), float(n)) for n in (real, x.numel())]
        totals = D.all_reduce_sum(torch.stack([loss_sum, stop.double(), *counts]))
        loss_v = totals[0] / (count * tp)
        finite = torch.isfinite(loss_v) & torch.isfinite(norm)
        if getattr(self.optimizer, "defaults", {}).get("fused"):
            # fused AdamW skips the update on the device when found_inf is set
            self.optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
            self.optimizer.step()
        elif bool(finite):  # a host check: free on the CPU
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(
            loss=loss_v,
            grad_norm=norm,
            finite=finite,
            stop=totals[1],
            tokens=totals[2] / tp,
            positions=totals[3] / tp,
        )

    # -- validation -------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean next-token loss over the validation batches, split across data-parallel
        ranks (data rank r takes batches r, r + dp, …; a tensor group shares its batch) and
        summed. Every rank runs the same number of forward passes — FSDP2 gathers
        parameters inside each — so a rank past the end repeats a batch uncounted."""
        if not self.val:
            return None
        info, model, dp = self.info, self.model, self.layout.dp
        was_training = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        rounds = -(-len(self.val) // dp)
        for k in range(rounds):
            i = k * dp + self.layout.dp_rank(info.rank)
            x, y, kw = _unpack(self.val[min(i, len(self.val) - 1)])
            x, y = x.to(self.device), y.to(self.device)
            kw = {k: v.to(self.device) for k, v in kw.items()}
            with self._autocast(), self._loss_parallel():
                loss, n = self._loss(x, y, kw)
            if i < len(self.val):  # (a tensor group adds its loss tp times: so does n)
                total[0] += D.full_tensor(loss).double()
                total[1] += n
        D.all_reduce_sum(total)
        model.train(was_training)
        return float(total[0] / total[1].clamp(min=1))

    # -- checkpoints ----------------------------------------------------------------------

    def save(self) -> Path:
        extra = {"step": self.step, "tokens": self.tokens_seen, "loader": self.loader.state_dict()}
        try:
            return self.checkpointer.save(self.step, self.model, self.optimizer, extra)
        except CheckpointerError as e:
            raise TrainingError(str(e)) from None

    # -- the loop ---------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train from ``self.step`` to ``steps`` (or ``stop_at``); returns the loop's
        results for ``finalize``. A step queues its work on the device and goes on; only
        a sync step (``_sync``) waits to read what the device computed."""
        loop = self._start_loop()
        try:
            while self.step < loop.end and not loop.stopped:
                lr = self.lr_at(self.step)
                x, y, extras = _unpack(next(self.loader))
                tokens = getattr(self.loader, "real_tokens", None)
                r = self.train_step(x, y, lr, extras, tokens=tokens)
                loop.count(r)
                self.step += 1
                self._after_step(loop, r, lr)
        finally:
            loop.close()
        return {
            "loss": loop.loss,
            "grad_norm": loop.grad_norm,
            "val_loss": loop.val_loss,
            "stopped": loop.stopped,
            "skipped_steps": loop.skipped_total,
            "steps_this_run": self.step - loop.first_step,
            "train_seconds": time.perf_counter() - loop.t_train,
        }

    def _start_loop(self) -> _Loop:
        """The metrics writer (rank 0), the progress bar and the loop's counters."""
        cfg, info, device = self.cfg, self.info, self.device
        writer = (
            MetricsWriter(
                self.out,
                tensorboard=str(cfg.tensorboard).lower(),
                wandb_project=cfg.wandb_project,
                wandb_run=cfg.wandb_run,
                config=to_dict(cfg),
            )
            if info.is_main
            else None
        )
        bar = None
        if info.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.steps, initial=self.step, desc=self.name, unit="step", file=sys.stderr
            )
        seen = float(self.tokens_seen)
        now = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return _Loop(
            end=min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps,
            first_step=self.step,
            peak_flops=device_peak_flops(device, cfg.peak_flops),
            writer=writer,
            bar=bar,
            tokens=torch.full((), seen, dtype=torch.float64, device=device),
            positions=torch.zeros((), dtype=torch.float64, device=device),
            skipped_run=torch.zeros((), device=device),
            skipped_count=torch.zeros((), device=device),
            last_saved=self.step if self.resumed_from is not None else -1,
            t_train=now,
            t_last=now,
            tokens_last=seen,
        )

    def _after_step(self, loop: _Loop, r: StepResult, lr: float) -> None:
        """Sync on logging, checkpoint and validation steps and every ``sync_every``."""
        cfg, step = self.cfg, self.step
        every = cfg.checkpoint.every
        log_now = step % cfg.log_every == 0 or step == loop.end
        ckpt_now = (every > 0 and step % every == 0) or step == loop.end
        val_now = bool(self.val) and (
            (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == cfg.steps
        )
        if log_now or ckpt_now or val_now or step % cfg.sync_every == 0:
            self._sync(loop, r, lr, log=log_now, checkpoint=ckpt_now, validate=val_now)
        elif loop.bar is not None:
            loop.bar.update(1)

    def _sync(
        self, loop: _Loop, r: StepResult, lr: float, *, log: bool, checkpoint: bool, validate: bool
    ) -> None:
        """A sync step: the host reads what the device computed, reports skipped steps,
        logs a metrics row, validates, stops after too many non-finite steps in a row,
        saves a checkpoint and stops on a signal."""
        cfg, step = self.cfg, self.step
        loop.loss, loop.grad_norm = float(r.loss), float(r.grad_norm)
        finite, run = bool(r.finite), int(loop.skipped_run)
        new_skips = int(loop.skipped_count) - loop.skipped_total
        loop.skipped_total += new_skips
        signalled = float(r.stop) > 0
        if new_skips:
            D.print0(
                f"warning: step {step}: {new_skips} step(s) with a non-finite loss or "
                f"gradient norm since the last sync were skipped ({run} in a row now, "
                f"limit {cfg.max_skipped_steps}); last loss {loop.loss}, norm {loop.grad_norm}"
            )
        row = self._metrics_row(loop, lr, finite)
        if validate:
            loop.val_loss = row["val_loss"] = self.validate()
        if loop.writer is not None and (log or validate):  # every validation loss is kept
            loop.writer.write(row)
        if loop.bar is not None:
            loop.bar.update(1)
            tok_s = f"{row['tokens_per_s']:.0f}"
            loop.bar.set_postfix(loss=f"{loop.loss:.4f}", lr=f"{lr:.2e}", tok_s=tok_s)
        if run > cfg.max_skipped_steps:
            latest = self.checkpointer.latest()
            last = f"the last checkpoint is {latest}" if latest else "no checkpoint"
            raise TrainingError(
                f"step {step}: the loss or gradient was not finite for {run} steps in "
                f"a row (max_skipped_steps={cfg.max_skipped_steps}); {last}. Lower "
                f"optim.lr (now {cfg.optim.lr}) or check the data."
            )
        if (checkpoint or signalled) and step != loop.last_saved:
            if finite:
                self.save()
                loop.last_saved = step
            else:
                D.print0(f"step {step}: skipped (non-finite): no checkpoint written")
        loop.t_last = time.perf_counter()  # checkpoints and validation are not throughput
        if signalled:
            D.print0(f"signal received: stopped after step {step}")
            loop.stopped = True

    def _metrics_row(self, loop: _Loop, lr: float, finite: bool) -> dict[str, Any]:
        """The metrics.jsonl row of this sync step. Throughput counts the tokens computed
        since the last sync: ``tokens_per_s`` (and ``mfu``) the real ones, padding
        excluded, ``padded_tokens_per_s`` every position of the padded rows; ``tokens``
        is the run's real tokens so far."""
        now = time.perf_counter()
        tokens, positions = torch.stack([loop.tokens, loop.positions]).tolist()
        self.tokens_seen = round(tokens)
        seconds = max(1e-9, now - loop.t_last)
        tok_s = (tokens - loop.tokens_last) / seconds
        padded_s = (positions - loop.positions_last) / seconds
        loop.tokens_last, loop.positions_last = tokens, positions
        world, peak = self.info.world_size, loop.peak_flops
        row: dict[str, Any] = {
            "step": self.step,
            "loss": loop.loss,
            "lr": lr,
            "grad_norm": loop.grad_norm,
            "tokens": self.tokens_seen,
            "tokens_per_s": tok_s,
            "tokens_per_s_per_device": tok_s / world,
            "padded_tokens_per_s": padded_s,
            "mfu": self.flops_per_token * tok_s / (peak * world) if peak else None,
            "peak_mem_bytes": _peak_memory(self.device),
        }
        if not finite:
            row["skipped"] = True
        return row

    # -- the end of a run -------------------------------------------------------------------

    def export(self, model_dir: Path, tokenizer: Any, extra: dict[str, Any]) -> Path | None:
        """The full model as a native checkpoint (gathered from the shards onto the CPU);
        subclasses export differently (e.g. adapters) and may return None."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from llamaforge.checkpoint.native import save_state

        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.info.is_main:
            save_state(full.items(), self.args, tokenizer, model_dir, overwrite=True, extra=extra)
        D.barrier()
        return model_dir

    def finalize(
        self, results: dict[str, Any], *, tokenizer: Any, t_start: float, epochs: Any = None
    ) -> dict[str, Any]:
        """Native checkpoint (when the schedule is complete), loss plot and summary.json."""
        cfg, info = self.cfg, self.info
        model_dir = None
        if self.step >= cfg.steps and cfg.save_model:
            model_dir = self.export(
                self.out / "model",
                tokenizer,
                {self.name: {"step": self.step, "tokens": self.tokens_seen}},
            )
        plot = None
        if info.is_main and cfg.plot and self.step > 0:
            try:
                plot = str(plot_run(self.out))
            except (ImportError, ValueError) as e:  # matplotlib missing, nothing finite yet
                D.print0(f"no loss plot: {e}")
        wall = time.perf_counter() - t_start
        device_hours = wall * info.world_size / 3600
        watts = device_watts(self.device, cfg.power_watts)
        summary: dict[str, Any] = {
            "step": self.step,
            **results,
            "tokens": self.tokens_seen,
            "epochs": epochs,
            "wall_seconds": wall,
            "device": device_name(self.device),
            "world_size": info.world_size,
            "params": self.n_params,
            "flops_per_token": self.flops_per_token,
            "device_hours": device_hours,
            "carbon": carbon(device_hours, watts) if watts else None,
            "model": str(model_dir) if model_dir else None,
            **self.outputs,
            "checkpoints": str(self.checkpointer.root),
            "plot": plot,
        }
        summary["next"] = self.next_step(summary)
        if info.is_main:
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            D.print0(format_summary(summary))
        return summary

    def next_step(self, summary: dict[str, Any]) -> str | None:
        """The command line that uses what the run made, printed last (None: nothing to
        use, or the subclass prints it itself)."""
        if not summary["model"]:
            return None
        from llamaforge.inference.chat import next_command

        return next_command(summary["model"])

    def describe(self) -> str:
        """The one line a run prints before its first step."""
        a, cfg = self.args, self.cfg
        return (
            f"model {self.n_params / 1e6:.2f}M params, {a.n_layers} layers, dim {a.dim}, "
            f"vocab {a.vocab_size}; {self.info.world_size} process(es) on "
            f"{device_name(self.device)} ({self.layout.describe()}), batch "
            f"{cfg.batch_tokens} tokens = {self.accum} × {cfg.micro_batch} × {self.seq_len} × "
            f"{self.layout.dp}, "
            f"{'bf16' if self.amp else 'fp32'}, activation checkpointing "
            f"{cfg.activation_checkpointing}, compile {'on' if self.compiled else 'off'}"
        )


def format_summary(s: dict[str, Any]) -> str:
    kind = "device" if s["device"].startswith("CPU") else "GPU"
    if s["steps_this_run"] == 0:
        return f"nothing to train: the run is already at step {s['step']}" + (
            f"; model: {s['model']}" if s["model"] else ""
        )
    lines = [
        f"step {s['step']}: loss {s['loss']:.4f}"
        + (f", validation loss {s['val_loss']:.4f}" if s["val_loss"] is not None else "")
        + (f", {s['skipped_steps']} skipped step(s)" if s["skipped_steps"] else ""),
        f"{s['world_size']} × {s['device']}: {s['wall_seconds']:.1f} s wall, "
        f"{s['device_hours']:.4f} {kind}-hours",
    ]
    c = s["carbon"]
    if c is not None:
        lines.append(
            f"carbon (paper's formula, {c['watts']:.0f} W × PUE {c['pue']}): "
            f"{c['mwh'] * 1e3:.4f} kWh, {c['tco2eq'] * 1e3:.4f} kg CO2eq"
        )
    else:
        lines.append("carbon: no power figure for this device (set power_watts=...)")
    if s["model"]:
        lines.append(f"model: {s['model']}")
    if s["plot"]:
        lines.append(f"loss curve: {s['plot']}")
    if s.get("next"):
        lines.append(f"next: {s['next']}")
    return "\n".join(lines)


def run_training(trainer: Trainer, *, tokenizer: Any, epochs: Callable[[], Any]) -> dict[str, Any]:
    """build → resume → config.json → fit → finalize, with the signal handlers installed."""
    t_start = time.perf_counter()
    trainer.stop_flag.install()
    try:
        trainer.build()
        trainer.resume()
        if trainer.info.is_main:
            trainer.out.mkdir(parents=True, exist_ok=True)
            config = json.dumps(to_dict(trainer.cfg), indent=2) + "\n"
            atomic_write(trainer.out / "config.json", config)
        D.print0(trainer.describe())
        results = trainer.fit()
        return trainer.finalize(results, tokenizer=tokenizer, t_start=t_start, epochs=epochs())
    finally:
        trainer.stop_flag.restore()


__all__ = [
    "CheckpointSection",
    "ModelSection",
    "OptimSection",
    "ParallelSection",
    "StepResult",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "check_config",
    "grad_accum_steps",
    "layout_of",
    "model_args",
    "run_training",
]
