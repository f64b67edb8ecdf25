"""Parallelism applied to a model from outside: the layout and device mesh (``layout``), the
process group and collectives (``process``), tensor parallelism, FSDP2/DDP and sharded
loading (``apply``), activation checkpointing (``activation_checkpointing``) and the
hand-written block backward (``manual_backward``). The names below are the package's API."""

from llamaforge.parallel.activation_checkpointing import AC_MODES, apply_activation_checkpointing
from llamaforge.parallel.apply import (
    apply_tensor_parallel,
    full_tensor,
    grad_sync,
    init_params,
    is_quantised,
    load_tensor_parallel,
    parallelize,
    tp_cache_factory,
    unwrapped_name,
)
from llamaforge.parallel.layout import (
    MESH_DIMS,
    PARALLEL_MODES,
    Layout,
    LayoutError,
    build_mesh,
    check_tp_divisible,
    make_layout,
)
from llamaforge.parallel.process import (
    DistInfo,
    all_gather_object,
    all_max_flag,
    all_reduce_max,
    all_reduce_sum,
    all_sum,
    barrier,
    cleanup,
    init,
    print0,
)

__all__ = [
    "AC_MODES",
    "MESH_DIMS",
    "PARALLEL_MODES",
    "DistInfo",
    "Layout",
    "LayoutError",
    "all_gather_object",
    "all_max_flag",
    "all_reduce_max",
    "all_reduce_sum",
    "all_sum",
    "apply_activation_checkpointing",
    "apply_tensor_parallel",
    "barrier",
    "build_mesh",
    "check_tp_divisible",
    "cleanup",
    "full_tensor",
    "grad_sync",
    "init",
    "init_params",
    "is_quantised",
    "load_tensor_parallel",
    "make_layout",
    "parallelize",
    "print0",
    "tp_cache_factory",
    "unwrapped_name",
]
