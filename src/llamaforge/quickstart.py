"""``llamaforge quickstart``: the whole path on a machine with nothing but the package.

Prepares the embedded default corpus — the Python standard library's sources (code) and
docs (prose) through the data pipeline's cleaners, a SentencePiece BPE tokenizer trained
on them and token shards with a held-out split by document — then trains a small LLaMA on
the two-source mixture with the paper's optimiser recipe, reports the validation loss
next to the unigram baseline, saves a native checkpoint and samples text.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load
from .data.mixture import open_sources
from .data.prepare import DataConfig, SourceConfig, prepare
from .generate import generate
from .pretrain import (
    CheckpointSection,
    DataSection,
    ModelSection,
    OptimSection,
    PretrainConfig,
    run_pretrain,
)
from .tokenizer import Tokenizer


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    vocab_size: int = 2048
    code_weight: float = 0.7  # sampling proportions of the two sources (normalised)
    docs_weight: float = 0.3
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 400
    warmup: int = 40
    lr: float = 3e-3
    val_fraction: float = 0.05  # documents held out for validation
    val_batches: int = 8
    samples: int = 3
    sample_tokens: int = 60
    seed: int = 0
    device: str = "auto"


def data_config(cfg: QuickstartConfig) -> DataConfig:
    """The embedded default corpus (configs/data/stdlib.toml) inside the run directory."""
    data = Path(cfg.out) / "data"
    return DataConfig(
        tokenizer=str(data / "tokenizer.model"),
        tokenizer_vocab_size=cfg.vocab_size,
        output=str(data),
        val_fraction=cfg.val_fraction,
        sources=[
            SourceConfig(name="code", kind="code", paths=["@stdlib"], weight=cfg.code_weight),
            SourceConfig(name="docs", kind="stdlib_docs", weight=cfg.docs_weight),
        ],
    )


def pretrain_config(cfg: QuickstartConfig, data_dir: str, tokenizer: str) -> PretrainConfig:
    """The quickstart's training run as a ``llamaforge pretrain`` configuration."""
    return PretrainConfig(
        model=ModelSection(
            preset="1M",
            dim=cfg.dim,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            multiple_of=32,
            max_seq_len=cfg.seq_len,
        ),
        data=DataSection(dir=data_dir, tokenizer=tokenizer, seq_len=cfg.seq_len, seed=cfg.seed),
        optim=OptimSection(lr=cfg.lr, warmup_steps=cfg.warmup),
        checkpoint=CheckpointSection(every=0, keep=1),
        batch_tokens=cfg.batch_size * cfg.seq_len,
        micro_batch=cfg.batch_size,
        steps=cfg.steps,
        device=cfg.device,
        eval_every=100,
        eval_batches=cfg.val_batches,
        out=cfg.out,
        resume="none",
        seed=cfg.seed,
        tensorboard=False,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Loss (nats/token) on ``val`` of a model that knows only the train token frequencies
    (add-one smoothed): what a language model must beat to have learned anything."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def run_quickstart(cfg: QuickstartConfig, log: Callable[[str], None] = print) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    log("1/4 data: the Python standard library's sources (code) and docs (prose)")
    dcfg = data_config(cfg)
    results = prepare(dcfg, progress=False, log=log)
    failed = [r["name"] for r in results if not r.get("complete")]
    if failed:
        raise RuntimeError(f"data preparation failed for {failed}")
    tok = Tokenizer(dcfg.tokenizer)
    sources, weights = open_sources(dcfg.output, tokenizer_sha256=tok.sha256())
    val_sources, _ = open_sources(dcfg.output, "val")
    train_ids = np.concatenate([a for s in sources for a in s.arrays])
    val_ids = np.concatenate([a for s in val_sources for a in s.arrays])
    unigram = unigram_cross_entropy(train_ids, val_ids, tok.vocab_size)
    log(
        f"    {len(train_ids):,} train / {len(val_ids):,} validation tokens; "
        f"unigram baseline {unigram:.3f} nats/token"
    )

    pcfg = pretrain_config(cfg, dcfg.output, dcfg.tokenizer)
    log(
        f"2/4 train: a {cfg.dim}-dim, {cfg.n_layers}-layer LLaMA, {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} tokens from the mixture (llamaforge pretrain)"
    )
    for stale in ("metrics.jsonl", "summary.json", "loss.png"):  # a fresh run each time
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    result = run_pretrain(pcfg)
    val_loss = float(result["val_loss"])
    log("3/4 saved")
    ckpt = Path(result["model"])
    model, tok = load(ckpt, device=_device(cfg.device))
    metrics_path = out / "metrics.jsonl"
    log("4/4 sample")
    prompts = ["The", "def ", "import "][: cfg.samples]
    samples = generate(
        model,
        tok,
        prompts,
        max_new_tokens=cfg.sample_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=cfg.seed,
    )
    summary = {
        "val_loss": val_loss,
        "unigram_loss": unigram,
        "val_perplexity": math.exp(val_loss),
        "checkpoint": str(ckpt),
        "metrics": str(metrics_path),
        "epochs": result["epochs"],
        "loss_curve": result["plot"],
        "pretrain": result,
        "seconds": round(time.time() - t0, 1),
        "samples": [p + s for p, s in zip(prompts, samples)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"\nvalidation loss {val_loss:.3f} nats/token (perplexity {math.exp(val_loss):.1f}) "
        f"vs unigram baseline {unigram:.3f}"
    )
    log(f"checkpoint: {ckpt}   metrics: {metrics_path}   ({summary['seconds']} s)")
    log(f"loss curve: {result['plot']}")
    for text in summary["samples"]:
        log("--- sample ---\n" + text)
    log(f"\nnext: llamaforge generate --ckpt {ckpt} --prompt 'def '")
    return summary
