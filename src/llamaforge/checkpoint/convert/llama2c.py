"""Andrej Karpathy's llama2.c: ``model.bin`` checkpoints and ``tokenizer.bin`` vocabularies.

Three ``.bin`` layouts exist, all little-endian:

* legacy (v0): 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
  seq_len`` (a negative vocab_size means the classifier is not shared with the embedding),
  then fp32 arrays: token embedding, attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3,
  final norm, the RoPE tables ``freq_cis_real``/``freq_cis_imag`` (skipped), and the
  classifier when unshared. Every weight matrix is PyTorch's ``[out, in]``, layers stacked.
* version 1: a 256-byte header (magic ``"ak42"`` = 0x616b3432, int32 version, the same 7
  int32, a uint8 shared-classifier flag), then fp32: attention norms, ffn norms, final
  norm, embedding, wq, wk, wv, wo, w1, w2, w3 and the unshared classifier.
* version 2: the same header plus an int32 group size; the norms in fp32, then the other
  weights of version 1 as int8 (Q8_0), then all their per-group fp32 scales.

llama2.c's RoPE rotates the interleaved pairs (2j, 2j+1) like Meta's, so no permutation is
needed; RMSNorm uses eps 1e-5 and RoPE theta 10000.

``tokenizer.bin`` is an int32 ``max_token_length`` and then, for each piece, a float32
score, an int32 byte length and that many UTF-8 bytes; the pieces were exported from a
SentencePiece BPE model with ``▁`` written as a space and ``<s>``/``</s>`` as
``"\\n<s>\\n"``/``"\\n</s>\\n"``. ``llama2c_tokenizer_to_sentencepiece`` rebuilds the model
proto from them.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from llamaforge.checkpoint.native import CheckpointError, save
from llamaforge.model import ModelArgs, Transformer
from llamaforge.tokenizer import Tokenizer

__all__ = [
    "LLAMA2C_MAGIC",
    "Llama2cError",
    "import_llama2c",
    "llama2c_tokenizer_to_sentencepiece",
    "read_llama2c",
    "read_llama2c_tokenizer",
]

LLAMA2C_MAGIC = 0x616B3432  # "ak42"
_HEADER_V1 = 256
_LEGACY_HEADER = 7 * 4
_MAX_TOKEN_LENGTH = 1 << 16
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class Llama2cError(CheckpointError):
    """A llama2.c file that cannot be read; the message names the file."""


# -- model.bin -------------------------------------------------------------------------------


def _hidden_args(hidden_dim: int, dim: int, where: str) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` with which ``ModelArgs.ffn_hidden_dim`` is
    exactly ``hidden_dim``: the largest divisor of it that works, else a multiplier."""
    probe = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1)
    divisors = [d for d in range(hidden_dim, 0, -1) if hidden_dim % d == 0]
    for m in divisors:
        probe.multiple_of = m
        if probe.ffn_hidden_dim == hidden_dim:
            return m, None
    # hidden_dim below 8·dim/3: only a multiplier < 1 can express it.
    base = int(2 * (4 * dim) / 3)
    mult = hidden_dim / base
    for _ in range(4):
        probe.multiple_of, probe.ffn_dim_multiplier = 1, mult
        if probe.ffn_hidden_dim == hidden_dim:
            return 1, mult
        mult = math.nextafter(mult, math.inf)
    raise Llama2cError(
        f"{where}: hidden_dim={hidden_dim} cannot be expressed with dim={dim} as LLaMA's "
        "SwiGLU size (multiple_of, ffn_dim_multiplier)"
    )


class _Header(NamedTuple):
    """The seven int32 every ``model.bin`` header holds, in file order."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._asdict().items())


@dataclass
class _Layout:
    """How a ``model.bin`` is laid out: its header, export version (0: legacy), whether the
    classifier is the embedding table, version 2's Q8_0 group size and where weights start."""

    header: _Header
    version: int
    shared: bool
    group_size: int
    offset: int


def _check_header(where: str, h: _Header) -> None:
    """Refuse a header whose values no model has (not a model.bin, or another format)."""
    bad = [f"{k}={v}" for k, v in h._asdict().items() if not 0 < v < 1 << 24]
    if bad or h.dim % h.n_heads or (h.dim // h.n_heads) % 2 or h.n_heads % h.n_kv_heads:
        why = ", ".join(bad) or f"dim={h.dim}, n_heads={h.n_heads}, n_kv_heads={h.n_kv_heads}"
        raise Llama2cError(
            f"{where}: not a llama2.c model.bin (implausible header: {why}); expected 7 int32 "
            "dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, or the "
            "'ak42' magic of a version 1/2 export"
        )


def _size_error(where: str, fmt: str, got: int, want: int, what: str) -> Llama2cError:
    state = "truncated" if got < want else f"has {got - want} trailing bytes"
    return Llama2cError(
        f"{where}: {state}: {got} bytes, but a llama2.c {fmt} file with {what} has {want} bytes "
        "(wrong file, interrupted download, or a different format?)"
    )


def _read_layout(p: Path, where: str) -> _Layout:
    """The header of ``model.bin`` at ``p``: legacy (7 int32, a negative vocab_size for an
    unshared classifier) or versions 1/2 behind the 'ak42' magic; checked as plausible."""
    if not p.is_file():
        raise Llama2cError(f"{where}: no such llama2.c model file")
    size = p.stat().st_size
    if size < _LEGACY_HEADER:
        raise Llama2cError(f"{where}: truncated: {size} bytes is shorter than any header")
    with open(p, "rb") as f:
        head = f.read(_HEADER_V1)
    if struct.unpack_from("<I", head)[0] != LLAMA2C_MAGIC:
        h = _Header(*struct.unpack_from("<7i", head))
        layout = _Layout(
            h._replace(vocab_size=abs(h.vocab_size)), 0, h.vocab_size > 0, 0, _LEGACY_HEADER
        )
    else:
        if len(head) < _HEADER_V1:
            raise Llama2cError(f"{where}: truncated: the 'ak42' header needs 256 bytes")
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2):
            raise Llama2cError(
                f"{where}: llama2.c export version {version} is not supported (only the "
                "legacy layout and versions 1 and 2)"
            )
        group_size = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        h = _Header(*struct.unpack_from("<7i", head, 8))
        layout = _Layout(h, version, bool(head[36]), group_size, _HEADER_V1)
    _check_header(where, layout.header)
    return layout


# (key, numpy dtype, shape) of each array of a model.bin, in file order
_Plan = list[tuple[str, np.dtype, tuple[int, ...]]]


def _plan(layout: _Layout, where: str) -> tuple[str, _Plan, list[tuple[str, tuple[int, ...]]]]:
    """The format's name, the arrays of the file after its header, and the weight matrices
    that version 2 stores as Q8_0 (key, shape) — their scales follow as ``key.scales``."""
    h, version, L = layout.header, layout.version, layout.header.n_layers
    dim, hidden, vocab = h.dim, h.hidden_dim, h.vocab_size
    head_size = dim // h.n_heads
    q_dim, kv_dim = h.n_heads * head_size, h.n_kv_heads * head_size
    matrices = {
        "wq": (L, q_dim, dim),
        "wk": (L, kv_dim, dim),
        "wv": (L, kv_dim, dim),
        "wo": (L, dim, q_dim),
        "w1": (L, hidden, dim),
        "w2": (L, dim, hidden),
        "w3": (L, hidden, dim),
    }
    f32, i8 = np.dtype("<f4"), np.dtype("i1")
    norms = [("attention_norm", f32, (L, dim)), ("ffn_norm", f32, (L, dim)), ("norm", f32, (dim,))]
    classifier = [] if layout.shared else [("output", (vocab, dim))]
    if version == 0:
        plan: _Plan = [
            ("tok_embeddings", f32, (vocab, dim)),
            ("attention_norm", f32, (L, dim)),
            *[(k, f32, matrices[k]) for k in ("wq", "wk", "wv", "wo")],
            ("ffn_norm", f32, (L, dim)),
            *[(k, f32, matrices[k]) for k in ("w1", "w2", "w3")],
            ("norm", f32, (dim,)),
            ("freq_cis_real", f32, (h.seq_len * head_size // 2,)),
            ("freq_cis_imag", f32, (h.seq_len * head_size // 2,)),
            *[(k, f32, s) for k, s in classifier],
        ]
        return "legacy (v0)", plan, []
    quantized = [("tok_embeddings", (vocab, dim)), *matrices.items(), *classifier]
    if version == 1:
        return "version 1", norms + [(k, f32, s) for k, s in quantized], []
    group = layout.group_size
    fmt = f"version 2 (Q8_0, group size {group})"
    if group <= 0 or any(s[-2] * s[-1] % group for _, s in quantized):
        raise Llama2cError(f"{where}: {fmt}: the group size does not divide every weight matrix")
    plan = norms + [(k, i8, s) for k, s in quantized]
    plan += [(f"{k}.scales", f32, (*s[:-2], s[-2] * s[-1] // group)) for k, s in quantized]
    return fmt, plan, quantized


def _model_args(h: _Header, where: str) -> ModelArgs:
    """The ModelArgs of a llama2.c model: its header, RMSNorm eps 1e-5 and RoPE theta 10000."""
    multiple_of, ffn_mult = _hidden_args(h.hidden_dim, h.dim, where)
    return ModelArgs(
        dim=h.dim,
        n_layers=h.n_layers,
        n_heads=h.n_heads,
        n_kv_heads=h.n_kv_heads,
        vocab_size=h.vocab_size,
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_mult,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=h.seq_len,
    ).validate()


def _meta_state(
    arrays: dict[str, np.ndarray], n_layers: int, shared: bool
) -> dict[str, torch.Tensor]:
    """llama2.c's arrays (layers stacked) under Meta's per-layer tensor names."""

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)

    state: dict[str, torch.Tensor] = {"tok_embeddings.weight": t(arrays["tok_embeddings"])}
    for i in range(n_layers):
        pre = f"layers.{i}."
        for k in ("wq", "wk", "wv", "wo"):
            state[f"{pre}attention.{k}.weight"] = t(arrays[k][i])
        for k in ("w1", "w2", "w3"):
            state[f"{pre}feed_forward.{k}.weight"] = t(arrays[k][i])
        state[f"{pre}attention_norm.weight"] = t(arrays["attention_norm"][i])
        state[f"{pre}ffn_norm.weight"] = t(arrays["ffn_norm"][i])
    state["norm.weight"] = t(arrays["norm"])
    if shared:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    else:
        state["output.weight"] = t(arrays["output"])
    return state


def read_llama2c(path: str | os.PathLike) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read a llama2.c ``model.bin`` (legacy, version 1 or version 2 / Q8_0).

    Returns the architecture and the weights under Meta's names, fp32 (v2 dequantized);
    ``output.weight`` is a copy of the embedding table when the classifier is shared. The
    fp32 weights are copy-on-write memory maps of the file, not reads into memory.
    """
    p = Path(path)
    where = str(p)
    layout = _read_layout(p, where)
    fmt, plan, quantized = _plan(layout, where)
    offset = layout.offset
    want = offset + sum(dt.itemsize * math.prod(shape) for _, dt, shape in plan)
    size = p.stat().st_size
    if size != want:
        shared = "shared" if layout.shared else "unshared"
        what = f"{layout.header.describe()}, {shared} classifier"
        raise _size_error(where, f"{fmt} model", size, want, what)

    arrays: dict[str, np.ndarray] = {}
    for key, dt, shape in plan:
        arrays[key] = np.memmap(p, dtype=dt, mode="c", offset=offset, shape=shape)
        offset += dt.itemsize * math.prod(shape)
    for key, shape in quantized:  # version 2: dequantize
        q = arrays.pop(key).astype(np.float32).reshape(*shape[:-2], -1, layout.group_size)
        s = arrays.pop(f"{key}.scales")
        arrays[key] = (q * s[..., None]).reshape(shape)
    args = _model_args(layout.header, where)
    return args, _meta_state(arrays, layout.header.n_layers, layout.shared)


# -- tokenizer.bin ---------------------------------------------------------------------------


def read_llama2c_tokenizer(
    path: str | os.PathLike, vocab_size: int | None = None
) -> tuple[int, list[tuple[str, float]]]:
    """``(max_token_length, [(piece, score), …])`` of a llama2.c ``tokenizer.bin``, pieces
    decoded from UTF-8 exactly as stored. With ``vocab_size`` the file must hold exactly
    that many pieces; without, it is read to its end."""
    p = Path(path)
    where = str(p)
    if not p.is_file():
        raise Llama2cError(f"{where}: no such llama2.c tokenizer file")
    data = p.read_bytes()

    def bad(msg: str) -> Llama2cError:
        return Llama2cError(
            f"{where}: not a llama2.c tokenizer.bin ({msg}); expected int32 max_token_length, "
            "then per piece float32 score, int32 length and the UTF-8 bytes"
        )

    if len(data) < 4:
        raise bad(f"only {len(data)} bytes")
    max_len = struct.unpack_from("<i", data)[0]
    if not 0 < max_len <= _MAX_TOKEN_LENGTH:
        raise bad(f"implausible max_token_length {max_len}")
    pieces: list[tuple[str, float]] = []
    off = 4
    while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        i = len(pieces)
        if off + 8 > len(data):
            raise Llama2cError(f"{where}: truncated inside the header of piece {i}")
        score, length = struct.unpack_from("<fi", data, off)
        off += 8
        if not 0 < length <= max_len:
            raise bad(f"piece {i} has length {length}, max_token_length is {max_len}")
        if not math.isfinite(score):
            raise bad(f"piece {i} has score {score}")
        if off + length > len(data):
            raise Llama2cError(f"{where}: truncated inside piece {i}")
        try:
            piece = data[off : off + length].decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"piece {i} is not valid UTF-8: {data[off : off + length]!r}") from None
        off += length
        pieces.append((piece, score))
    if vocab_size is not None and len(pieces) < vocab_size:
        raise Llama2cError(
            f"{where}: truncated or wrong vocabulary: {len(pieces)} pieces, the model's "
            f"vocab_size is {vocab_size}"
        )
    if off != len(data):
        raise Llama2cError(
            f"{where}: {len(data) - off} trailing bytes after {len(pieces)} pieces: the "
            f"vocabulary is larger than vocab_size={vocab_size} (tokenizer of another model?)"
        )
    if not pieces:
        raise bad("no pieces")
    return max_len, pieces


def llama2c_tokenizer_to_sentencepiece(
    path: str | os.PathLike, vocab_size: int | None = None
) -> bytes:
    """A serialized SentencePiece BPE model proto rebuilt from a llama2.c ``tokenizer.bin``.

    Pieces keep their ids and scores; spaces become ``▁`` again. ``<unk>`` is UNKNOWN,
    ``<s>``/``</s>`` CONTROL, ``<0xNN>`` BYTE and the rest NORMAL. Normalisation is that of
    the SentencePiece models llama2.c exports (Meta's and its own TinyStories ones):
    identity, a dummy prefix space, whitespace kept as is, byte fallback.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    where = str(path)
    _, pieces = read_llama2c_tokenizer(path, vocab_size)
    Piece = pb.ModelProto.SentencePiece
    proto = pb.ModelProto()
    ids: dict[str, int] = {}
    n_bytes = 0
    for i, (raw, score) in enumerate(pieces):
        text = raw
        if raw in ("\n<s>\n", "<s>"):
            text, kind = "<s>", Piece.CONTROL
        elif raw in ("\n</s>\n", "</s>"):
            text, kind = "</s>", Piece.CONTROL
        elif raw == "<unk>":
            kind = Piece.UNKNOWN
        elif _BYTE_PIECE.fullmatch(raw):
            kind = Piece.BYTE
            n_bytes += 1
        else:
            text, kind = raw.replace(" ", "\u2581"), Piece.NORMAL
        if text in ids:
            raise Llama2cError(f"{where}: piece {text!r} appears twice (ids {ids[text]} and {i})")
        ids[text] = i
        proto.pieces.add(piece=text, score=score, type=kind)
    if "<unk>" not in ids:
        raise Llama2cError(f"{where}: no <unk> piece; SentencePiece needs one")
    if 0 < n_bytes < 256:
        raise Llama2cError(f"{where}: only {n_bytes} of the 256 <0xNN> byte pieces")
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(pieces)
    ts.byte_fallback = n_bytes == 256
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = (
        ids["<unk>"],
        ids.get("<s>", -1),
        ids.get("</s>", -1),
        -1,
    )
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


# -- import -----------------------------------------------------------------------------------


def import_llama2c(
    bin_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
) -> Path:
    """Convert a llama2.c ``model.bin`` + ``tokenizer.bin`` into a native checkpoint at
    ``out_dir`` (fp32, norm_eps 1e-5, max_seq_len = the file's seq_len), atomically.
    An existing ``out_dir`` is replaced only with ``force``."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; pass force=True (--force) to replace it")
    args, state = read_llama2c(bin_path)
    proto = llama2c_tokenizer_to_sentencepiece(tokenizer_path, vocab_size=args.vocab_size)
    tok = Tokenizer.from_bytes(proto, path=tokenizer_path)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(state, assign=True, strict=True)
    return save(
        model.eval(),
        tok,
        out,
        overwrite=force,
        extra={"converted_from": "llama2c", "source": Path(bin_path).name},
    )
