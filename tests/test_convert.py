"""Meta and Hugging Face conversions, against fairscale's split rules and real transformers."""

import json
import shutil

import pytest
import torch

import llamaforge
from llamaforge.checkpoint.convert import convert
from llamaforge.checkpoint.native import CheckpointError

from .conftest import tiny_model

transformers = pytest.importorskip("transformers")

# fairscale's layouts, written out independently of llamaforge.checkpoint.convert.meta (SPEC §2.9)
COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")
ROW = ("wo", "w2", "tok_embeddings")


def fairscale_split(state, n):
    shards = [{} for _ in range(n)]
    for name, t in state.items():
        kind = name.split(".")[-2]
        for rank in range(n):
            if t.ndim == 1:
                piece = t
            elif kind in COLUMN:
                rows = t.shape[0] // n
                piece = t[rank * rows : (rank + 1) * rows]
            elif kind in ROW:
                cols = t.shape[1] // n
                piece = t[:, rank * cols : (rank + 1) * cols]
            else:
                raise AssertionError(name)
            shards[rank][name] = piece.clone()
    return shards


def logits(model, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, 24), generator=g)
    with torch.no_grad():
        return model(tokens) if isinstance(model, llamaforge.Transformer) else model(tokens).logits


def write_meta_download(root, model, tokenizer, n):
    """Meta's download layout: root/tokenizer.model, root/7B/{params.json, consolidated.*}."""
    size_dir = root / "7B"
    size_dir.mkdir(parents=True)
    tokenizer.save(root / "tokenizer.model")
    a = model.args
    params = {
        "dim": a.dim,
        "multiple_of": a.multiple_of,
        "n_heads": a.n_heads,
        "n_layers": a.n_layers,
        "norm_eps": a.norm_eps,
        "vocab_size": -1,
    }
    if a.n_kv_heads:
        params["n_kv_heads"] = a.n_kv_heads
    (size_dir / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(fairscale_split(model.state_dict(), n)):
        shard["rope.freqs"] = torch.randn(a.head_dim // 2)  # present in real files, ignored
        torch.save(shard, size_dir / f"consolidated.{rank:02d}.pth")
    return size_dir


@pytest.mark.parametrize("n", [1, 2, 4])
def test_meta_shards_merge_to_identical_logits(tmp_path, small_tokenizer, n):
    vocab = small_tokenizer.vocab_size
    model = tiny_model(vocab, norm_gains=True, n_kv_heads=4 if n == 4 else 2)
    src = write_meta_download(tmp_path / "dl", model, small_tokenizer, n)
    out = convert(src, tmp_path / "native", source="meta", target="native", progress=False)
    loaded, tok = llamaforge.load(out)
    assert torch.equal(logits(loaded, vocab), logits(model, vocab))
    assert tok.sha256() == small_tokenizer.sha256()
    assert loaded.args.max_seq_len == 2048  # Meta's files do not store it; LLaMA-1's value


def test_native_to_meta_matches_fairscale_and_round_trips(tmp_path, small_tokenizer):
    vocab = small_tokenizer.vocab_size
    model = tiny_model(vocab, norm_gains=True)
    native = llamaforge.save(model, small_tokenizer, tmp_path / "native")
    meta = convert(
        native, tmp_path / "meta", source="native", target="meta", shards=2, progress=False
    )
    expected = fairscale_split(model.state_dict(), 2)
    for rank in range(2):
        got = torch.load(meta / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert set(got) == set(expected[rank])
        assert all(torch.equal(got[k], expected[rank][k]) for k in got)
    params = json.loads((meta / "params.json").read_text())
    assert params["vocab_size"] == -1 and params["n_kv_heads"] == 2
    back = convert(meta, tmp_path / "back", source="meta", target="native", progress=False)
    assert torch.equal(logits(llamaforge.load(back)[0], vocab), logits(model, vocab))
    with pytest.raises(CheckpointError, match="n_kv_heads=2 is not divisible by 4"):
        convert(
            native, tmp_path / "meta4", source="native", target="meta", shards=4, progress=False
        )
    assert not (tmp_path / "meta4").exists()


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_hf_export_loads_in_transformers_with_our_logits_and_ids(
    tmp_path, small_tokenizer, n_kv_heads
):
    vocab = small_tokenizer.vocab_size
    model = tiny_model(vocab, norm_gains=True, n_kv_heads=n_kv_heads)
    native = llamaforge.save(model, small_tokenizer, tmp_path / "native")
    hf_dir = convert(native, tmp_path / "hf", source="native", target="hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert (logits(hf, vocab) - logits(model, vocab)).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in ["Hello world", "  two  spaces", " lead", "x = 2024\n\tdone", "snow ☃ 日本"]:
        assert hf_tok(text)["input_ids"] == small_tokenizer.encode(text), text
        assert hf_tok.decode(small_tokenizer.encode(text, bos=False)) == text


def test_hf_tokenizer_json_reproduces_metas_ids(tmp_path, meta_tokenizer_path):
    from tokenizers import Tokenizer as FastTokenizer

    from llamaforge.checkpoint.convert.hf import hf_tokenizer_json

    tok = llamaforge.Tokenizer(meta_tokenizer_path)
    fast = FastTokenizer.from_str(hf_tokenizer_json(tok))
    texts = [
        "Hello world",
        "  two  spaces",
        " 7B\npreset 7B: dim 4096",
        "a  b   c  ",
        "Привет, 世界! 😀",
        "def f(x):\n    return  x\t# 12345",
        "e\u0301 \x00 \U0010fffd",
    ]
    for text in texts:
        assert fast.encode(text).ids == tok.encode(text), text
        assert fast.decode(tok.encode(text, bos=False)) == text


def test_hf_checkpoint_saved_by_transformers_imports(tmp_path, small_tokenizer):
    vocab = small_tokenizer.vocab_size
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    small_tokenizer.save(tmp_path / "hf" / "tokenizer.model")
    out = convert(
        tmp_path / "hf", tmp_path / "native", source="hf", target="native", progress=False
    )
    ours, _ = llamaforge.load(out)
    assert ours.args.ffn_hidden_dim == 160 and ours.args.max_seq_len == 128
    assert (logits(ours, vocab) - logits(hf, vocab)).abs().max().item() <= 1e-4


def test_refusals_and_clear_errors(tmp_path, small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size, norm_gains=True)
    native = llamaforge.save(model, small_tokenizer, tmp_path / "native")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="taken: already exists"):
        convert(native, tmp_path / "taken", source="native", target="hf", progress=False)
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(native, tmp_path / "x", source="hf", target="native", progress=False)
    with pytest.raises(CheckpointError, match="no consolidated"):
        convert(native, tmp_path / "x", source="meta", target="native", progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(native, bad)
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(CheckpointError):
        convert(bad, tmp_path / "meta", source="native", target="meta", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "native", "taken"]


def test_llama_tokenizer_classes_load_the_export(tmp_path, small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size, norm_gains=True)
    native = llamaforge.save(model, small_tokenizer, tmp_path / "native")
    hf_dir = convert(native, tmp_path / "hf", source="native", target="hf", progress=False)
    for cls in (transformers.LlamaTokenizer, transformers.LlamaTokenizerFast):
        tok = cls.from_pretrained(hf_dir)
        assert tok("Hello world")["input_ids"] == small_tokenizer.encode("Hello world")
        assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_cli_convert_round_trip_and_errors(tmp_path, small_tokenizer):
    import os
    import subprocess
    import sys

    from .conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "llamaforge", "convert", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    vocab = small_tokenizer.vocab_size
    model = tiny_model(vocab, norm_gains=True)
    native = llamaforge.save(model, small_tokenizer, tmp_path / "native")
    steps = [
        ("native", "hf", native, tmp_path / "hf"),
        ("hf", "meta", tmp_path / "hf", tmp_path / "meta"),
        ("meta", "native", tmp_path / "meta", tmp_path / "back"),
        ("native", "gguf", tmp_path / "back", tmp_path / "m.gguf"),
    ]
    for src_fmt, dst_fmt, src, dst in steps:
        r = run("--from", src_fmt, "--to", dst_fmt, src, dst, "--quiet", "--shards", "1")
        assert r.returncode == 0, r.stderr
    back, _ = llamaforge.load(tmp_path / "back")
    assert (logits(back, vocab) - logits(model, vocab)).abs().max().item() <= 1e-5
    assert (tmp_path / "m.gguf").stat().st_size > 0
    again = run("--from", "native", "--to", "hf", native, tmp_path / "hf")
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = run("--from", "meta", "--to", "native", native, tmp_path / "x")
    assert bad.returncode == 2 and "no consolidated" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


CONVERSATION = [
    {"role": "system", "content": "You are terse.  Answer\tbriefly."},
    {"role": "user", "content": "Hello there!\nHow are you?"},
    {"role": "assistant", "content": "Fine, thanks. 12345"},
    {"role": "user", "content": "  def f(x):\n    return  x"},
    {"role": "assistant", "content": "Écoute — ça va ✓ 日本"},
]


@pytest.mark.parametrize("name", ["alpaca", "llama2"])
def test_hf_export_chat_template_gives_our_ids(tmp_path, meta_tokenizer_path, name):
    """transformers' apply_chat_template on the export = encode_text(our rendering), token
    for token, with and without the generation prompt; and the template comes back on import."""
    from llamaforge.chat_templates import BUILTIN_TEMPLATES, encode_text, load_template

    tok = llamaforge.Tokenizer(meta_tokenizer_path)
    model = tiny_model(tok.vocab_size)
    source = BUILTIN_TEMPLATES[name]
    native = llamaforge.save(model, tok, tmp_path / "native", chat_template=source)
    hf_dir = convert(native, tmp_path / "hf", source="native", target="hf", progress=False)
    assert (hf_dir / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES[name]
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == BUILTIN_TEMPLATES[name]
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")

    template = load_template(name)
    cases = [(CONVERSATION[:-1], True), (CONVERSATION, False)]
    for layout in ("chat_template.jinja", "tokenizer_config.json only"):
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        for messages, gen in cases:
            text = template.render(messages, add_generation_prompt=gen)
            ours = encode_text(tok, text)
            assert ours[0] == tok.bos_id and (gen or ours[-1] == tok.eos_id)
            assert (
                hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                == text
            ), (layout, gen)
            theirs = hf_tok.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=gen, return_dict=False
            )
            assert list(theirs) == ours, (layout, gen)
        # transformers before 4.43 read the template from tokenizer_config.json only
        (hf_dir / "chat_template.jinja").unlink(missing_ok=True)

    back = convert(hf_dir, tmp_path / "back", source="hf", target="native", progress=False)
    assert llamaforge.checkpoint.native.read_chat_template(back) == BUILTIN_TEMPLATES[name]


def test_chat_template_travels_native_to_native_and_from_hf_list(tmp_path, small_tokenizer):
    from llamaforge.chat_templates import LLAMA2
    from llamaforge.checkpoint.native import read_chat_template

    model = tiny_model(small_tokenizer.vocab_size, norm_gains=True)
    native = llamaforge.save(model, small_tokenizer, tmp_path / "native", chat_template=LLAMA2)
    copy = convert(native, tmp_path / "copy", source="native", target="native", progress=False)
    assert read_chat_template(copy) == LLAMA2
    plain = llamaforge.save(model, small_tokenizer, tmp_path / "plain")
    assert read_chat_template(plain) is None
    hf_dir = convert(plain, tmp_path / "hf", source="native", target="hf", progress=False)
    assert not (hf_dir / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((hf_dir / "tokenizer_config.json").read_text())
    # HF's older list-of-named-templates form
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "{{ 'tools' }}"},
        {"name": "default", "template": LLAMA2},
    ]
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    back = convert(hf_dir, tmp_path / "back", source="hf", target="native", progress=False)
    assert read_chat_template(back) == LLAMA2
