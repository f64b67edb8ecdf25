"""Moving checkpoints between layouts: Meta, Hugging Face, GGUF, llama2.c and native.

Every conversion goes through the native format (Meta tensor names): a source is read as a
stream of tensors, and a target other than native is written from a native directory (a
temporary one, removed afterwards, when the source is not native). Targets are written to
a hidden sibling and renamed into place, so a failed conversion leaves no DST behind.

Nothing heavy is imported at module level (``llamaforge convert --help`` must not load
torch): each function imports the checkpoint code it needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from llamaforge.model import ModelArgs
    from llamaforge.tokenizer import Tokenizer

    # What a source layout is read as: the architecture, the tokenizer (None: none found),
    # the Meta-named tensors and the chat template (None: none).
    Source = tuple[ModelArgs, Tokenizer | None, Iterator[tuple[str, torch.Tensor]], str | None]

SOURCES = ("native", "meta", "hf", "llama2c")
TARGETS = ("native", "meta", "hf", "gguf")


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="tensor", leave=False)


def _read_meta(src: Path, tokenizer: Path | None, max_seq_len: int | None) -> Source:
    from llamaforge.checkpoint.convert.meta import read_meta

    args, tok, tensors = read_meta(src, max_seq_len or 2048, tokenizer)
    return args, tok, tensors, None


def _read_hf(src: Path, tokenizer: Path | None, max_seq_len: int | None) -> Source:
    from llamaforge.checkpoint.convert.hf import read_hf, read_hf_chat_template

    args, tok, tensors = read_hf(src, tokenizer)
    chat_template = read_hf_chat_template(src)
    if max_seq_len:
        args.max_seq_len = max_seq_len
    return args, tok, tensors, chat_template


def _read_llama2c(src: Path, tokenizer: Path | None, max_seq_len: int | None) -> Source:
    """model.bin, and the tokenizer beside it (``tokenizer.bin``) or ``tokenizer`` (a
    llama2.c ``.bin`` or a SentencePiece ``.model``)."""
    from llamaforge.checkpoint.convert.llama2c import (
        llama2c_tokenizer_to_sentencepiece,
        read_llama2c,
    )
    from llamaforge.checkpoint.native import CheckpointError
    from llamaforge.tokenizer import Tokenizer

    args, state = read_llama2c(src)
    tok_path = tokenizer or src.with_name("tokenizer.bin")
    tok = None
    if tok_path.is_file():
        if tok_path.suffix == ".model":
            tok = Tokenizer(tok_path)
        else:
            tok = Tokenizer.from_bytes(
                llama2c_tokenizer_to_sentencepiece(tok_path, args.vocab_size), tok_path
            )
    elif tokenizer:
        raise CheckpointError(f"{tok_path}: tokenizer not found")
    if max_seq_len:
        args.max_seq_len = max_seq_len
    return args, tok, iter(state.items()), None


def _read_native(src: Path, tokenizer: Path | None, max_seq_len: int | None) -> Source:
    """A native directory as it is (``max_seq_len`` is not applied to it)."""
    from llamaforge.checkpoint.native import iter_tensors, read_chat_template, read_params
    from llamaforge.tokenizer import Tokenizer

    args, _ = read_params(src)
    chat_template = read_chat_template(src)
    tok_path = tokenizer or src / "tokenizer.model"
    tok = Tokenizer(tok_path) if tok_path.is_file() else None
    return args, tok, iter_tensors(src), chat_template


# Source layout -> its reader: (src, tokenizer, max_seq_len) -> Source.
_READERS: dict[str, Callable[[Path, Path | None, int | None], Source]] = {
    "native": _read_native,
    "meta": _read_meta,
    "hf": _read_hf,
    "llama2c": _read_llama2c,
}


def to_native(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    source: str,
    *,
    dtype: str | None = None,
    force: bool = False,
    tokenizer: str | os.PathLike | None = None,
    max_seq_len: int | None = None,
    progress: bool = True,
) -> Path:
    """Read ``src`` in layout ``source`` and write a native checkpoint at ``dst``."""
    from llamaforge.checkpoint.native import CheckpointError, parse_dtype, save_state

    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if source not in _READERS:
        raise CheckpointError(f"unknown source layout {source!r}; expected one of {SOURCES}")
    tok_path = Path(tokenizer) if tokenizer else None
    args, tok, tensors, chat_template = _READERS[source](src, tok_path, max_seq_len)
    if tok is not None and tok.vocab_size > args.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tok.vocab_size} pieces but the model's vocab_size is {args.vocab_size}"
        )
    if progress:
        tensors = _progress(f"{source} → native")(tensors)
    return save_state(
        tensors,
        args,
        tok,
        dst,
        dtype=parse_dtype(dtype),
        overwrite=force,
        extra={"converted_from": source},
        chat_template=chat_template,
    )


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    source: str,
    target: str,
    dtype: str | None = None,
    shards: int = 1,
    force: bool = False,
    tokenizer: str | os.PathLike | None = None,
    max_seq_len: int | None = None,
    progress: bool = True,
) -> Path:
    """Convert checkpoint ``src`` (layout ``source``) to ``dst`` (layout ``target``).

    ``dtype`` is a torch dtype name for native/meta/hf targets and the GGUF file type
    (f32, f16, q8_0) for gguf. ``shards`` is the model-parallel count of a Meta target.
    """
    from llamaforge.checkpoint.native import CheckpointError, parse_dtype

    if source not in SOURCES:
        raise CheckpointError(f"unknown source layout {source!r}; expected one of {SOURCES}")
    if target not in TARGETS:
        raise CheckpointError(f"unknown target layout {target!r}; expected one of {TARGETS}")
    dst = Path(dst)
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists; pass --force to replace it")
    if target == "native":
        return to_native(
            src,
            dst,
            source,
            dtype=dtype,
            force=force,
            tokenizer=tokenizer,
            max_seq_len=max_seq_len,
            progress=progress,
        )
    tmp = None
    native = Path(src)
    try:
        if source != "native":
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.native-", dir=dst.parent))
            native = to_native(
                src,
                tmp / "native",
                source,
                tokenizer=tokenizer,
                max_seq_len=max_seq_len,
                progress=progress,
            )
        bar = _progress(f"native → {target}") if progress else None
        if target == "meta":
            from llamaforge.checkpoint.convert.meta import write_meta

            return write_meta(
                native, dst, shards=shards, dtype=parse_dtype(dtype), force=force, progress=bar
            )
        if target == "hf":
            from llamaforge.checkpoint.convert.hf import write_hf

            return write_hf(native, dst, dtype=parse_dtype(dtype), force=force, progress=bar)
        from llamaforge.checkpoint.convert.gguf import export_gguf

        return export_gguf(native, dst, outtype=_gguf_type(dtype), force=force, progress=progress)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _gguf_type(dtype: str | None) -> str:
    from llamaforge.checkpoint.native import CheckpointError

    aliases = {
        None: "f16",
        "float32": "f32",
        "fp32": "f32",
        "float16": "f16",
        "fp16": "f16",
        "half": "f16",
        "f32": "f32",
        "f16": "f16",
        "q8_0": "q8_0",
    }
    key = dtype.lower() if dtype else None
    if key not in aliases:
        raise CheckpointError(f"unknown GGUF type {dtype!r}; expected f32, f16 or q8_0")
    return aliases[key]
