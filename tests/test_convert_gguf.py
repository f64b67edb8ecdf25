"""GGUF export: real files written by export_gguf and read back with gguf.GGUFReader."""

from __future__ import annotations

import numpy as np
import pytest

import llamaforge
from llamaforge.checkpoint.native import CheckpointError
from llamaforge.tokenizer import Tokenizer

from .conftest import tiny_model

gguf = pytest.importorskip("gguf")

from llamaforge.checkpoint.convert.gguf import (  # noqa: E402
    GGUF_TYPES,
    ConvertError,
    export_gguf,
    read_gguf_summary,
)

Q = gguf.GGMLQuantizationType
TT = gguf.TokenType

# Meta name -> GGUF name, written out by hand from SPEC §4.2 (not from the module's table).
GLOBAL = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
PER_LAYER = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


def expected_names(n_layers: int) -> dict[str, str]:
    names = dict(GLOBAL)
    for i in range(n_layers):
        for meta, gg in PER_LAYER.items():
            names[f"layers.{i}.{meta}"] = f"blk.{i}.{gg}"
    return names


def field(reader, key):
    f = reader.get_field(key)
    assert f is not None, f"missing GGUF key {key}"
    return f.contents()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tokenizer):
    """A tiny GQA model saved as a checkpoint and exported once per outtype."""
    # multiple_of=16 gives ffn_hidden_dim 176, not a multiple of 32: ffn_down's rows cannot be
    # cut into Q8_0 blocks, so q8_0 must fall back to f16 for it.
    model = tiny_model(
        small_tokenizer.vocab_size,
        norm_gains=True,  # distinct norm gains, so swapped or mis-typed norms show up
        multiple_of=16,
        norm_eps=1e-5,
        rope_theta=50000.0,
        max_seq_len=96,
    )
    args = model.args
    root = tmp_path_factory.mktemp("gguf")
    ckpt = llamaforge.save(model, small_tokenizer, root / "tiny-llama")
    files = {
        o: export_gguf(ckpt, root / f"tiny-{o}.gguf", outtype=o, progress=False) for o in GGUF_TYPES
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"args": args, "model": model, "state": state, "files": files, "ckpt": ckpt}


@pytest.mark.parametrize("outtype", GGUF_TYPES)
def test_metadata(exported, small_tokenizer, outtype):
    args = exported["args"]
    reader = gguf.GGUFReader(exported["files"][outtype])
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == "tiny-llama"
    file_type = {"f32": 0, "f16": 1, "q8_0": 7}[outtype]  # llama.cpp's LLAMA_FTYPE_* values
    assert field(reader, "general.file_type") == file_type
    assert args.ffn_hidden_dim == 176
    expected = {
        "llama.context_length": 96,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 176,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": small_tokenizer.vocab_size,
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(50000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)

    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.pre") == "default"
    sp = small_tokenizer._sp
    n = small_tokenizer.vocab_size
    assert field(reader, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(n)]
    scores = np.array(field(reader, "tokenizer.ggml.scores"), dtype=np.float32)
    np.testing.assert_array_equal(scores, np.array([sp.get_score(i) for i in range(n)], "f4"))
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(types) == n
    assert types[0] == TT.UNKNOWN and types[1] == TT.CONTROL and types[2] == TT.CONTROL
    assert types[3:259] == [TT.BYTE] * 256
    assert [small_tokenizer.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]
    assert set(types[259:]) == {TT.NORMAL}
    assert field(reader, "tokenizer.ggml.bos_token_id") == small_tokenizer.bos_id == 1
    assert field(reader, "tokenizer.ggml.eos_token_id") == small_tokenizer.eos_id == 2
    assert field(reader, "tokenizer.ggml.unknown_token_id") == small_tokenizer.unk_id == 0
    assert reader.get_field("tokenizer.ggml.padding_token_id") is None  # pad_id is -1
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_eos_token") is False


@pytest.mark.parametrize("outtype", GGUF_TYPES)
def test_tensor_names_and_shapes(exported, outtype):
    state = exported["state"]
    names = expected_names(2)
    assert set(names) == set(state)
    reader = gguf.GGUFReader(exported["files"][outtype])
    by_name = {t.name: t for t in reader.tensors}
    assert set(by_name) == set(names.values())
    summary = read_gguf_summary(exported["files"][outtype])
    for meta, gg in names.items():
        shape = tuple(state[meta].shape)
        # GGUF stores ne[0] (the row length) first: the reverse of PyTorch's shape.
        assert tuple(int(d) for d in by_name[gg].shape) == shape[::-1], gg
        assert summary["tensors"][gg] == (shape, by_name[gg].tensor_type.name)
    assert summary["metadata"]["llama.block_count"] == 2
    assert summary["tensors"]["blk.1.attn_k.weight"][0] == (32, 64)  # 2 kv heads x 16


def test_f32_is_exact(exported):
    state = exported["state"]
    reader = gguf.GGUFReader(exported["files"]["f32"])
    by_name = {t.name: t for t in reader.tensors}
    for meta, gg in expected_names(2).items():
        t = by_name[gg]
        assert t.tensor_type == Q.F32
        np.testing.assert_array_equal(np.asarray(t.data), state[meta].numpy(), err_msg=gg)


def test_f16_rounds_2d_weights_only(exported):
    state = exported["state"]
    reader = gguf.GGUFReader(exported["files"]["f16"])
    by_name = {t.name: t for t in reader.tensors}
    for meta, gg in expected_names(2).items():
        t, w = by_name[gg], state[meta]
        if w.dim() == 1:
            assert t.tensor_type == Q.F32, gg
            np.testing.assert_array_equal(np.asarray(t.data), w.numpy(), err_msg=gg)
        else:
            assert t.tensor_type == Q.F16, gg
            data = np.asarray(t.data)
            assert data.dtype == np.float16
            np.testing.assert_array_equal(data, w.half().numpy(), err_msg=gg)
            np.testing.assert_allclose(data.astype(np.float32), w.numpy(), rtol=1e-3, atol=1e-7)


def test_q8_0_quantises_2d_weights(exported):
    state = exported["state"]
    reader = gguf.GGUFReader(exported["files"]["q8_0"])
    assert field(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    by_name = {t.name: t for t in reader.tensors}
    n_q8 = 0
    for meta, gg in expected_names(2).items():
        t, w = by_name[gg], state[meta].numpy()
        if w.ndim == 1:
            assert t.tensor_type == Q.F32, gg
            np.testing.assert_array_equal(np.asarray(t.data), w, err_msg=gg)
        elif w.shape[-1] % 32:  # ffn_down: rows of 176 values, not whole Q8_0 blocks
            assert gg.endswith("ffn_down.weight")
            assert t.tensor_type == Q.F16, gg
            np.testing.assert_array_equal(np.asarray(t.data), state[meta].half().numpy())
        else:
            n_q8 += 1
            assert t.tensor_type == Q.Q8_0, gg
            assert t.n_bytes == w.size // 32 * 34
            deq = gguf.quants.dequantize(np.asarray(t.data), Q.Q8_0)
            assert deq.shape == w.shape
            # Each block of 32 shares one scale amax/127: the error is at most half a step
            # (plus the scale's own fp16 rounding).
            blocks_w = w.reshape(-1, 32)
            err = np.abs(deq.reshape(-1, 32) - blocks_w)
            step = np.abs(blocks_w).max(axis=1, keepdims=True) / 127
            assert (err <= 0.6 * step + 1e-8).all(), gg
            assert err.max() > 0  # really quantised, not stored exactly
            assert err.max() < 0.01 * np.abs(w).max()
    assert n_q8 == 2 + 2 * 6  # token_embd, output, and q/k/v/o/gate/up per layer


def test_meta_tokenizer_types(tmp_path, meta_tokenizer_path):
    tok = Tokenizer(meta_tokenizer_path)
    assert tok.vocab_size == 32000
    model = tiny_model(32000, max_seq_len=2048)
    ckpt = llamaforge.save(model, tok, tmp_path / "meta-vocab")
    out = export_gguf(ckpt, tmp_path / "m.gguf", outtype="f16", progress=False)
    reader = gguf.GGUFReader(out)
    types = field(reader, "tokenizer.ggml.token_type")
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(types) == len(tokens) == 32000
    assert types[0] == TT.UNKNOWN and tokens[0] == "<unk>"
    assert types[1:3] == [TT.CONTROL, TT.CONTROL] and tokens[1:3] == ["<s>", "</s>"]
    assert types[3:259] == [TT.BYTE] * 256
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    assert set(types[259:]) == {TT.NORMAL}
    assert tokens[259:] == [tok.id_to_piece(i) for i in range(259, 32000)]
    assert field(reader, "llama.context_length") == 2048
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True


def test_vocab_padded_to_model(tmp_path, small_tokenizer):
    n = small_tokenizer.vocab_size
    ckpt = llamaforge.save(tiny_model(n + 3), small_tokenizer, tmp_path / "padded")
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "p.gguf", outtype="f32", progress=False))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == n + 3 == field(reader, "llama.vocab_size")
    assert tokens[n:] == ["[PAD1]", "[PAD2]", "[PAD3]"]
    assert field(reader, "tokenizer.ggml.token_type")[n:] == [TT.UNUSED] * 3


def test_existing_dst_needs_force(exported, tmp_path):
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"precious")
    with pytest.raises(ConvertError, match="force") as e:
        export_gguf(exported["ckpt"], dst, outtype="f32", progress=False)
    assert str(dst) in str(e.value)
    assert dst.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    export_gguf(exported["ckpt"], dst, outtype="f32", force=True)  # with the progress bar
    assert dst.read_bytes() == exported["files"]["f32"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_bad_outtype(exported, tmp_path):
    with pytest.raises(ValueError, match="q4_0") as e:
        export_gguf(exported["ckpt"], tmp_path / "x.gguf", outtype="q4_0", progress=False)
    for t in GGUF_TYPES:
        assert t in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_no_partial_file(tmp_path):
    src = tmp_path / "not-a-checkpoint"
    src.mkdir()
    (src / "params.json").write_text('{"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 8}')
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "m.gguf"
    with pytest.raises(CheckpointError, match="not a native checkpoint"):
        export_gguf(src, dst, progress=False)
    assert list(out_dir.iterdir()) == []
    # With force, a failed export leaves the previous file untouched.
    dst.write_bytes(b"old")
    with pytest.raises(CheckpointError):
        export_gguf(src, dst, force=True, progress=False)
    assert dst.read_bytes() == b"old"
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]


def test_chat_template_exported(tmp_path, small_tokenizer):
    from llamaforge.chat_templates import BUILTIN_TEMPLATES

    model = tiny_model(small_tokenizer.vocab_size)
    for name, source in BUILTIN_TEMPLATES.items():
        ckpt = llamaforge.save(model, small_tokenizer, tmp_path / name, chat_template=source)
        out = export_gguf(ckpt, tmp_path / f"{name}.gguf", outtype="f32", progress=False)
        reader = gguf.GGUFReader(out)
        assert field(reader, gguf.Keys.Tokenizer.CHAT_TEMPLATE) == source
    plain = llamaforge.save(model, small_tokenizer, tmp_path / "plain")
    out = export_gguf(plain, tmp_path / "plain.gguf", outtype="f32", progress=False)
    assert gguf.GGUFReader(out).get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE) is None
