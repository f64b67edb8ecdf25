"""The parallel layout of a run: a (dp_replicate, dp_shard, tp) device mesh, tensor
parallelism innermost, with the checks that the model's sizes divide by it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARALLEL_MODES = ("fsdp", "ddp")
MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


class LayoutError(ValueError):
    """The parallel layout does not fit the world size or the model; the message says why."""


@dataclass(frozen=True)
class Layout:
    """How ``world`` processes split the work: ``dp_replicate × dp_shard × tp``, ranks laid
    out with the tensor dimension innermost (a tensor group is ``tp`` consecutive ranks, on
    one node when tp ≤ GPUs per node, as Megatron and torchtitan place it)."""

    data: str = "fsdp"
    tp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    async_tp: bool = False

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: how many different batches one step reads."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """Which part of the global batch ``rank`` reads (the same for a whole tensor group)."""
        return rank // self.tp

    def describe(self) -> str:
        parts = [f"dp_replicate {self.dp_replicate}"] if self.dp_replicate > 1 else []
        parts.append(f"{'dp_shard' if self.data == 'fsdp' else 'ddp'} {self.dp_shard}")
        if self.tp > 1:
            parts.append(f"tp {self.tp}" + (" (async)" if self.async_tp else ""))
        return " × ".join(parts)


def make_layout(
    world_size: int,
    *,
    data: str = "fsdp",
    tp: int = 1,
    dp_shard: int = -1,
    dp_replicate: int = 1,
    async_tp: bool = False,
) -> Layout:
    """The layout for ``world_size`` processes; ``dp_shard=-1`` takes what tp and
    dp_replicate leave. A ``LayoutError`` names the numbers that do not multiply out."""
    if data not in PARALLEL_MODES:
        raise LayoutError(f"parallel.data={data!r}: expected one of {PARALLEL_MODES}")
    for name, v in (("tp", tp), ("dp_replicate", dp_replicate)):
        if v < 1:
            raise LayoutError(f"parallel.{name}={v}: must be >= 1")
    if dp_shard == -1:
        if world_size % (tp * dp_replicate):
            raise LayoutError(
                f"parallel.tp={tp} × parallel.dp_replicate={dp_replicate} = "
                f"{tp * dp_replicate} does not divide the world size {world_size}"
            )
        dp_shard = world_size // (tp * dp_replicate)
    if dp_shard < 1:
        raise LayoutError(f"parallel.dp_shard={dp_shard}: must be >= 1 (or -1: the rest)")
    if dp_replicate * dp_shard * tp != world_size:
        raise LayoutError(
            f"parallel.dp_replicate={dp_replicate} × parallel.dp_shard={dp_shard} × "
            f"parallel.tp={tp} = {dp_replicate * dp_shard * tp}, but the world size (torchrun "
            f"processes) is {world_size}"
        )
    if data == "ddp" and (tp > 1 or dp_replicate > 1):
        raise LayoutError(
            'parallel.data="ddp" is plain data parallelism (tp=1, dp_replicate=1); use '
            '"fsdp" (with dp_replicate for HSDP) to combine data with tensor parallelism'
        )
    if async_tp and tp == 1:
        raise LayoutError("parallel.async_tp=true needs parallel.tp > 1")
    return Layout(data, tp, dp_shard, dp_replicate, async_tp)


def check_tp_divisible(args: Any, tp: int, seq_len: int | None = None) -> None:
    """Raise a ``LayoutError`` naming the first model size that tensor parallelism over
    ``tp`` ranks cannot split evenly (and the sequence length, with sequence parallelism)."""
    if tp <= 1:
        return
    sizes = [
        ("n_heads", args.n_heads),
        ("n_kv_heads", args.kv_heads),
        ("FFN hidden size (ffn_hidden_dim)", args.ffn_hidden_dim),
        ("vocab_size", args.vocab_size),
    ]
    if seq_len is not None:
        sizes.append(("seq_len (sequence parallelism)", seq_len))
    for name, value in sizes:
        if value % tp:
            raise LayoutError(
                f"parallel.tp={tp}: the model's {name}={value} is not divisible by {tp}; "
                f"choose a tp that divides it"
            )


def build_mesh(layout: Layout, device_type: str) -> Any:
    """The (dp_replicate, dp_shard, tp) DeviceMesh over every process."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (layout.dp_replicate, layout.dp_shard, layout.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def dp_mesh(mesh: Any, layout: Layout) -> Any:
    """The data dimensions of ``mesh``: 2-D (replicate, shard) for HSDP, else 1-D."""
    if layout.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]
