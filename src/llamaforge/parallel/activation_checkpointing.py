"""Activation checkpointing applied to a model from outside: ``full`` (every block),
``partial``, ``selective`` (the paper's: keep the expensive matmul outputs) and ``manual``
(the hand-written backward of ``manual_backward``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

AC_MODES = ("none", "full", "selective", "manual")


def _selective_policy() -> Callable[..., Any]:
    """Keep what is expensive to recompute: the matmul outputs (every linear layer) and
    the attention kernels' outputs; recompute the element-wise rest (norms, RoPE, SiLU,
    products, residual adds) in the backward pass — the paper's policy (SPEC §1.6)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    save: set[Any] = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    # packed rows on CUDA: flex_attention is a higher-order op, saved like the SDPA kernels
    flex = getattr(getattr(torch, "_higher_order_ops", None), "flex_attention", None)
    if flex is not None:
        save.add(flex)

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every ``TransformerBlock`` in place: ``full`` keeps only the block's input and
    recomputes the whole block in the backward pass; ``selective`` keeps the linear and
    attention outputs (see ``_selective_policy``); ``manual`` keeps the same with a
    hand-written backward (``manual_backward``: no ``w2`` output, no checkpointing machinery);
    ``none`` keeps everything."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing={mode!r}: expected one of {AC_MODES}")
    if mode == "none":
        return
    if mode == "manual":
        from llamaforge.parallel.manual_backward import use_manual_backward

        for block in model.layers:  # type: ignore[union-attr]
            use_manual_backward(block)  # in place: parameter names do not change
        return
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs: dict[str, Any] = {"preserve_rng_state": False}  # the model has no dropout
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy())
    layers = model.layers  # type: ignore[union-attr]
    for i, block in enumerate(layers):
        # state_dict keys lose the wrapper's prefix in DCP's get_state_dict, so
        # checkpoints are the same with and without activation checkpointing.
        layers[i] = checkpoint_wrapper(block, **kwargs)
