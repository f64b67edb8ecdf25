"""The paper's optimisation recipe (SPEC §1.5): AdamW (0.9, 0.95), weight decay 0.1 on
weight matrices, gradient clipping 1.0, linear warmup then cosine decay to 10 % of the peak
learning rate, and the summed next-token loss that a step divides by the global target
count. The training loop that uses them is ``trainer.py``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lr_at(step: int, *, peak: float, warmup: int, total: int, final_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``peak`` over ``warmup`` steps,
    then cosine to ``final_ratio * peak`` at ``total`` steps, constant after."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with decay on every matrix (embeddings and output included) and none on the
    RMSNorm gains, the usual reading of the paper's 'weight decay of 0.1'."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if fused is None:
        fused = all(p.is_cuda for p in decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """Summed next-token loss in fp32 and the number of counted targets."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.flatten(),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return loss, (targets != ignore_index).sum()
