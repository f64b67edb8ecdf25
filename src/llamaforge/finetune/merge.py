"""Folding a LoRA adapter into its base, shard by shard: ``llamaforge lora merge`` and the
finetune export with ``lora.merge = true``.

The merged checkpoint mirrors the base file for file: each weight file of the base is read
a block of rows at a time in its stored dtype (safetensors' ``get_slice``), a targeted
weight becomes ``W + scaling · B A`` (computed in fp32, stored back in W's dtype: what
merging the loaded fp32 model gives), and the bytes go to the same offsets of a file with
the base's header, so the shard layout, tensor order and index stay the base's. Host memory
holds the adapter and one block (16 MiB in fp32) with its update, never a tensor, a shard
or the model; the output's ``weights_sha256`` is hashed on the way out, and the base's on
the way in when it has none recorded.

The base's identity: a checkpoint records its ``weights_sha256`` when it is written, so the
check against the adapter's recorded ``base_sha256`` is free. A base without one is hashed
during the merge itself (and the output renamed into place only if it matches); an adapter
of format 1 recorded the hash of the base's fp32 tensor values, which is computed from the
base (streamed) before merging. ``shared_weights_sha256`` hashes a base under torchrun with
each rank taking its share of the files, so no rank waits on another for long.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llamaforge import parallel as D
from llamaforge.checkpoint.native import (
    INDEX_FILE,
    CheckpointError,
    combine_sha256s,
    expected_shapes,
    file_sha256s,
    open_checkpoint,
    read_chat_template,
    read_params,
    recorded_weights_sha256,
    tensor_shapes,
    weight_files,
    write_metadata,
)
from llamaforge.files import atomic_dir
from llamaforge.finetune.lora import (
    LoraConfig,
    LoraError,
    _permute_b,
    check_base_params,
    check_base_sha256,
    peft_name,
    read_adapter,
    tensors_sha256,
)
from llamaforge.model import ModelArgs

# (A, B) of each targeted weight, fp32, in Meta's layout
Deltas = dict[str, tuple[torch.Tensor, torch.Tensor]]


def shared_weights_sha256(ckpt_dir: str | os.PathLike, info: D.DistInfo) -> str:
    """``weights_sha256`` of a checkpoint, the same on every rank: the recorded value (no
    collective), or each rank hashes its share of the weight files and the digests are
    gathered (a collective that waits only for the slowest share). Call it on every rank."""
    recorded = recorded_weights_sha256(ckpt_dir)
    if recorded is not None:
        return recorded
    part = file_sha256s(ckpt_dir, rank=info.rank, world_size=info.world_size)
    digests: dict[str, str] = {}
    for d in D.all_gather_object(part):
        digests.update(d)
    return combine_sha256s(digests)


def adapter_deltas(
    adapter_tensors: dict[str, torch.Tensor], cfg: LoraConfig, args: ModelArgs, src: Path
) -> Deltas:
    """Base weight name → (A, B) in fp32 and Meta's layout (B of wq/wk un-permuted), each
    shape checked against the base's layer: an adapter for another base is an error."""
    shapes = expected_shapes(args)
    deltas: Deltas = {}
    for name in sorted(n for n in adapter_tensors if ".lora_A." in n):
        weight = name.replace(".lora_A.weight", ".weight")
        b_name = name.replace(".lora_A.", ".lora_B.")
        if b_name not in adapter_tensors:
            raise LoraError(f"{src}: {peft_name(name)} has no lora_B to go with it")
        if weight not in shapes:
            raise LoraError(
                f"{src}: adapter tensor {peft_name(name)} has no layer in this base "
                f"(n_layers={args.n_layers}): made for another base"
            )
        out_dim, in_dim = shapes[weight]
        a, b = adapter_tensors[name], adapter_tensors[b_name]
        for t_name, t, want in ((name, a, (cfg.rank, in_dim)), (b_name, b, (out_dim, cfg.rank))):
            if tuple(t.shape) != want:
                raise LoraError(
                    f"{src}: {peft_name(t_name)} has shape {tuple(t.shape)}, this base's layer "
                    f"needs {want} (dim={args.dim}, n_heads={args.n_heads}, "
                    f"n_kv_heads={args.kv_heads}): made for another base"
                )
        deltas[weight] = (a.float(), _permute_b(b_name, b, args, to_hf=False).float())
    leftover = set(adapter_tensors) - {n for w in deltas for n in _ab_names(w)}
    if leftover:
        raise LoraError(f"{src}: {peft_name(min(leftover))} has no lora_A to go with it")
    return deltas


def _ab_names(weight: str) -> tuple[str, str]:
    stem = weight.removesuffix(".weight")
    return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"


# the rows merged at once: at most this many bytes in fp32, whatever the tensor's size
_BLOCK_BYTES = 16 << 20


def _header(path: Path) -> tuple[bytes, list[tuple[int, int, str, list[int]]]]:
    """The safetensors file's leading bytes (length and JSON header) and its tensors as
    (begin, end, name, shape), byte offsets after the header, in file order."""
    with open(path, "rb") as f:
        size = f.read(8)
        n = int.from_bytes(size, "little") if len(size) == 8 else -1
        raw = f.read(n) if 0 <= n <= os.path.getsize(path) else b""
    try:
        header = json.loads(raw)
        entries = [
            (*v["data_offsets"], k, list(v["shape"]))
            for k, v in header.items()
            if k != "__metadata__"
        ]
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header: {e})") from None
    return size + raw, sorted(entries)


def _row_blocks(shape: list[int]) -> Iterator[slice]:
    """Slices of the first dimension, each at most ``_BLOCK_BYTES`` in fp32."""
    rows = shape[0] if shape else 1
    step = max(1, _BLOCK_BYTES // (4 * math.prod(shape[1:])) if shape else 1)
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def _read_rows(src: Path, name: str, rows: slice) -> torch.Tensor:
    """Rows of a stored tensor, in its stored dtype. One handle per block: the pages it
    maps leave with it, so what a tensor or a shard has read never adds up in memory."""
    try:
        with safe_open(str(src), framework="pt") as f:
            stored = f.get_slice(name)
            return stored[rows] if stored.get_shape() else f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{src}: cannot read tensor {name} ({e})") from None


@torch.no_grad()
def _merged(
    name: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, where: Path
) -> torch.Tensor:
    """``W + scaling · B A`` in fp32, stored in W's dtype (rows of W and B)."""
    d = b @ a
    d.mul_(scaling)
    d.add_(w)
    out = d.to(w.dtype)
    if not bool(torch.isfinite(out).all()):
        raise CheckpointError(
            f"{where}: merging the adapter into {name} gives values that {w.dtype} cannot hold"
        )
    return out


def merge_file(
    src: Path, dst: Path, deltas: Deltas, scaling: float, *, hash_input: bool
) -> tuple[str, str | None, torch.dtype | None]:
    """Write ``dst``: the safetensors file ``src`` with the targeted weights merged (consumed
    from ``deltas``), a block of rows in memory at a time. Returns the sha256 of ``dst``'s
    bytes, of ``src``'s (when ``hash_input``) and the dtype of its first tensor."""
    head, entries = _header(src)
    out_hash = hashlib.sha256(head)
    in_hash = hashlib.sha256(head) if hash_input else None
    pos, dtype = 0, None
    with open(dst, "wb") as out:
        out.write(head)
        for begin, end, name, shape in entries:
            if begin != pos:
                raise CheckpointError(f"{src}: tensor {name} starts at byte {begin}, not {pos}")
            delta = deltas.pop(name, None)
            for rows in _row_blocks(shape):
                part = _read_rows(src, name, rows)
                dtype = dtype or part.dtype
                if in_hash is not None:
                    in_hash.update(_raw(part))
                if delta is not None:
                    part = _merged(name, part, delta[0], delta[1][rows], scaling, src)
                raw = _raw(part)
                out.write(raw)
                out_hash.update(raw)
                pos += len(raw)
            if pos != end:
                raise CheckpointError(f"{src}: tensor {name} is not {end - begin} bytes")
    if os.path.getsize(src) != len(head) + pos:
        raise CheckpointError(f"{src}: bytes after the last tensor: not a safetensors file")
    return out_hash.hexdigest(), in_hash.hexdigest() if in_hash else None, dtype


def _raw(t: torch.Tensor) -> Any:
    """The bytes of a contiguous tensor, without a copy (a uint8 numpy view)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def merge_adapter(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    chat_template: str | None = None,
    base_sha256: str | None = None,
) -> Path:
    """The native checkpoint ``out_dir``: ``base_dir`` with the PEFT adapter ``adapter_dir``
    folded in, written shard by shard (see the module's notes), atomically. params.json's
    "llamaforge" block gets ``lora_merged`` (base, adapter, base_sha256, rank, alpha,
    targets) and ``extra``; the tokenizer and the chat template (``chat_template``, default
    the base's) are copied. ``base_sha256``: the base's ``weights_sha256`` when the caller
    has it. An adapter made for another base (architecture, shapes, weights hash) is a
    LoraError naming both, and nothing is written."""
    base, out, src = Path(base_dir), Path(out_dir), Path(adapter_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    _, args, tok = open_checkpoint(base)
    stored_dtype = read_params(base)[1].get("dtype")
    cfg, adapter_tensors, ours = read_adapter(src)
    check_base_params(src, ours, args)
    deltas = adapter_deltas(adapter_tensors, cfg, args, src)
    tensor_shapes(base, args)  # the base's tensors are the ones its params.json implies
    base_sha256 = base_sha256 or recorded_weights_sha256(base)
    check_base_sha256(
        src, ours, weights_sha256=base_sha256, tensors_hash=lambda: tensors_sha256(base)
    )
    template = chat_template if chat_template is not None else read_chat_template(base)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        written: dict[str, str] = {}
        read: dict[str, str] = {}
        for fname in weight_files(base):
            written[fname], digest, dtype = merge_file(
                base / fname, tmp / fname, deltas, cfg.scaling, hash_input=base_sha256 is None
            )
            if digest is not None:
                read[fname] = digest
            stored_dtype = stored_dtype or dtype
        if deltas:  # every targeted name is a tensor the base's params.json implies
            raise CheckpointError(f"{base}: no stored tensor {next(iter(deltas))}")
        if base_sha256 is None:  # hashed on the way in: checked before anything is in place
            base_sha256 = combine_sha256s(read)
            check_base_sha256(src, ours, weights_sha256=base_sha256)
        if (base / INDEX_FILE).is_file():
            shutil.copyfile(base / INDEX_FILE, tmp / INDEX_FILE)
        merged_info = {
            "base": str(base),
            "adapter": str(src),
            "base_sha256": base_sha256,
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "targets": list(cfg.target_names()),
        }
        write_metadata(
            tmp,
            args,
            tok,
            dtype=stored_dtype,
            extra={"lora_merged": merged_info, **(extra or {})},
            chat_template=template,
            weights_sha256=combine_sha256s(written),
        )
    return out


def merge_command(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    force: bool = False,
) -> Path:
    """``llamaforge lora merge BASE ADAPTER OUT``: native base + adapter → a plain native
    checkpoint in the base's stored dtype and shards (``merge_adapter``)."""
    return merge_adapter(base_dir, adapter_dir, out_dir, overwrite=force)
