"""Process-group set-up and model wrapping for data-parallel pretraining.

A run launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment)
joins a process group — NCCL on CUDA, Gloo on CPU; anything else is a single process with
no group at all. With more than one process the model is wrapped with FSDP2
(``fully_shard`` on every ``TransformerBlock``, then on the root) or with DDP.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .flops import resolve_device  # its home is flops.py; re-exported here

PARALLEL_MODES = ("fsdp", "ddp")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process); returns ``t``."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` (``[obj]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a copy of ``t`` (asynchronous on the device: no host sync)."""
    return all_reduce_sum(t.clone())


def all_max_flag(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a host synchronisation: call it rarely)."""
    return bool(all_reduce_max(torch.tensor([int(flag)], device=device))[0])


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (to stderr unless ``file`` says otherwise)."""
    if int(os.environ.get("RANK", "0")) == 0:
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


AC_MODES = ("none", "full", "selective", "manual")

# prefixes that activation checkpointing, torch.compile, FSDP1 and DDP add to names
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as the bare model names it (and DCP's state dicts do)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("module.")


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
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}

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
        from .manual_backward import use_manual_backward

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


def parallelize(
    model: nn.Module,
    info: DistInfo,
    *,
    parallel: str = "fsdp",
    activation_checkpointing: str = "none",
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply, in this order (as torchtitan does): activation checkpointing per block,
    ``torch.compile`` per block, then FSDP2 (every block, then the root) or DDP when there
    is more than one process. With FSDP2, ``param_dtype`` (bf16) is the
    MixedPrecisionPolicy's compute dtype, with gradients reduced in fp32; the sharded
    master weights and the optimizer states stay fp32."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r}: expected one of {PARALLEL_MODES}")
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        for block in model.layers:  # type: ignore[union-attr]
            block.compile()  # in place: parameter names do not change
    if info.world_size <= 1:
        return model
    if parallel == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(model.layers)  # type: ignore[union-attr]
    # The token embedding is its own unit (as in torchtitan): a 32000 × 8192 table is
    # gathered only around the lookup, not for the whole forward pass with the root.
    fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=mp)  # type: ignore[arg-type]
    for i, block in enumerate(layers):
        # the last block's parameters are needed first in the backward pass: keep them
        # gathered after the forward instead of freeing and re-gathering them.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # Explicit prefetching: while block i computes, block i+1's all-gather (forward) or
    # block i-1's (backward) is already in flight, overlapping communication with compute.
    for i, block in enumerate(layers):
        if hasattr(block, "set_modules_to_forward_prefetch") and i + 1 < len(layers):
            block.set_modules_to_forward_prefetch([layers[i + 1]])
        if hasattr(block, "set_modules_to_backward_prefetch") and i > 0:
            block.set_modules_to_backward_prefetch([layers[i - 1]])
    return model


@torch.no_grad()
def init_params(model: nn.Module, seed: int) -> None:
    """Initialise ``model`` (per its ``init_std``) so that the values do not depend on how
    the parameters are sharded: parameter i draws its full tensor from its own generator,
    seeded by (seed, i), on its device, and each rank keeps its FSDP2 shard of it. One
    process and N processes start from the same weights; no rank ever holds more than one
    full parameter (the largest is the embedding table)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        std = model.init_std(name)  # type: ignore[operator]
        local = p.to_local() if hasattr(p, "to_local") else p
        if std is None:
            local.fill_(1.0)
            continue
        gen = torch.Generator(device=local.device).manual_seed(seed * 1_000_003 + i)
        full = torch.empty(p.shape, dtype=local.dtype, device=local.device)
        full.normal_(0.0, std, generator=gen)
        if local is p:
            p.copy_(full)
        else:
            local.copy_(_shard_of(full, p))


def _shard_of(full: torch.Tensor, p: Any) -> torch.Tensor:
    """This rank's part of ``full`` laid out like the DTensor ``p``."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim == 1 and isinstance(placements[0], Shard):  # FSDP2: torch.chunk on one dim
        dim = placements[0].dim
        chunks = torch.chunk(full, mesh.size(), dim=dim)
        rank = mesh.get_local_rank()
        piece = chunks[rank] if rank < len(chunks) else full.narrow(dim, 0, 0)
        if piece.shape == p.to_local().shape:
            return piece
    return distribute_tensor(full, mesh, placements).to_local()  # (broadcasts from rank 0)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Under DDP, skip the gradient all-reduce for a micro-batch that is not the last of
    its step (gradient accumulation): DDP keeps a full gradient per rank either way.

    FSDP2 reduce-scatters after every micro-batch and accumulates into the sharded
    gradient, as torchtitan does: turning its sync off would keep an unsharded fp32
    gradient of the whole model on every rank until the last micro-batch (4 bytes per
    parameter: 27 GB for 7B), which defeats the sharding. So this is a no-op for FSDP2."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    yield


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (e.g. FSDP2's gradient norm), or ``t`` itself."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t
