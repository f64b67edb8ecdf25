"""llama2.c import, checked against a real trained llama2.c model (aidreams260K.bin, legacy
layout) and its tokenizer (tok512.bin), with independent numpy references of run.c's
forward pass and of its tokenizer's encode."""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest
import torch

import llamaforge
from llamaforge.checkpoint.convert.llama2c import (
    LLAMA2C_MAGIC,
    Llama2cError,
    import_llama2c,
    llama2c_tokenizer_to_sentencepiece,
    read_llama2c,
    read_llama2c_tokenizer,
)
from llamaforge.checkpoint.native import CheckpointError
from llamaforge.tokenizer import Tokenizer

from .conftest import shared_file

MODEL = "weights/llama2c/aidreams260K.bin"
TOKENIZER = "weights/llama2c/tok512.bin"
HEADER = dict(dim=64, hidden_dim=172, n_layers=4, n_heads=4, n_kv_heads=4, vocab=512, seq_len=128)


@pytest.fixture(scope="module")
def bin_path():
    return shared_file(MODEL)


@pytest.fixture(scope="module")
def tok_path():
    return shared_file(TOKENIZER)


@pytest.fixture(scope="module")
def converted(bin_path, tok_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("l2c") / "aidreams260K"
    assert import_llama2c(bin_path, tok_path, out) == out
    return out


@pytest.fixture(scope="module")
def loaded(converted):
    return llamaforge.load(converted)


# -- independent readers of the raw files (run.c's view of them) ----------------------------


def raw_weights(path) -> dict[str, np.ndarray]:
    """The legacy .bin as run.c's memory_map_weights slices it."""
    data = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", data[:28])
    floats = np.frombuffer(data, dtype="<f4", offset=28).astype(np.float64)
    hs = dim // n_heads
    sizes = [
        ("emb", (abs(vocab), dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, n_heads * hs, dim)),
        ("wk", (n_layers, n_kv * hs, dim)),
        ("wv", (n_layers, n_kv * hs, dim)),
        ("wo", (n_layers, dim, n_heads * hs)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_real", (seq * hs // 2,)),
        ("freq_imag", (seq * hs // 2,)),
    ]
    out, off = {}, 0
    for name, shape in sizes:
        n = math.prod(shape)
        out[name] = floats[off : off + n].reshape(shape)
        off += n
    out["wcls"] = out["emb"] if vocab > 0 else floats[off:].reshape(-vocab, dim)
    out["header"] = (dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq)
    return out


def runc_forward(w: dict, tokens: list[int]) -> np.ndarray:
    """run.c's forward(), one position at a time with a KV cache; logits per position."""
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = w["header"]
    hs, kv_dim, kv_mul = dim // n_heads, n_kv * (dim // n_heads), n_heads // n_kv

    def rmsnorm(x, g):
        return g * (x / np.sqrt(np.mean(x * x) + 1e-5))

    kcache = np.zeros((n_layers, seq, kv_dim))
    vcache = np.zeros((n_layers, seq, kv_dim))
    all_logits = []
    for pos, token in enumerate(tokens):
        x = w["emb"][token].copy()
        for layer in range(n_layers):
            xb = rmsnorm(x, w["rms_att"][layer])
            q, k, v = w["wq"][layer] @ xb, w["wk"][layer] @ xb, w["wv"][layer] @ xb
            for i in range(0, dim, 2):
                freq = 1.0 / 10000.0 ** ((i % hs) / hs)
                fcr, fci = math.cos(pos * freq), math.sin(pos * freq)
                for vec in (q, k) if i < kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            kcache[layer, pos], vcache[layer, pos] = k, v
            att_out = np.zeros(dim)
            for h in range(n_heads):
                qh = q[h * hs : (h + 1) * hs]
                kvh = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
                scores = kcache[layer, : pos + 1, kvh] @ qh / math.sqrt(hs)
                att = np.exp(scores - scores.max())
                att /= att.sum()
                att_out[h * hs : (h + 1) * hs] = att @ vcache[layer, : pos + 1, kvh]
            x = x + w["wo"][layer] @ att_out
            xb = rmsnorm(x, w["rms_ffn"][layer])
            h1, h3 = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (h1 / (1.0 + np.exp(-h1)) * h3)
        all_logits.append(w["wcls"] @ rmsnorm(x, w["rms_final"]))
    return np.stack(all_logits)


def runc_encode(vocab: list[bytes], scores: list[float], text: str) -> list[int]:
    """run.c's encode(text, bos=1, eos=0): dummy-prefix space, code points (bytes + 3 when
    absent), then repeatedly merge the adjacent pair whose concatenation scores highest."""
    lookup = {piece: i for i, piece in enumerate(vocab)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        tokens.extend([lookup[b]] if b in lookup else [c + 3 for c in b])
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(1, len(tokens) - 1):  # never merge the BOS token
            merged = lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]])
            if merged is not None and scores[merged] > best:
                best, best_i, best_id = scores[merged], i, merged
        if best_i < 0:
            return tokens
        tokens[best_i : best_i + 2] = [best_id]


def raw_vocab(path) -> tuple[list[bytes], list[float]]:
    data = path.read_bytes()
    off, vocab, scores = 4, [], []
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        vocab.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    return vocab, scores


# -- header and tensors ----------------------------------------------------------------------


def test_header_and_shapes(bin_path):
    assert struct.unpack("<7i", bin_path.read_bytes()[:28]) == tuple(HEADER.values())
    args, state = read_llama2c(bin_path)
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads) == (64, 4, 4, 4)
    assert (args.vocab_size, args.max_seq_len, args.norm_eps, args.rope_theta) == (
        512,
        128,
        1e-5,
        10000.0,
    )
    assert args.ffn_hidden_dim == 172 and args.ffn_dim_multiplier is None
    expected = llamaforge.Transformer(args).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }
    assert state["layers.0.attention.wq.weight"].shape == (64, 64)
    assert state["layers.3.feed_forward.w1.weight"].shape == (172, 64)
    assert state["layers.3.feed_forward.w2.weight"].shape == (64, 172)
    assert all(t.dtype == torch.float32 for t in state.values())
    # shared classifier: a copy of the embedding, not the same storage
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert state["output.weight"].data_ptr() != state["tok_embeddings.weight"].data_ptr()
    raw = raw_weights(bin_path)
    np.testing.assert_array_equal(state["layers.2.attention.wv.weight"].numpy(), raw["wv"][2])
    np.testing.assert_array_equal(state["norm.weight"].numpy(), raw["rms_final"])


def test_import_and_load(converted, loaded):
    model, tok = loaded
    assert (converted / "params.json").is_file() and (converted / "tokenizer.model").is_file()
    assert model.args.ffn_hidden_dim == 172 and model.args.norm_eps == 1e-5
    assert model.args.max_seq_len == 128 and tok.vocab_size == 512
    assert model.num_params() == 230_976 + 512 * 64  # + the untied copy of the classifier
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)


# -- correctness against run.c ---------------------------------------------------------------


def test_logits_match_runc_reference(bin_path, loaded):
    model, tok = loaded
    tokens = tok.encode("Once upon a time, a curious machine dreamed of the sea.")[:20]
    tokens += [5 + 7 * i for i in range(20 - len(tokens))]
    assert len(tokens) == 20
    ref = runc_forward(raw_weights(bin_path), tokens)
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # and incrementally through the KV cache, as generation runs it
    model.setup_cache(1, 32)
    try:
        with torch.no_grad():
            steps = [model(torch.tensor([[t]]), start_pos=i)[0, 0] for i, t in enumerate(tokens)]
    finally:
        model.clear_cache()
    np.testing.assert_allclose(torch.stack(steps).double().numpy(), ref, atol=1e-4, rtol=0)


SENTENCES = [
    "Once upon a time",
    "Once upon a time, there was a little girl named Lily.",
    "The model dreams of probability, patterns and hidden secrets.",
    'She said: "Hello, world!" and counted 12345 stars.',
    "Two  spaces,   three spaces and a tab\there.",
    "Café, naïve, 東京 and 🙂 fall back to bytes.",
    "line one\nline two",
    " leading space",
]


def test_tokenizer_matches_runc_encode(tok_path):
    tok = Tokenizer.from_bytes(llama2c_tokenizer_to_sentencepiece(tok_path))
    assert tok.vocab_size == 512 and (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (
        0,
        1,
        2,
        -1,
    )
    assert tok.id_to_piece(1) == "<s>" and tok.id_to_piece(2) == "</s>"
    assert tok.is_byte(3 + 0x0A) and tok.id_to_piece(3 + 0x41) == "<0x41>"
    vocab, scores = raw_vocab(tok_path)
    for i in (300, 400, 511):  # ids and scores are kept, spaces become ▁
        assert tok.id_to_piece(i) == vocab[i].decode().replace(" ", "\u2581")
    for text in SENTENCES:
        ids = tok.encode(text)
        assert ids == runc_encode(vocab, scores, text), text
        assert tok.decode(ids) == text
    # run.c's decode: the piece after BOS loses its leading space; SentencePiece drops it too
    ids = tok.encode("Once upon a time")
    assert vocab[ids[1]].startswith(b" ")
    runc_text = b"".join(vocab[i] for i in ids[1:])[1:].decode()
    assert runc_text == tok.decode(ids) == "Once upon a time"


def test_greedy_generation_is_text(loaded):
    model, tok = loaded
    out = llamaforge.generate(model, tok, "Once upon a time", max_new_tokens=40, temperature=0.0)
    print(f"\naidreams260K greedy continuation of 'Once upon a time': {out!r}")
    words = out.split()
    alphabetic = [w for w in words if re.fullmatch(r"[A-Za-z]+", w.strip(".,;:!?\"'()"))]
    assert len(alphabetic) >= 5, out
    assert len(alphabetic) >= 0.7 * len(words), out
    assert "\ufffd" not in out
    # the trained weights read right: natural text is far likelier than the same tokens shuffled
    ids = tok.encode("Once upon a time, there was a tapestry of hidden patterns and whispers.")
    shuffled = ids[:1] + list(np.random.default_rng(0).permutation(ids[1:]))

    def nll(seq):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, :-1]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:])).item()

    assert nll(ids) < nll(shuffled) - 1.0 and nll(ids) < math.log(512) - 2.0


# -- other layouts ---------------------------------------------------------------------------


def _export(path, state, args, version: int, group_size: int = 64) -> None:
    """llama2.c's export.py layouts v1/v2 written from Meta-named tensors."""
    layers = range(args.n_layers)
    header = struct.pack("<Ii", LLAMA2C_MAGIC, version)
    header += struct.pack(
        "<7i",
        args.dim,
        args.ffn_hidden_dim,
        args.n_layers,
        args.n_heads,
        args.kv_heads,
        args.vocab_size,
        args.max_seq_len,
    )
    header += struct.pack("<B", 1)
    if version == 2:
        header += struct.pack("<i", group_size)
    header += b"\0" * (256 - len(header))

    def per_layer(suffix):
        return [state[f"layers.{i}.{suffix}"] for i in layers]

    norms = [
        *per_layer("attention_norm.weight"),
        *per_layer("ffn_norm.weight"),
        state["norm.weight"],
    ]
    mats = [state["tok_embeddings.weight"]]
    for k in ("attention.wq", "attention.wk", "attention.wv", "attention.wo"):
        mats += per_layer(f"{k}.weight")
    for k in ("w1", "w2", "w3"):
        mats += per_layer(f"feed_forward.{k}.weight")
    with open(path, "wb") as f:
        f.write(header)
        for t in norms:
            f.write(t.numpy().astype("<f4").tobytes())
        if version == 1:
            for t in mats:
                f.write(t.numpy().astype("<f4").tobytes())
            return
        scales = []
        for t in mats:
            g = t.reshape(-1, group_size)
            s = g.abs().max(dim=1).values / 127.0
            f.write(torch.round(g / s[:, None]).to(torch.int8).numpy().tobytes())
            scales.append(s)
        for s in scales:
            f.write(s.numpy().astype("<f4").tobytes())


@pytest.mark.parametrize("version", [1, 2])
def test_versioned_exports(bin_path, tmp_path, version):
    args, state = read_llama2c(bin_path)
    path = tmp_path / f"v{version}.bin"
    _export(path, state, args, version)
    args2, state2 = read_llama2c(path)
    assert args2 == args
    for name, t in state.items():
        if version == 1 or t.ndim == 1:
            assert torch.equal(state2[name], t), name
        else:  # Q8_0: within half a quantisation step of each group's scale
            step = t.reshape(-1, 64).abs().max(dim=1).values[:, None] / 127.0
            err = (state2[name] - t).reshape(-1, 64).abs()
            assert bool((err <= step * 0.5 + 1e-7).all()), name
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<i", 3))
    with pytest.raises(Llama2cError, match="version 3 is not supported"):
        read_llama2c(path)


# -- errors ----------------------------------------------------------------------------------


def test_truncated_bin(bin_path, tmp_path):
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(bin_path.read_bytes()[:-1000])
    with pytest.raises(Llama2cError, match=r"truncated\.bin: truncated: .*dim=64"):
        read_llama2c(bad)
    longer = tmp_path / "longer.bin"
    longer.write_bytes(bin_path.read_bytes() + b"\0" * 8)
    with pytest.raises(Llama2cError, match="longer.bin: has 8 trailing bytes"):
        read_llama2c(longer)
    text = tmp_path / "notes.bin"
    text.write_text("these are not weights, just some notes about a model\n" * 10)
    with pytest.raises(Llama2cError, match="notes.bin: not a llama2.c model.bin"):
        read_llama2c(text)
    with pytest.raises(Llama2cError, match="tiny.bin: truncated"):
        (tmp_path / "tiny.bin").write_bytes(b"\1\2\3")
        read_llama2c(tmp_path / "tiny.bin")


def test_bad_tokenizer_files(tok_path, bin_path, tmp_path):
    text = tmp_path / "tokenizer.bin"
    text.write_text("hello world\nthis is a text file, not a tokenizer\n")
    with pytest.raises(Llama2cError, match=r"tokenizer\.bin: not a llama2.c tokenizer.bin"):
        llama2c_tokenizer_to_sentencepiece(text)
    with pytest.raises(Llama2cError, match="tokenizer.bin: not a llama2.c tokenizer.bin"):
        import_llama2c(bin_path, text, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(tok_path.read_bytes()[:-1])
    with pytest.raises(Llama2cError, match="cut.bin: truncated inside piece 511"):
        read_llama2c_tokenizer(cut)
    with pytest.raises(Llama2cError, match=r"tok512.bin: .* trailing bytes after 500 pieces"):
        read_llama2c_tokenizer(tok_path, vocab_size=500)
    with pytest.raises(Llama2cError, match="tok512.bin: truncated or wrong vocabulary: 512"):
        read_llama2c_tokenizer(tok_path, vocab_size=1000)


def test_existing_out_dir_needs_force(bin_path, tok_path, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="ckpt: already exists"):
        import_llama2c(bin_path, tok_path, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert import_llama2c(bin_path, tok_path, out, force=True) == out
    assert not (out / "keep.txt").exists() and (out / "params.json").is_file()


def test_legacy_unshared_classifier(bin_path, tmp_path):
    data = bytearray(bin_path.read_bytes())
    data[20:24] = struct.pack("<i", -512)
    wcls = np.arange(512 * 64, dtype="<f4").reshape(512, 64) / 1e4
    path = tmp_path / "unshared.bin"
    path.write_bytes(bytes(data) + wcls.tobytes())
    args, state = read_llama2c(path)
    assert args.vocab_size == 512
    np.testing.assert_array_equal(state["output.weight"].numpy(), wcls)
    path.write_bytes(bytes(data))  # the flag says unshared, but no classifier follows
    with pytest.raises(Llama2cError, match="unshared.bin: truncated: .*unshared classifier"):
        read_llama2c(path)
