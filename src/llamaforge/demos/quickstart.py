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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llamaforge.checkpoint.native import load
from llamaforge.config import load_config, setting
from llamaforge.data.mixture import open_sources
from llamaforge.data.prepare import DataConfig, SourceConfig, prepare
from llamaforge.device import resolve_device
from llamaforge.files import atomic_write
from llamaforge.inference.chat import next_command
from llamaforge.inference.generate import generate
from llamaforge.tokenizer import Tokenizer
from llamaforge.training.pretrain import PretrainConfig, run_pretrain

# The quickstart's settings: a pretrain config (model, optim, batch …) shipped with the
# package, plus the corpus it prepares and the samples it prints.
CONFIG_FILE = Path(__file__).with_name("quickstart.toml")


@dataclass
class CorpusSection:
    vocab_size: int = setting(2048, "SentencePiece BPE pieces trained on the corpus")
    code_weight: float = setting(0.7, "sampling proportion of the stdlib sources (code)")
    docs_weight: float = setting(0.3, "sampling proportion of the stdlib docs (prose)")
    val_fraction: float = setting(0.05, "documents held out for validation")


@dataclass
class QuickstartConfig(PretrainConfig):
    """``llamaforge pretrain``'s settings (defaults in quickstart.toml) plus the corpus and
    the samples; ``data.dir``/``data.tokenizer`` empty: OUT/data."""

    corpus: CorpusSection = field(default_factory=CorpusSection)
    samples: int = setting(3, "samples printed at the end")
    sample_tokens: int = setting(60, "tokens per sample")
    out: str = setting("runs/quickstart", "run directory")


def quickstart_config(overrides: list[str] | None = None) -> QuickstartConfig:
    """quickstart.toml with ``key=value`` overrides (``steps=200 model.dim=96``)."""
    cfg = load_config(QuickstartConfig, CONFIG_FILE, overrides or [])
    data_dir = Path(cfg.out) / "data"
    if not cfg.data.dir:
        cfg.data.dir = str(data_dir)
    if not cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.dir) / "tokenizer.model")
    return cfg


def data_config(cfg: QuickstartConfig) -> DataConfig:
    """The embedded default corpus (configs/data/stdlib.toml) inside the run directory."""
    c = cfg.corpus
    return DataConfig(
        tokenizer=cfg.data.tokenizer,
        tokenizer_vocab_size=c.vocab_size,
        output=cfg.data.dir,
        val_fraction=c.val_fraction,
        sources=[
            SourceConfig(name="code", kind="code", paths=["@stdlib"], weight=c.code_weight),
            SourceConfig(name="docs", kind="stdlib_docs", weight=c.docs_weight),
        ],
    )


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Loss (nats/token) on ``val`` of a model that knows only the train token frequencies
    (add-one smoothed): what a language model must beat to have learned anything."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def run_quickstart(cfg: QuickstartConfig, log: Callable[[str], None] = print) -> dict:
    out = Path(cfg.out)
    if (out / "summary.json").is_file() or (out / "metrics.jsonl").is_file():
        log(
            f"{out} holds a previous quickstart run: this run replaces it (its prepared data "
            "is reused; --out DIR keeps the old run)"
        )
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

    log(
        f"2/4 train: a {cfg.model.dim}-dim, {cfg.model.n_layers}-layer LLaMA, {cfg.steps} "
        f"steps of {cfg.batch_tokens} tokens from the mixture (llamaforge pretrain)"
    )
    for stale in ("metrics.jsonl", "summary.json", "loss.png"):  # a fresh run each time
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    # the loss plot (metrics.plot_run) draws the baseline it finds in summary.json
    atomic_write(out / "summary.json", json.dumps({"unigram_loss": unigram}) + "\n")
    result = run_pretrain(cfg)
    val_loss = float(result["val_loss"])
    log("3/4 saved")
    ckpt = Path(result["model"])
    model, tok = load(ckpt, device=resolve_device(cfg.device))
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
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(
        f"\nvalidation loss {val_loss:.3f} nats/token (perplexity {math.exp(val_loss):.1f}) "
        f"vs unigram baseline {unigram:.3f}"
    )
    log(f"checkpoint: {ckpt}   metrics: {metrics_path}   ({summary['seconds']} s)")
    for text in summary["samples"]:
        log("--- sample ---\n" + text)
    log(f"\nnext: {next_command(ckpt, prompt='def ')}")
    return summary
