"""A model made parallel from outside: tensor parallelism (Megatron's column/row-wise
linears with DTensor, sequence parallelism on the norms and the residual stream, a
vocabulary-parallel output layer), then the data dimensions: FSDP2 (``fully_shard`` on
every ``TransformerBlock``, then on the root; HSDP with dp_replicate > 1) or, with tp = 1
only, DDP. Also the parameter initialisation of a sharded model, gradient sync for
accumulation, and the tensor-parallel load of a native checkpoint."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from llamaforge.parallel.activation_checkpointing import apply_activation_checkpointing
from llamaforge.parallel.layout import (
    Layout,
    LayoutError,
    build_mesh,
    check_tp_divisible,
    dp_mesh,
    make_layout,
)
from llamaforge.parallel.process import DistInfo, all_max_flag, print0


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: Any, *, sequence_parallel: bool = True, loss_parallel: bool = True
) -> None:
    """Split ``model`` (a bare ``Transformer``) over ``tp_mesh`` in place, Megatron-style:
    wq/wk/wv/w1/w3 column-wise (each rank computes its heads and its slice of the FFN),
    wo/w2 row-wise, the token embedding row-wise over the vocabulary.

    ``sequence_parallel`` (training): the residual stream and the RMSNorms run on this
    rank's slice of the sequence (Korthikanti et al. 2022): all-gather before the
    column-wise linears, reduce-scatter after the row-wise ones instead of all-reduce.
    ``loss_parallel``: the output layer's logits stay split over the vocabulary (a DTensor)
    for ``loss_parallel()``'s cross entropy, which never gathers the full logits.
    Without them (inference) the activations between blocks are whole and replicated and
    the output layer gathers the logits: any sequence length, KV-cache decoding included.

    The attention modules' head counts become the local ones (n_heads / tp), which the
    model's ``view``s then use; GQA's kv heads are split the same way."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    args = model.args  # type: ignore[union-attr]
    check_tp_divisible(args, tp)
    seq = Shard(1) if sequence_parallel else Replicate()
    out_layout = Shard(-1) if loss_parallel else Replicate()
    root_plan: dict[str, Any] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(
            input_layouts=seq, output_layouts=out_layout, use_local_output=not loss_parallel
        ),
    }
    if sequence_parallel:
        root_plan["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, root_plan)
    rest = (None,) * 5  # cos, sin, mask, cache, start_pos pass through untouched
    for block in model.layers:  # type: ignore[union-attr]
        plan: dict[str, Any] = {
            "attention": PrepareModuleInput(
                input_layouts=(seq, *rest), desired_input_layouts=(Replicate(), *rest)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareModuleInput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            "feed_forward.w3": ColwiseParallel(),
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)  # type: ignore[arg-type]
        attn = block.attention  # type: ignore[union-attr]
        attn.n_heads //= tp
        attn.n_kv_heads //= tp


def tp_cache_factory(model: nn.Module, tp: int) -> None:
    """Make ``model.setup_cache`` allocate a KV cache of this rank's kv heads only (the
    model sizes its cache from ``model.args``, whose head counts are the global ones)."""
    import dataclasses

    from llamaforge.model import KVCache

    args = model.args  # type: ignore[union-attr]
    local = dataclasses.replace(
        args, dim=args.dim // tp, n_heads=args.n_heads // tp, n_kv_heads=args.kv_heads // tp
    )
    if local.head_dim != args.head_dim:  # dim / n_heads is the same on every rank
        raise LayoutError(f"parallel.tp={tp}: dim {args.dim} does not split by head")

    def setup_cache(batch_size: int, max_seq_len: int | None = None, dtype: Any = None) -> Any:
        weight = model.tok_embeddings.weight  # type: ignore[union-attr]
        local_w = weight.to_local() if hasattr(weight, "to_local") else weight
        model.cache = KVCache(  # type: ignore[assignment]
            local, batch_size, max_seq_len or args.max_seq_len, dtype or local_w.dtype,
            local_w.device,
        )  # fmt: skip
        return model.cache

    model.setup_cache = setup_cache  # type: ignore[method-assign]


def _enable_async_tp(tp_mesh: Any, compiled: bool) -> None:
    """torch's asynchronous tensor parallelism: with the blocks compiled, Inductor
    micro-pipelines each all-gather / reduce-scatter with its matmul (symmetric memory,
    CUDA only)."""
    if tp_mesh.device_type != "cuda":
        raise LayoutError("parallel.async_tp=true needs CUDA GPUs (symmetric memory)")
    if not compiled:
        raise LayoutError("parallel.async_tp=true needs compile=true (an Inductor pass)")
    import torch._inductor.config as inductor_config

    inductor_config._micro_pipeline_tp = True


# prefixes that activation checkpointing, torch.compile, FSDP1 and DDP add to names
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as the bare model names it (and DCP's state dicts do)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("module.")


def parallelize(
    model: nn.Module,
    info: DistInfo,
    *,
    parallel: str = "fsdp",
    activation_checkpointing: str = "none",
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
    layout: Layout | None = None,
) -> nn.Module:
    """Apply, in this order (as torchtitan does): tensor + sequence parallelism when
    ``layout.tp > 1``, activation checkpointing per block, ``torch.compile`` per block,
    then FSDP2 over the data dimensions (every block, then the root) or DDP when there is
    more than one data-parallel rank. With FSDP2, ``param_dtype`` (bf16) is the
    MixedPrecisionPolicy's compute dtype, with gradients reduced in fp32; the sharded
    master weights and the optimizer states stay fp32. ``layout`` defaults to plain data
    parallelism (``parallel``) over every process."""
    if layout is None:
        layout = make_layout(info.world_size, data=parallel)
    if layout.world != info.world_size:
        raise LayoutError(f"layout {layout.describe()} is not for {info.world_size} processes")
    needs_mesh = info.world_size > 1 and (layout.tp > 1 or layout.data == "fsdp")
    mesh = build_mesh(layout, info.device.type) if needs_mesh else None
    if layout.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
        if layout.async_tp:
            _enable_async_tp(mesh["tp"], compile)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        for block in model.layers:  # type: ignore[union-attr]
            block.compile()  # in place: parameter names do not change
    if layout.dp <= 1:
        return model
    if layout.data == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        # A frozen quantised base is loaded alike on every rank and has no gradient; DDP's
        # broadcast when it wraps would pass it through floats (an NF4Tensor re-quantised)
        quantised = [name for name, p in model.named_parameters() if is_quantised(p)]
        ddp = nn.parallel.DistributedDataParallel
        ddp._set_params_and_buffers_to_ignore_for_model(model, quantised)
        return ddp(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = dp_mesh(mesh, layout)
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
        local = p.to_local() if hasattr(p, "to_local") else p
        if is_quantised(local):
            continue  # a frozen quantised base (QLoRA): loaded whole by its owner afterwards
        std = model.init_std(name)  # type: ignore[operator]
        if std is None:
            local.fill_(1.0)
            continue
        gen = torch.Generator(device=local.device).manual_seed(seed * 1_000_003 + i)
        full = torch.empty(p.shape, dtype=local.dtype, device=local.device)
        full.normal_(0.0, std, generator=gen)
        if local is p:
            p.copy_(full)
        else:
            local.copy_(shard_of(full, p))


def is_quantised(t: torch.Tensor) -> bool:
    """Whether ``t`` stores its values quantised: an integer tensor (int8 weights) or a
    tensor subclass that packs them (torchao's NF4Tensor). Such a parameter is frozen base
    storage that ``init_params`` leaves to the load that follows."""
    return not t.is_floating_point() or type(t) not in (torch.Tensor, nn.Parameter)


def shard_of(full: torch.Tensor, p: Any) -> torch.Tensor:
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
    # every rank holds the same ``full``: each cuts out its own piece, no communication
    return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()


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


def load_tensor_parallel(
    ckpt_dir: str | os.PathLike,
    info: DistInfo,
    tp: int,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | os.PathLike | None = None,
    strict: bool = False,
    force: bool = False,
) -> tuple[nn.Module, Any]:
    """A native checkpoint split over ``tp`` processes for inference (``--tp``): every rank
    builds the model on the meta device, splits it (tensor parallelism without sequence
    parallelism: any length, KV-cache decoding, whole logits on every rank) and reads
    only its own slices from the memory-mapped files. Returns ``(model, tokenizer)``, the
    model in eval mode, its KV cache sized to this rank's heads. ``force``: use a tokenizer
    other than the one params.json records (`open_checkpoint`)."""
    from llamaforge.checkpoint.native import (
        CheckpointError,
        checked,
        iter_tensors,
        non_finite,
        open_checkpoint,
        parse_dtype,
    )
    from llamaforge.model import Transformer

    if tp < 1 or info.world_size != tp:
        raise LayoutError(
            f"--tp {tp}: run it under torchrun with {tp} processes (torchrun "
            f"--nproc_per_node {tp} -m llamaforge …); this is {info.world_size} process(es)"
        )
    ckpt, args, tok = open_checkpoint(ckpt_dir, tokenizer, force=force)
    check_tp_divisible(args, tp)
    target = parse_dtype(dtype)
    stored = iter_tensors(ckpt)
    first = next(stored, None)
    if target is None:
        target = first[1].dtype if first is not None else torch.float32
    with torch.device("meta"):
        model = Transformer(args).to(target)
    mesh = build_mesh(make_layout(tp, tp=tp), info.device.type) if tp > 1 else None
    if mesh is not None:
        apply_tensor_parallel(model, mesh["tp"], sequence_parallel=False, loss_parallel=False)
        tp_cache_factory(model, tp)
    model = model.to_empty(device=info.device)
    params = dict(model.named_parameters())
    bad: list[str] = []

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        if first is not None:
            yield first
        yield from stored

    with torch.no_grad():
        for name, full in checked(tensors(), args, str(ckpt), params=str(ckpt / "params.json")):
            p = params[name]
            full = full.to(target)
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(shard_of(full, p) if local is not p else full)
            bad += non_finite([(name, local)])
    if all_max_flag(bool(bad), info.device):  # on every rank, or strict would hang the rest
        shown = ", ".join(bad[:5]) or "on another rank"
        msg = f"{ckpt}: tensor(s) with NaN or Inf values: {shown}"
        if strict:
            raise CheckpointError(f"{msg} (refused: strict)")
        print0(f"warning: {msg}; the model's outputs are not meaningful")
    return model.eval(), tok
