"""Meta's original checkpoints: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards.

Each shard holds one fairscale rank's slice (SPEC §2.9): column-parallel weights (wq, wk,
wv, w1, w3, output) are split on dim 0, row-parallel ones (wo, w2) and the embedding table
on dim 1, and the 1-D norms are replicated. Merging reads every shard memory-mapped
(``torch.load(mmap=True, weights_only=True)``) and yields one merged tensor at a time, so a
65B model is never held twice; ``rope.freqs`` is ignored.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from llamaforge.checkpoint.native import (
    CheckpointError,
    checked,
    iter_tensors,
    load_pickled_tensors,
    read_params,
)
from llamaforge.files import atomic_dir
from llamaforge.model import ModelArgs
from llamaforge.tokenizer import Tokenizer

# concatenation dim of each parameter kind across model-parallel ranks (None = replicated)
_DIM0 = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "output.weight",
)
_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
_IGNORED = ("rope.freqs",)


def shard_dim(name: str) -> int | None:
    if name.endswith(_DIM0):
        return 0
    if name.endswith(_DIM1):
        return 1
    if name.endswith("norm.weight"):
        return None
    raise CheckpointError(f"unknown tensor {name!r} in a Meta checkpoint")


def meta_shard_files(src: Path) -> list[Path]:
    files = sorted(src.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{src}: no consolidated.*.pth files: not a Meta checkpoint")
    return files


def find_meta_tokenizer(src: Path) -> Path | None:
    """Meta's download puts tokenizer.model next to the size folders (7B/, 13B/, …)."""
    for candidate in (src / "tokenizer.model", src.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def read_meta(
    src: str | os.PathLike, max_seq_len: int = 2048, tokenizer: str | os.PathLike | None = None
) -> tuple[ModelArgs, Tokenizer | None, Iterator[tuple[str, torch.Tensor]]]:
    """ModelArgs, tokenizer and a stream of merged tensors of Meta checkpoint ``src``."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory")
    args, _ = read_params(src)
    args.max_seq_len = max_seq_len
    tok_path = Path(tokenizer) if tokenizer else find_meta_tokenizer(src)
    tok = Tokenizer(tok_path) if tok_path else None
    files = meta_shard_files(src)
    shards = [load_pickled_tensors(f) for f in files]
    names = [n for n in shards[0] if n not in _IGNORED]
    for f, shard in zip(files[1:], shards[1:]):
        if [n for n in shard if n not in _IGNORED] != names:
            raise CheckpointError(f"{f}: its tensor names differ from {files[0].name}")
    if args.vocab_size <= 0:
        if "tok_embeddings.weight" not in shards[0]:
            raise CheckpointError(f"{files[0]}: no tok_embeddings.weight")
        args.vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    args.validate()

    def merged() -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            dim = shard_dim(name)
            parts = [s[name] for s in shards]
            yield name, parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim)

    return args, tok, merged()


def check_shardable(args: ModelArgs, n: int) -> None:
    """Raise unless every split dimension divides by ``n`` model-parallel ranks."""
    checks = {
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "dim": args.dim,
        "ffn hidden size": args.ffn_hidden_dim,
        "vocab_size": args.vocab_size,
    }
    if n < 1:
        raise CheckpointError(f"shard count must be at least 1, got {n}")
    for what, value in checks.items():
        if value % n:
            raise CheckpointError(
                f"cannot split into {n} model-parallel shards: {what}={value} is not divisible "
                f"by {n}"
            )


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it (vocab_size -1: the tokenizer's)."""
    params = {
        "dim": args.dim,
        "multiple_of": args.multiple_of,
        "n_heads": args.n_heads,
        "n_layers": args.n_layers,
        "norm_eps": args.norm_eps,
        "vocab_size": -1,
    }
    if args.n_kv_heads is not None and args.n_kv_heads != args.n_heads:
        params["n_kv_heads"] = args.n_kv_heads
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    return params


def write_meta(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    shards: int = 1,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress=None,
) -> Path:
    """Native checkpoint ``src`` → Meta layout with ``shards`` consolidated.NN.pth files."""
    src, dst = Path(src), Path(dst)
    args, _ = read_params(src)
    tok_path = src / "tokenizer.model"
    if args.vocab_size <= 0:
        args.vocab_size = Tokenizer(tok_path).vocab_size
    check_shardable(args, shards)
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists; pass --force to replace it")
    with atomic_dir(dst, overwrite=force) as tmp:
        ranks = range(shards)
        for rank in progress(ranks) if progress else ranks:  # one rank's slice in memory
            part = {}
            for name, t in checked(iter_tensors(src), args, str(src)):
                dim = shard_dim(name)
                piece = t if dim is None else t.chunk(shards, dim)[rank]
                # clone: a view would serialise the whole underlying storage
                part[name] = piece.to(dtype or piece.dtype).clone()
            torch.save(part, tmp / f"consolidated.{rank:02d}.pth")
            del part
        (tmp / "params.json").write_text(json.dumps(meta_params(args)) + "\n")
        if tok_path.is_file():
            shutil.copyfile(tok_path, tmp / "tokenizer.model")
    return dst
