"""``llamaforge tokenizer train/encode/decode`` (the tokenizer itself: tokenizer.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llamaforge.cli.main import tokenizer_path


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``tokenizer`` command and its actions."""
    t = subparsers.add_parser("tokenizer", help="train and inspect SentencePiece tokenizers")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="train a BPE tokenizer the paper's way")
    tt.add_argument("inputs", nargs="+", help="UTF-8 text files")
    tt.add_argument("--out", required=True, help="path of the .model file to write")
    tt.add_argument("--force", action="store_true", help="replace an existing --out")
    tt.add_argument("--vocab-size", type=int, default=32000)
    tt.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        help="sample at most this many lines (default 2M)",
    )
    tt.set_defaults(func=_train)
    te = tsub.add_parser("encode", help="text → ids (reads stdin without TEXT)")
    te.add_argument("--model", required=True, help="tokenizer.model, or a folder holding one")
    te.add_argument("text", nargs="?")
    te.add_argument("--bos", action=argparse.BooleanOptionalAction, default=False)
    te.add_argument("--eos", action=argparse.BooleanOptionalAction, default=False)
    te.add_argument("--pieces", action="store_true", help="show id:piece pairs")
    te.set_defaults(func=_encode)
    td = tsub.add_parser("decode", help="ids → text (reads stdin without IDS)")
    td.add_argument("--model", required=True, help="tokenizer.model, or a folder holding one")
    td.add_argument("ids", nargs="*")
    td.set_defaults(func=_decode)


def _train(a: argparse.Namespace) -> int:
    from llamaforge.tokenizer import train_tokenizer

    tok = train_tokenizer(
        [Path(p) for p in a.inputs],
        a.out,
        vocab_size=a.vocab_size,
        max_sentences=a.max_sentences,
        overwrite=a.force,
    )
    print(f"wrote {a.out}: {tok.vocab_size} pieces (BPE, digits split, byte fallback)")
    return 0


def _encode(a: argparse.Namespace) -> int:
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path(a.model))
    text = a.text if a.text is not None else sys.stdin.read()
    ids = tok.encode(text, bos=a.bos, eos=a.eos)
    if a.pieces:
        print(" ".join(f"{i}:{tok.id_to_piece(i)}" for i in ids))
    else:
        print(" ".join(map(str, ids)))
    return 0


def _decode(a: argparse.Namespace) -> int:
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path(a.model))
    raw = a.ids if a.ids else sys.stdin.read().split()
    try:
        ids = [int(x) for x in raw]
    except ValueError as e:
        raise ValueError(f"token ids must be integers ({e})") from None
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise ValueError(f"ids {bad[:5]} are outside the vocabulary (size {tok.vocab_size})")
    print(tok.decode(ids))
    return 0
