"""``llamaforge quickstart``: the whole path on a machine with nothing but the package.

Builds a corpus from the Python standard library (its docs as prose, its sources as
code), trains a SentencePiece BPE tokenizer on it, tokenizes with a held-out validation
split by document, trains a small LLaMA with the paper's optimiser recipe, reports the
validation loss next to the unigram baseline, saves a native checkpoint and samples text.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import save
from .config import to_dict
from .data.stdlib import code_documents, docs_documents
from .generate import generate
from .model import ModelArgs, build_model
from .tokenizer import Tokenizer, train_tokenizer
from .train import build_optimizer, evaluate_loss, lr_at, train_step


@dataclass
class QuickstartConfig:
    out: str = "runs/quickstart"
    code_mb: float = 1.5  # megabytes of standard-library source (the docs are always used)
    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 400
    warmup: int = 40
    lr: float = 3e-3
    val_every_n_docs: int = 20  # every n-th document goes to the validation split
    val_batches: int = 8
    samples: int = 3
    sample_tokens: int = 60
    seed: int = 0
    device: str = "auto"


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


def _windows(tokens: np.ndarray, seq_len: int, starts: np.ndarray, device) -> tuple:
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(rows).to(device)
    return t[:, :-1], t[:, 1:]


def run_quickstart(cfg: QuickstartConfig, log: Callable[[str], None] = print) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    log("1/5 corpus: the Python standard library's docs and sources")
    docs = list(docs_documents()) + list(code_documents(max_bytes=int(cfg.code_mb * 1e6)))
    random.Random(cfg.seed).shuffle(docs)
    val_docs = docs[:: cfg.val_every_n_docs]
    train_docs = [d for i, d in enumerate(docs) if i % cfg.val_every_n_docs]
    log(
        f"    {len(train_docs)} train / {len(val_docs)} validation documents, "
        f"{sum(map(len, docs)) / 1e6:.1f} MB"
    )

    log(f"2/5 tokenizer: SentencePiece BPE, {cfg.vocab_size} pieces, digits split, byte fallback")
    tok = train_tokenizer(iter(train_docs), out / "tokenizer.model", vocab_size=cfg.vocab_size)

    log("3/5 tokenize")
    train_ids = np.concatenate(
        [np.asarray(ids, dtype=np.uint16) for ids in tok.encode_batch(train_docs, eos=True)]
    )
    val_ids = np.concatenate(
        [np.asarray(ids, dtype=np.uint16) for ids in tok.encode_batch(val_docs, eos=True)]
    )
    unigram = unigram_cross_entropy(train_ids, val_ids, tok.vocab_size)
    log(
        f"    {len(train_ids):,} train / {len(val_ids):,} validation tokens; "
        f"unigram baseline {unigram:.3f} nats/token"
    )

    args = ModelArgs(
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        vocab_size=tok.vocab_size,
        multiple_of=32,
        max_seq_len=cfg.seq_len,
    )
    model = build_model(args, device=device)
    log(
        f"4/5 train: {model.num_params() / 1e6:.2f}M-parameter LLaMA on {device}, "
        f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens"
    )
    optimizer = build_optimizer(model, cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    n_val = min(cfg.val_batches * cfg.batch_size, (len(val_ids) - 1) // cfg.seq_len)
    val_starts = np.arange(n_val) * cfg.seq_len
    val_batches = [
        _windows(val_ids, cfg.seq_len, val_starts[i : i + cfg.batch_size], device)
        for i in range(0, n_val, cfg.batch_size)
    ]
    metrics_path = out / "metrics.jsonl"
    model.train()
    with (
        open(metrics_path, "w") as metrics,
        tqdm(total=cfg.steps, desc="train", unit="step") as bar,
    ):
        for step in range(cfg.steps):
            starts = rng.integers(0, len(train_ids) - cfg.seq_len - 1, cfg.batch_size)
            lr = lr_at(step, peak=cfg.lr, warmup=cfg.warmup, total=cfg.steps)
            loss, gnorm = train_step(
                model, optimizer, [_windows(train_ids, cfg.seq_len, starts, device)], lr
            )
            if not math.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}; lower lr (now {cfg.lr})")
            record = {
                "step": step + 1,
                "loss": loss,
                "lr": lr,
                "grad_norm": gnorm,
                "tokens": (step + 1) * cfg.batch_size * cfg.seq_len,
            }
            if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
                record["val_loss"] = evaluate_loss(model, val_batches)
            metrics.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
            bar.update()
    val_loss = evaluate_loss(model, val_batches)

    log("5/5 save and sample")
    ckpt = save(
        model.eval(), tok, out / "model", overwrite=True, extra={"quickstart": to_dict(cfg)}
    )
    prompts = ["The", "def ", "import "][: cfg.samples]
    samples = generate(
        model,
        Tokenizer(out / "tokenizer.model"),
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
        "seconds": round(time.time() - t0, 1),
        "samples": [p + s for p, s in zip(prompts, samples)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(
        f"\nvalidation loss {val_loss:.3f} nats/token (perplexity {math.exp(val_loss):.1f}) "
        f"vs unigram baseline {unigram:.3f}"
    )
    log(f"checkpoint: {ckpt}   metrics: {metrics_path}   ({summary['seconds']} s)")
    for text in summary["samples"]:
        log("--- sample ---\n" + text)
    log(f"\nnext: llamaforge generate --ckpt {ckpt} --prompt 'def '")
    return summary
