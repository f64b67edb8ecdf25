"""What the commands that run a checkpoint share (``generate``, ``chat``, ``serve``, and
``eval --tp``): the arguments that name the checkpoint and say how to load it, and loading
it from them: on one device or split over the torchrun processes (``--tp``), with a draft
model for speculative decoding and int8 weights."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from llamaforge.cli.main import tokenizer_path


def add_load_args(p: argparse.ArgumentParser) -> None:
    """``--ckpt``, ``--tokenizer``, ``--device``, ``--dtype``, ``--strict`` and ``--force``."""
    p.add_argument("--ckpt", required=True, help="native checkpoint directory")
    p.add_argument(
        "--tokenizer", help="tokenizer.model (or its folder) to use instead of the checkpoint's"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: as stored)")
    add_trust_args(p)


def add_trust_args(p: argparse.ArgumentParser) -> None:
    """``--strict`` and ``--force``: how much of a damaged or mismatched checkpoint to take."""
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a checkpoint with NaN/Inf weights (default: load it with a warning)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="use a tokenizer whose sha256 differs from the one params.json records, with a "
        "warning (default: refused)",
    )


def add_speed_args(p: Any, per_request: bool = False) -> None:
    """``--quantize``, ``--draft`` and ``--draft-k`` (what `quantize` and `load_draft` read)
    on a parser or argument group; ``per_request``: the draft drafts for every running
    request (the server)."""
    p.add_argument(
        "--quantize",
        choices=["int8", "int8-bf16"],
        help="int8 weight-only linear layers, one scale per output channel (CPU or GPU); "
        "int8-bf16: on the CPU, fp32 activations enter the int8 kernel as bf16 (2-3x "
        "faster there, logits within a few %%)",
    )
    p.add_argument(
        "--draft",
        metavar="DIR",
        help="speculative decoding with this smaller checkpoint (same tokenizer) proposing "
        f"tokens{' for every running request' if per_request else ''}; greedy output is "
        "unchanged; the acceptance rate is printed on stderr",
    )
    p.add_argument(
        "--draft-k",
        type=int,
        default=4,
        metavar="N",
        help=f"tokens the draft proposes per {'request and ' if per_request else ''}step "
        "(default 4)",
    )


class Loaded(NamedTuple):
    """A checkpoint loaded for inference, and where: its device, this process's rank."""

    model: Any
    tok: Any
    device: Any
    rank: int


def load_checkpoint(a: argparse.Namespace, tp: int = 1) -> Loaded:
    """The model and tokenizer that `add_load_args`' arguments name, split over ``tp``
    torchrun processes when ``tp`` > 1; a checkpoint without a tokenizer (and no
    ``--tokenizer``) is an error. On one process, ``--quantize`` (where the command has it)
    converts each linear layer to int8 as its weight is read, and ``--dtype`` casts each
    tensor as it is read: the full-precision model is never held (`native.load`)."""
    from llamaforge.checkpoint.native import load
    from llamaforge.device import resolve_device

    device = resolve_device(a.device or "auto")
    tok_file = tokenizer_path(a.tokenizer)
    rank = 0
    if tp != 1:
        model, tok, rank = load_tensor_parallel(
            a.ckpt, tp, a.device, a.dtype, tok_file, a.strict, a.force
        )
    else:
        model, tok = load(
            a.ckpt,
            device=device,
            dtype=a.dtype,
            tokenizer=tok_file,
            strict=a.strict,
            force=a.force,
            quantize=getattr(a, "quantize", None),
        )
    if tok is None:
        raise ValueError(f"{a.ckpt}: no tokenizer.model in the checkpoint; pass --tokenizer")
    return Loaded(model, tok, device, rank)


def load_tensor_parallel(
    ckpt: str,
    tp: int,
    device: str | None,
    dtype: str | None,
    tokenizer: Any,
    strict: bool,
    force: bool = False,
) -> tuple[Any, Any, int]:
    """``--tp N``: join the torchrun group (left at exit) and load ``ckpt`` split over it;
    returns the model, the tokenizer and this process's rank."""
    import atexit

    from llamaforge import parallel as D

    info = D.init(device or "auto")
    atexit.register(D.cleanup)
    model, tok = D.load_tensor_parallel(
        ckpt, info, tp, dtype=dtype, tokenizer=tokenizer, strict=strict, force=force
    )
    return model, tok, info.rank


def check_draft_k(a: argparse.Namespace) -> None:
    if a.draft_k < 1:
        raise ValueError(f"--draft-k {a.draft_k}: must be at least 1")


def load_draft(
    a: argparse.Namespace, loaded: Loaded, check: Callable[[Any, Any], None] | None = None
) -> Any:
    """``--draft DIR`` (None without it) on the model's device, in its dtype, int8 with
    ``--quantize`` (converted as read); ``check(model, draft)``'s ValueError becomes one
    naming --draft. A warning on stderr when its
    tokenizer.model differs from the model's (the output stays the model's, but few
    drafted tokens are accepted)."""
    if not a.draft:
        return None
    from llamaforge.checkpoint.native import load

    dtype = loaded.model.tok_embeddings.weight.dtype
    draft, _ = load(
        a.draft, device=loaded.device, dtype=dtype, quantize=getattr(a, "quantize", None)
    )
    if check is not None:
        try:
            check(loaded.model, draft)
        except ValueError as e:
            raise ValueError(f"--draft {a.draft}: {e}") from None
    mine = Path(tokenizer_path(a.tokenizer) or Path(a.ckpt) / "tokenizer.model")
    theirs = Path(a.draft) / "tokenizer.model"
    if theirs.is_file() and mine.is_file() and theirs.read_bytes() != mine.read_bytes():
        print(
            f"warning: --draft {a.draft}: its tokenizer.model differs from the model's; "
            "the output is still the model's, but few drafted tokens will be accepted",
            file=sys.stderr,
        )
    return draft


def quantize(kind: str | None, *models: Any) -> None:
    """``--quantize int8|int8-bf16``: int8 weights for every model given that is not int8
    yet (None skipped). `load_checkpoint` and `load_draft` convert as they read, so this
    converts only models loaded otherwise (``--tp``), after loading them whole."""
    if not kind:
        return
    from llamaforge.inference.quantize import is_quantized, quantize_int8

    for m in models:
        if m is not None and not is_quantized(m):
            quantize_int8(m, cpu_bf16_compute=kind == "int8-bf16")


def print_acceptance(accepted: int, proposed: int, draft_k: int) -> None:
    """The speculative decoding summary line, on stderr."""
    rate = accepted / proposed if proposed else 0.0
    print(
        f"speculative decoding: {accepted}/{proposed} drafted tokens accepted "
        f"({rate:.1%}), draft_k={draft_k}",
        file=sys.stderr,
    )
