"""Pretraining (SPEC §1.5-1.6): the paper's recipe on prepared token shards — AdamW (0.9,
0.95), wd 0.1, clip 1.0, warmup + cosine to 10 %, batch size in tokens — on the shared
training core (``trainer.py``): FSDP2/DDP over torchrun processes, resumable sharded
checkpoints, per-step JSON metrics.

    llamaforge pretrain configs/pretrain/tiny-cpu.toml steps=100 out=runs/a
    torchrun --nproc_per_node 8 -m llamaforge pretrain CONFIG [key=value ...]
    python -m llamaforge pretrain …   (the same as llamaforge pretrain …)

Outputs under ``out``: ``config.json``, ``metrics.jsonl`` (a line per logged or validated step),
``checkpoints/step-NNNNNN`` (DCP shards + ``state.json``) and, at the end, ``model/`` (a
native checkpoint for ``llamaforge.load``), ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llamaforge import parallel as D
from llamaforge.config import setting
from llamaforge.model import ModelArgs
from llamaforge.training.trainer import TrainConfig


@dataclass
class DataSection:
    dir: str = setting("data/stdlib", "prepared data folder (llamaforge data prepare)")
    tokenizer: str = setting("data/stdlib/tokenizer.model", "the tokenizer the data used")
    seq_len: int = setting(256, "tokens per training sequence")
    seed: int = setting(0, "mixture sampling seed")


@dataclass
class PretrainConfig(TrainConfig):
    """``TrainConfig`` plus the prepared data to pretrain on."""

    data: DataSection = field(default_factory=DataSection)
    out: str = setting("runs/pretrain", "run directory")


def run_pretrain(
    cfg: PretrainConfig, model_fn: Callable[[ModelArgs], torch.nn.Module] | None = None
) -> dict[str, Any]:
    """Train per ``cfg``; returns the summary (last step, loss, val_loss, stopped, paths).
    ``model_fn``: another module than the LLaMA Transformer (``Trainer``'s)."""
    from llamaforge.data.mixture import (
        MixtureLoader,
        MixtureSampler,
        open_sources,
        validation_batches,
    )
    from llamaforge.tokenizer import Tokenizer
    from llamaforge.training.trainer import (
        Trainer,
        check_config,
        layout_of,
        model_args,
        run_training,
    )

    check_config(cfg)
    info = D.init(cfg.device)
    try:
        tok = Tokenizer(cfg.data.tokenizer)
        seq_len = cfg.data.seq_len
        args = model_args(cfg, tok.vocab_size, seq_len)
        sources, weights = open_sources(cfg.data.dir, "train", tok.sha256())
        sampler = MixtureSampler(sources, weights, seq_len, cfg.data.seed)
        layout = layout_of(cfg, info.world_size)  # a tensor group reads one batch part
        loader = MixtureLoader(
            sampler, cfg.batch_tokens // seq_len, layout.dp_rank(info.rank), layout.dp, info.device
        )
        val = (
            validation_batches(
                cfg.data.dir, seq_len, cfg.micro_batch, cfg.eval_batches, tok.sha256()
            )
            if cfg.eval_batches > 0
            else []
        )
        trainer = Trainer(
            cfg,
            info,
            args=args,
            seq_len=seq_len,
            loader=loader,
            val_batches=val,
            name="pretrain",
            model_fn=model_fn,
        )
        return run_training(trainer, tokenizer=tok, epochs=sampler.epochs)
    finally:
        D.cleanup()
