"""``llamaforge convert``: checkpoints between Meta, Hugging Face, GGUF, llama2.c and native."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``convert`` command."""
    c = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Meta, Hugging Face, GGUF, llama2.c and native",
        description="Convert SRC (layout --from) to DST (layout --to). Every path goes "
        "through the native format; DST is written atomically and an existing DST is "
        "refused unless --force.",
    )
    c.add_argument(
        "--from", dest="source", required=True, choices=("native", "meta", "hf", "llama2c")
    )
    c.add_argument("--to", dest="target", required=True, choices=("native", "hf", "meta", "gguf"))
    c.add_argument("src", help="source directory (llama2c: the .bin file)")
    c.add_argument("dst", help="destination directory (gguf: the .gguf file)")
    c.add_argument("--dtype", help="float32/bfloat16/float16; for gguf: f32, f16 (default), q8_0")
    c.add_argument("--shards", type=int, default=1, help="model-parallel files for --to meta")
    c.add_argument("--tokenizer", help="tokenizer file if not in SRC (llama2c: tokenizer.bin)")
    c.add_argument(
        "--max-seq-len",
        type=int,
        help="context length to record (Meta checkpoints do not store it: 2048)",
    )
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from llamaforge.checkpoint.convert import convert

    out = convert(
        a.src,
        a.dst,
        source=a.source,
        target=a.target,
        dtype=a.dtype,
        shards=a.shards,
        force=a.force,
        tokenizer=a.tokenizer,
        max_seq_len=a.max_seq_len,
        progress=not a.quiet,
    )
    print(f"wrote {out} ({a.target})")
    return 0
