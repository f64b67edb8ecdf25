"""Export a native checkpoint to GGUF, the single-file format of llama.cpp (SPEC §4).

    export_gguf("ckpt/", "model.gguf", outtype="q8_0")

The file carries llama.cpp's ``llama`` architecture: the hyper-parameters under ``llama.*``,
the SentencePiece vocabulary under ``tokenizer.ggml.*`` (and the checkpoint's chat template,
if any, under ``tokenizer.chat_template``) and the weights under GGUF's tensor
names (``token_embd.weight``, ``blk.N.attn_q.weight``, …). Q and K keep Meta's interleaved
RoPE layout, which is the one llama.cpp's LLAMA architecture expects: no permute is applied.

Output types (``GGUF_TYPES``):

- ``f32``: every tensor as float32, bit-exact with the checkpoint's float32 values.
- ``f16``: 2-D weights as float16; the 1-D norm gains stay float32, as llama.cpp does.
- ``q8_0``: 2-D weights quantised to Q8_0 (blocks of 32 values sharing one fp16 scale) by the
  ``gguf`` package's own quantiser; a weight whose row length is not a multiple of 32 cannot
  be split into Q8_0 blocks and is stored as float16 instead; norm gains stay float32.

Requires the ``gguf`` package (the 'convert' extra: ``pip install 'llamaforge[convert]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llamaforge.files import atomic_path

if TYPE_CHECKING:
    from llamaforge.model import ModelArgs
    from llamaforge.tokenizer import Tokenizer

__all__ = ["GGUF_TYPES", "ConvertError", "export_gguf", "gguf_tensor_name", "read_gguf_summary"]

GGUF_TYPES = ("f32", "f16", "q8_0")

# Meta's per-layer names -> GGUF's (SPEC §4.2).
_LAYER_NAMES = {
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
_GLOBAL_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}

# Padding tokens appended when the model's vocab_size exceeds the tokenizer's pieces.
_PAD_SCORE = -1000.0


class ConvertError(ValueError):
    """A conversion that cannot be done; the message names the path or the option."""


def _gguf():
    import gguf  # the 'convert' extra; `llamaforge convert` names it when it is missing

    return gguf


def gguf_tensor_name(meta_name: str) -> str:
    """GGUF's name for a Meta state-dict name, e.g. ``layers.3.attention.wq.weight`` ->
    ``blk.3.attn_q.weight``."""
    base, dot, suffix = meta_name.rpartition(".")
    if not dot or suffix != "weight":
        raise ConvertError(f"no GGUF name for tensor {meta_name!r}")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.weight"
    parts = base.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"blk.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ConvertError(f"no GGUF name for tensor {meta_name!r}")


def _plan(t: torch.Tensor, outtype: str, gguf: Any) -> tuple[Any, tuple[int, ...], int]:
    """(GGML type, numpy shape of the written array, its bytes) for one tensor."""
    Q = gguf.GGMLQuantizationType
    shape = tuple(t.shape)
    n = t.numel()
    if t.dim() < 2 or outtype == "f32":
        return Q.F32, shape, 4 * n
    if outtype == "q8_0":
        block, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_0]
        if shape[-1] % block == 0:
            return Q.Q8_0, (*shape[:-1], shape[-1] // block * type_size), n // block * type_size
    return Q.F16, shape, 2 * n


def _convert(t: torch.Tensor, qtype: Any, gguf: Any) -> np.ndarray:
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def _vocab(tok: Tokenizer, vocab_size: int, gguf: Any) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and GGUF token types of ``tok``, padded to ``vocab_size``."""
    TT = gguf.TokenType
    user_defined: set[int] = set()
    try:  # the proto knows USER_DEFINED pieces, which SentencePieceProcessor cannot report
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tok.serialized())
        kind = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        user_defined = {i for i, p in enumerate(proto.pieces) if p.type == kind}
    except Exception:  # protobuf missing or an unexpected proto: no user-defined pieces
        pass
    tokens, scores, types = [], [], []
    for i in range(tok.vocab_size):
        tokens.append(tok.id_to_piece(i))
        scores.append(tok.piece_score(i))
        if tok.is_unknown(i):
            types.append(TT.UNKNOWN)
        elif tok.is_control(i):
            types.append(TT.CONTROL)
        elif tok.is_byte(i):
            types.append(TT.BYTE)
        elif tok.is_unused(i):
            types.append(TT.UNUSED)
        elif i in user_defined:
            types.append(TT.USER_DEFINED)
        else:
            types.append(TT.NORMAL)
    for k in range(1, vocab_size - tok.vocab_size + 1):
        tokens.append(f"[PAD{k}]")
        scores.append(_PAD_SCORE)
        types.append(TT.UNUSED)
    return tokens, scores, [int(t) for t in types]


def _add_dummy_prefix(tok: Tokenizer) -> bool | None:
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tok.serialized())
        return bool(proto.normalizer_spec.add_dummy_prefix)
    except Exception:
        return None


def _check_target(dst: Path, force: bool) -> None:
    if dst.is_dir():
        raise ConvertError(f"{dst}: is a directory; give the path of the .gguf file to write")
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists; pass force=True (--force) to replace it")


def _write_hparams(writer: Any, args: ModelArgs, name: str, outtype: str, gguf: Any) -> None:
    """The file's name and type and the ``llama.*`` hyper-parameters."""
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(args.vocab_size)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_layer_norm_rms_eps(float(args.norm_eps))


def _write_tokenizer(
    writer: Any, tok: Tokenizer, vocab_size: int, chat_template: str | None, gguf: Any
) -> None:
    """The ``tokenizer.ggml.*`` vocabulary and special ids, and the chat template if any."""
    tokens, scores, types = _vocab(tok, vocab_size, gguf)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(tok.unk_id)
    if tok.pad_id >= 0:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    dummy_prefix = _add_dummy_prefix(tok)
    if dummy_prefix is not None:
        writer.add_add_space_prefix(dummy_prefix)
    if chat_template is not None:
        writer.add_chat_template(chat_template)  # gguf.Keys.Tokenizer.CHAT_TEMPLATE


def _write_tensors(
    writer: Any, tensors: dict[str, torch.Tensor], outtype: str, progress: bool, gguf: Any
) -> None:
    """Declare every tensor (GGUF name -> tensor) in the header, then write their data one
    tensor at a time."""
    Q = gguf.GGMLQuantizationType
    np_dtypes = {Q.Q8_0: np.dtype(np.uint8), Q.F32: np.dtype(np.float32)}
    plans = {}
    for name, t in tensors.items():
        qtype, np_shape, nbytes = _plan(t, outtype, gguf)
        plans[name] = qtype
        np_dtype = np_dtypes.get(qtype, np.dtype(np.float16))
        writer.add_tensor_info(name, np_shape, np_dtype, nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    items = tensors.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(tensors), desc=f"GGUF {outtype}", unit="tensor")
    for name, t in items:
        arr = _convert(t, plans[name], gguf)
        writer.write_tensor_data(arr)
        del arr
    writer.flush()


def export_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    outtype: str = "f16",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the native checkpoint ``src`` as the GGUF file ``dst`` and return ``dst``.

    ``outtype`` is one of ``GGUF_TYPES``: ``"f32"``, ``"f16"`` (2-D weights float16) or
    ``"q8_0"`` (2-D weights Q8_0; a weight whose row length is not a multiple of the Q8_0
    block size, 32, falls back to float16). Norm gains (1-D) are always float32. The
    checkpoint must include its ``tokenizer.model``; if the model's ``vocab_size`` exceeds
    the tokenizer's pieces, the vocabulary is padded with unused ``[PADn]`` tokens.

    Tensors are converted and written one at a time. The file is written to a temporary
    name next to ``dst`` and renamed into place at the end, so a failure never leaves a
    partial ``dst``; an existing ``dst`` is an error unless ``force``.
    """
    if outtype not in GGUF_TYPES:
        raise ConvertError(f"unknown GGUF outtype {outtype!r}; expected one of {list(GGUF_TYPES)}")
    gguf = _gguf()
    from llamaforge.checkpoint.native import load, read_chat_template

    src_path, dst_path = Path(src), Path(dst)
    _check_target(dst_path, force)
    with atomic_path(dst_path) as tmp:
        model, tok = load(src_path)
        if tok is None:
            raise ConvertError(
                f"{src_path}: no tokenizer.model; GGUF files carry the vocabulary, so the "
                "checkpoint needs one"
            )
        # every name first: a tensor GGUF has no name for fails before anything is written
        tensors = {gguf_tensor_name(k): t for k, t in model.state_dict().items()}
        writer = gguf.GGUFWriter(tmp, "llama")
        try:
            _write_hparams(writer, model.args, src_path.resolve().name or "llama", outtype, gguf)
            _write_tokenizer(writer, tok, model.args.vocab_size, read_chat_template(src_path), gguf)
            _write_tensors(writer, tensors, outtype, progress, gguf)
        finally:
            writer.close()
    return dst_path


def read_gguf_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a GGUF file holds, without loading its tensors.

    Returns ``{"metadata": {key: value}, "tensors": {name: (shape, type_name)}}``. Values are
    plain Python (str, int, float, bool, or lists of them). Shapes are in PyTorch order
    (``(out_features, in_features)`` for a weight), i.e. GGUF's ``ne`` dimensions reversed;
    type names are GGML's (``"F32"``, ``"F16"``, ``"Q8_0"``, …).
    """
    gguf = _gguf()
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{p}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:
        raise ConvertError(f"{p}: cannot read as GGUF ({e})") from None
    metadata = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }
    tensors = {
        t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
        for t in reader.tensors
    }
    return {"metadata": metadata, "tensors": tensors}
