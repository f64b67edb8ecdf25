"""Pretraining (SPEC §1.5-1.6): AdamW (0.9, 0.95), wd 0.1, clip 1.0, warmup + cosine to
10 %, batch size in tokens, gradient accumulation, FSDP2/DDP over torchrun processes,
resumable sharded checkpoints (torch.distributed.checkpoint) and per-step JSON metrics.

    python -m llamaforge.pretrain configs/pretrain/tiny-cpu.toml steps=100 out=runs/a
    torchrun --nproc_per_node 8 -m llamaforge.pretrain CONFIG [key=value ...]

Outputs under ``out``: ``config.json``, ``metrics.jsonl`` (one line per logged step),
``checkpoints/step-NNNNNN`` (DCP shards + ``state.json``) and, at the end, ``model/`` (a
native checkpoint for ``llamaforge.load``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from . import distributed as D
from .checkpoint import save_state
from .config import ConfigError, load_config, to_dict
from .data.mixture import MixtureLoader, MixtureSampler, open_sources, validation_batches
from .flops import carbon, device_spec, flops_per_token
from .metrics import MetricsWriter, plot_run
from .model import ModelArgs, build_model
from .presets import get_preset
from .tokenizer import Tokenizer
from .train import build_optimizer, cross_entropy, lr_at

CKPT_RE = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """dcp.save/load without a process group warn that they assume one process: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclass
class ModelSection:
    preset: str = "1M"
    # None: the preset's value. vocab_size None: the tokenizer's size.
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None  # None: at least data.seq_len
    vocab_size: int | None = None


@dataclass
class DataSection:
    dir: str = "data/stdlib"
    tokenizer: str = "data/stdlib/tokenizer.model"
    seq_len: int = 256
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 3e-4
    warmup_steps: int = 2000
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip: float = 1.0


@dataclass
class CheckpointSection:
    every: int = 1000  # steps between checkpoints (0: only at the end / on a signal)
    keep: int = 3  # newest checkpoints kept (0: all)
    dir: str = ""  # default OUT/checkpoints


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    batch_tokens: int = 4_194_304  # global tokens per optimizer step (paper: 4M)
    micro_batch: int = 8  # sequences per rank per forward pass
    steps: int = 1000  # length of the schedule
    stop_at: int = 0  # stop (with a checkpoint) after this step, e.g. for job time limits
    dtype: str = "auto"  # auto: bf16 on CUDA (fp32 master weights), fp32 on CPU | fp32 | bf16
    device: str = "auto"
    parallel: str = "fsdp"  # fsdp | ddp (used when world_size > 1)
    activation_checkpointing: str = "none"  # none | full | selective (the paper's)
    compile: bool | str = "auto"  # torch.compile per block: auto (on CUDA, off on CPU) | bool
    max_skipped_steps: int = 5  # consecutive non-finite steps skipped before stopping
    eval_every: int = 0  # steps between validation losses (0: only at the end)
    eval_batches: int = 8
    out: str = "runs/pretrain"
    resume: str = "auto"  # auto: newest complete checkpoint in the dir | none | a path
    seed: int = 0
    log_every: int = 1  # steps between metrics.jsonl lines
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU (0: from the GPU table)
    power_watts: float = 0.0  # per-device power for the carbon estimate (0: GPU table)
    progress: bool = True  # tqdm bar on rank 0
    save_model: bool = True  # write OUT/model at the end of the schedule
    plot: bool = True  # write OUT/loss.png at the end
    tensorboard: bool | str = "auto"  # auto (when installed) | true | false: OUT/tensorboard
    wandb_project: str = ""  # log to Weights & Biases under this project
    wandb_run: str = ""


# -- helpers ----------------------------------------------------------------------------


def model_args(cfg: PretrainConfig, vocab_size: int) -> ModelArgs:
    m = cfg.model
    overrides: dict[str, Any] = {
        k: getattr(m, k)
        for k in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "multiple_of",
            "ffn_dim_multiplier",
            "norm_eps",
            "rope_theta",
            "max_seq_len",
        )
        if getattr(m, k) is not None
    }
    overrides["vocab_size"] = m.vocab_size if m.vocab_size is not None else vocab_size
    args = get_preset(m.preset, **overrides)
    if m.max_seq_len is None and args.max_seq_len < cfg.data.seq_len:
        args = replace(args, max_seq_len=cfg.data.seq_len)
    if args.max_seq_len < cfg.data.seq_len:
        raise ConfigError(
            f"model.max_seq_len={args.max_seq_len} is shorter than data.seq_len={cfg.data.seq_len}"
        )
    if args.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={args.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    return args.validate()


def grad_accum_steps(cfg: PretrainConfig, world_size: int) -> int:
    """batch_tokens / (micro_batch · seq_len · world_size), which must be a whole number."""
    per_pass = cfg.micro_batch * cfg.data.seq_len * world_size
    if cfg.micro_batch <= 0 or cfg.data.seq_len <= 0 or cfg.batch_tokens <= 0:
        raise ConfigError("batch_tokens, micro_batch and data.seq_len must be positive")
    if cfg.batch_tokens % per_pass:
        nearest = max(1, round(cfg.batch_tokens / per_pass)) * per_pass
        raise ConfigError(
            f"batch_tokens={cfg.batch_tokens} is not divisible by micro_batch ({cfg.micro_batch})"
            f" × seq_len ({cfg.data.seq_len}) × world_size ({world_size}) = {per_pass}; "
            f"use a multiple of {per_pass}, e.g. {nearest}"
        )
    return cfg.batch_tokens // per_pass


def validate(cfg: PretrainConfig) -> None:
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"dtype={cfg.dtype!r}: expected auto, fp32 or bf16")
    if cfg.parallel not in D.PARALLEL_MODES:
        raise ConfigError(f"parallel={cfg.parallel!r}: expected one of {D.PARALLEL_MODES}")
    if cfg.steps <= 0:
        raise ConfigError(f"steps={cfg.steps}: must be positive")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas}: expected two numbers")
    if cfg.activation_checkpointing not in D.AC_MODES:
        raise ConfigError(
            f"activation_checkpointing={cfg.activation_checkpointing!r}: expected one of "
            f"{', '.join(D.AC_MODES)}"
        )
    for key in ("compile", "tensorboard"):
        if not isinstance(getattr(cfg, key), bool) and getattr(cfg, key) != "auto":
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: expected auto, true or false")
    if cfg.max_skipped_steps < 0:
        raise ConfigError(f"max_skipped_steps={cfg.max_skipped_steps}: must be >= 0")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why."""


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_compile(cfg: PretrainConfig, device: torch.device) -> bool:
    return cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_peak_flops(cfg: PretrainConfig, device: torch.device) -> float | None:
    """Per-device peak for MFU: ``peak_flops`` when set, else the GPU table (flops.py)."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    spec = device_spec(device_name(device)) if device.type == "cuda" else None
    return spec.peak_flops if spec else None


def device_watts(cfg: PretrainConfig, device: torch.device) -> float | None:
    if cfg.power_watts > 0:
        return cfg.power_watts
    spec = device_spec(device_name(device)) if device.type == "cuda" else None
    return spec.watts if spec else None


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max_memory_allocated, else this process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


# -- checkpoints ------------------------------------------------------------------------


def checkpoint_root(cfg: PretrainConfig) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.out) / "checkpoints"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (renamed into place, with their state.json),
    oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file() and (p / ".metadata").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    info: D.DistInfo,
    keep: int,
) -> Path:
    """Write ``root/step-NNNNNN`` atomically: every rank writes its shards into a hidden
    temporary directory, which rank 0 renames after a barrier; then prune to ``keep``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    D.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bad = [k for k, v in model_sd.items() if not torch.isfinite(_local(v)).all()]
    if D.all_reduce_max(torch.tensor([len(bad)], device=info.device))[0] > 0:
        D.barrier()
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(
            f"step {step}: non-finite values in {bad[:3] or 'the weights'}: checkpoint "
            f"{final} not written (the previous ones are kept)"
        )
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rngs = D.all_gather_object(_rng_state())
    if info.is_main:
        state = {**meta, "world_size": info.world_size, "rng": rngs}
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
    D.barrier()
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    local = getattr(t, "to_local", None)
    return local() if local is not None else t


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: D.DistInfo
) -> dict[str, Any]:
    """Load the model and optimizer shards (resharded to this world size) and return the
    checkpoint's state.json (step, tokens, loader state, RNG)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    meta = json.loads((path / STATE_FILE).read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    rngs = meta["rng"] if isinstance(meta["rng"], list) else [meta["rng"]]
    # each rank gets its own generator state back; on another world size, rank 0's
    _set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
    return meta


def resolve_resume(cfg: PretrainConfig) -> Path | None:
    if cfg.resume in ("", "none", "no", "false"):
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(checkpoint_root(cfg))
        return found[-1][1] if found else None
    path = Path(cfg.resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume={cfg.resume!r}: not a complete checkpoint (no {STATE_FILE})")
    return path


# -- signals ----------------------------------------------------------------------------


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves at the end of the step and exits."""

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
            signal.signal(sig, old)
        self._old.clear()


# -- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def _val_loss(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: torch.dtype | None,
    info: D.DistInfo,
) -> float:
    """Mean next-token loss over ``batches``, split across ranks (rank r takes batches r,
    r + world, …) and summed. Every rank runs the same number of forward passes — FSDP2
    gathers parameters inside each — so a rank past the end repeats a batch uncounted."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    rounds = -(-len(batches) // info.world_size)
    for k in range(rounds):
        i = k * info.world_size + info.rank
        x, y = batches[min(i, len(batches) - 1)]
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp):
            loss, n = cross_entropy(model(x), y)
        if i < len(batches):
            total[0] += loss.double()
            total[1] += n
    D.all_reduce_sum(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def _autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


# -- the run ------------------------------------------------------------------------------


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary (last step, loss, val_loss, stopped, paths)."""
    validate(cfg)
    info = D.init(cfg.device)
    stop = StopFlag()
    stop.install()
    try:
        return _run(cfg, info, stop)
    finally:
        stop.restore()
        D.cleanup()


def _run(cfg: PretrainConfig, info: D.DistInfo, stop: StopFlag) -> dict[str, Any]:
    t_start = time.perf_counter()
    accum = grad_accum_steps(cfg, info.world_size)
    device = info.device
    amp = autocast_dtype(cfg, device)
    fsdp = cfg.parallel == "fsdp" and info.world_size > 1
    out = Path(cfg.out)
    tok = Tokenizer(cfg.data.tokenizer)
    args = model_args(cfg, tok.vocab_size)
    seq_len = cfg.data.seq_len
    global_batch = cfg.batch_tokens // seq_len
    sources, weights = open_sources(cfg.data.dir, "train", tok.sha256())
    loader = MixtureLoader(
        MixtureSampler(sources, weights, seq_len, cfg.data.seed),
        global_batch,
        info.rank,
        info.world_size,
        device,
    )
    val = (
        validation_batches(cfg.data.dir, seq_len, cfg.micro_batch, cfg.eval_batches, tok.sha256())
        if cfg.eval_batches > 0
        else []
    )

    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(cfg.seed)
    # Built on the meta device (no memory); FSDP2 shards it there, then every rank
    # materialises only its shards. fp32 master weights; the same values on any world size.
    model = build_model(args, device="meta", init=False)
    n_params = model.num_params()
    compiled = use_compile(cfg, device)
    if not fsdp:  # DDP broadcasts rank 0's weights when it wraps: materialise first
        model = model.to_empty(device=device)
        D.init_params(model, cfg.seed)
    model = D.parallelize(
        model,
        info,
        parallel=cfg.parallel,
        activation_checkpointing=cfg.activation_checkpointing,
        compile=compiled,
        param_dtype=amp if fsdp else None,
    )
    if fsdp:
        model = model.to_empty(device=device)
        D.init_params(model, cfg.seed)
    # FSDP2's MixedPrecisionPolicy casts parameters itself; otherwise autocast does.
    autocast = None if fsdp else amp
    model.train()
    betas = (float(cfg.optim.betas[0]), float(cfg.optim.betas[1]))
    optimizer = build_optimizer(
        model, cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=betas, eps=cfg.optim.eps
    )

    step, tokens_seen = 0, 0
    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer, info)
        step, tokens_seen = int(meta["step"]), int(meta["tokens"])
        loader.load_state_dict(meta["loader"])
        D.print0(f"resumed from {resume_from} at step {step}")

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    dev_name = device_name(device)
    D.print0(
        f"model {n_params / 1e6:.2f}M params, {args.n_layers} layers, dim {args.dim}, "
        f"vocab {args.vocab_size}; {info.world_size} process(es) on {dev_name}, "
        f"batch {cfg.batch_tokens} tokens = {accum} × {cfg.micro_batch} × {seq_len} × "
        f"{info.world_size}, {'bf16' if amp else 'fp32'}, activation checkpointing "
        f"{cfg.activation_checkpointing}, compile {'on' if compiled else 'off'}"
    )
    fpt = flops_per_token(args, seq_len)
    peak = device_peak_flops(cfg, device)
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    ckpt_root = checkpoint_root(cfg)
    writer = (
        MetricsWriter(
            out,
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

        bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", unit="step", file=sys.stderr)

    def meta_now() -> dict[str, Any]:
        return {"step": step, "tokens": tokens_seen, "loader": loader.state_dict()}

    loss_v, norm_v, val_loss = float("nan"), float("nan"), None
    last_saved = step if resume_from is not None else -1
    stopped, skipped_in_a_row, skipped_total = False, 0, 0
    first_step = step
    t_train = time.perf_counter()
    t_last = t_train
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < end:
            lr = lr_at(
                step,
                peak=cfg.optim.lr,
                warmup=cfg.optim.warmup_steps,
                total=cfg.steps,
                final_ratio=cfg.optim.final_lr_ratio,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next(loader)
            xs, ys = x.split(cfg.micro_batch), y.split(cfg.micro_batch)
            # loss = Σ per-token losses over every micro-batch and rank / global target count;
            # DDP/FSDP average gradients over ranks, hence the world_size factor.
            count = all_sum_scalar((y != -100).sum().to(torch.float64), device)
            scale = info.world_size / max(1.0, count)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for i, (xm, ym) in enumerate(zip(xs, ys)):
                with D.grad_sync(model, i == len(xs) - 1):
                    with _autocast(device, autocast):
                        loss, _ = cross_entropy(model(xm), ym)
                    (loss * scale).backward()
                loss_sum += loss.detach().double()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
            loss_v = all_sum_scalar(loss_sum, device) / max(1.0, count)
            norm_v = D.grad_norm_value(norm)  # the same on every rank (a global norm)
            finite = _finite(loss_v, norm_v)
            if finite:
                optimizer.step()
                skipped_in_a_row = 0
            else:  # skip the update: the weights and Adam's moments stay as they were
                skipped_in_a_row += 1
                skipped_total += 1
                D.print0(
                    f"warning: step {step + 1}: loss {loss_v} / grad norm {norm_v} is not "
                    f"finite, update skipped ({skipped_in_a_row} in a row, limit "
                    f"{cfg.max_skipped_steps})"
                )
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += cfg.batch_tokens
            now = time.perf_counter()
            tok_s = cfg.batch_tokens / max(1e-9, now - t_last)
            t_last = now

            row: dict[str, Any] = {
                "step": step,
                "loss": loss_v,
                "lr": lr,
                "grad_norm": norm_v,
                "tokens": tokens_seen,
                "tokens_per_s": tok_s,
                "tokens_per_s_per_device": tok_s / info.world_size,
                "mfu": fpt * tok_s / (peak * info.world_size) if peak else None,
                "peak_mem_bytes": peak_memory_bytes(device),
            }
            if not finite:
                row["skipped"] = True
            if val and ((cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == cfg.steps):
                val_loss = _val_loss(model, val, device, autocast, info)
                row["val_loss"] = val_loss
            signalled = all_max_flag(stop.signum is not None, device)
            if writer is not None and (step % max(1, cfg.log_every) == 0 or step == end):
                writer.write(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if skipped_in_a_row > cfg.max_skipped_steps:
                found = list_checkpoints(ckpt_root)
                last = f"the last checkpoint is {found[-1][1]}" if found else "no checkpoint"
                raise TrainingError(
                    f"step {step}: the loss or gradient was not finite for {skipped_in_a_row} "
                    f"steps in a row (max_skipped_steps={cfg.max_skipped_steps}); {last}. "
                    f"Lower optim.lr (now {cfg.optim.lr}) or check the data."
                )

            every = cfg.checkpoint.every
            want_save = (every > 0 and step % every == 0) or step == end or signalled
            if want_save and step != last_saved:
                if finite:
                    save_checkpoint(
                        ckpt_root, step, model, optimizer, meta_now(), info, cfg.checkpoint.keep
                    )
                    last_saved = step
                else:
                    D.print0(f"step {step}: skipped (non-finite): no checkpoint written")
                t_last = time.perf_counter()  # checkpoint time is not training throughput
            if signalled:
                D.print0(f"signal received: stopped after step {step}")
                stopped = True
                break
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    train_seconds = time.perf_counter() - t_train
    model_dir = None
    if step >= cfg.steps and cfg.save_model:
        model_dir = out / "model"
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if info.is_main:
            save_state(
                full.items(),
                args,
                tok,
                model_dir,
                overwrite=True,
                extra={"pretrain": {"step": step, "tokens": tokens_seen}},
            )
        D.barrier()
    plot = None
    if info.is_main and cfg.plot and step > 0:
        try:
            plot = str(plot_run(out))
        except (ImportError, ValueError) as e:  # matplotlib missing, nothing finite yet
            D.print0(f"no loss plot: {e}")
    wall = time.perf_counter() - t_start
    device_hours = wall * info.world_size / 3600
    watts = device_watts(cfg, device)
    summary: dict[str, Any] = {
        "step": step,
        "loss": loss_v,
        "grad_norm": norm_v,
        "val_loss": val_loss,
        "stopped": stopped,
        "skipped_steps": skipped_total,
        "tokens": tokens_seen,
        "epochs": loader.sampler.epochs(),
        "steps_this_run": step - first_step,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "device": dev_name,
        "world_size": info.world_size,
        "device_hours": device_hours,
        "carbon": carbon(device_hours, watts) if watts else None,
        "model": str(model_dir) if model_dir else None,
        "checkpoints": str(ckpt_root),
        "plot": plot,
    }
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        D.print0(format_summary(summary))
    return summary


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
        lines.append(f"model: {s['model']}  (llamaforge generate --ckpt {s['model']})")
    if s["plot"]:
        lines.append(f"loss curve: {s['plot']}")
    return "\n".join(lines)


def all_sum_scalar(t: torch.Tensor, device: torch.device) -> float:
    return float(D.all_reduce_sum(t.to(device=device, dtype=torch.float64).reshape(1))[0])


def all_max_flag(flag: bool, device: torch.device) -> bool:
    return bool(D.all_reduce_max(torch.tensor([int(flag)], device=device))[0])


def main(argv: list[str] | None = None) -> int:
    """``CONFIG [key=value ...]`` (or only overrides); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(PretrainConfig, path, argv)
        run_pretrain(cfg)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
