"""``llamaforge convert``: checkpoints between Meta, Hugging Face, GGUF, llama2.c and native."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    print(f"next: {next_step(out, a.target, a.shards)}")
    return 0


def next_step(out: Path, target: str, shards: int = 1) -> str:
    """The command line that runs the converted checkpoint ``out`` of layout ``target``:
    llamaforge for native, transformers for hf, llama.cpp for gguf, and Meta's llama
    repository's example script for meta."""
    import json
    import shlex

    if target == "native":
        from llamaforge.inference.chat import next_command

        return next_command(out)
    if target == "hf":
        code = (
            'from transformers import pipeline; print(pipeline("text-generation", '
            f'{json.dumps(str(out))})("The", max_new_tokens=32)[0]["generated_text"])'
        )
        return shlex.join(["python", "-c", code])
    if target == "gguf":
        return shlex.join(["llama-cli", "-m", str(out), "-p", "The", "-n", "32"]) + "  # llama.cpp"
    return shlex.join(
        ["torchrun", "--nproc_per_node", str(shards), "example_text_completion.py",
         "--ckpt_dir", str(out), "--tokenizer_path", str(out / "tokenizer.model")]
    ) + "  # in a clone of github.com/meta-llama/llama"  # fmt: skip
