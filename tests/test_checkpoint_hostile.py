"""Untrusted checkpoints (issue 25): every hostile input is a one-line error naming the file
and what is wrong, or a documented safe behaviour. A tokenizer that is not the recorded one,
index entries that leave the folder, params.json and Hugging Face config values out of
range or outside LLaMA's architecture, pickles that hold more than tensors, and a training
checkpoint damaged without changing its size."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.checkpoint.convert import convert
from llamaforge.checkpoint.native import CheckpointError, load, save
from llamaforge.cli.main import main
from llamaforge.tokenizer import Tokenizer, train_tokenizer
from llamaforge.training.checkpointer import list_checkpoints
from llamaforge.training.pretrain import run_pretrain

from .conftest import tiny_model
from .test_harden_errors import flip_a_byte
from .test_pretrain import cfg_of, corpus, metrics, run  # noqa: F401 (corpus: a fixture)


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_tokenizer) -> Path:
    model = tiny_model(small_tokenizer.vocab_size)
    return save(model, small_tokenizer, tmp_path_factory.mktemp("hostile") / "ckpt")


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, small_tokenizer) -> Path:
    """A tokenizer of the same size as the small one, trained on other text (code)."""
    from llamaforge.data.stdlib import code_documents

    out = tmp_path_factory.mktemp("other") / "tokenizer.model"
    train_tokenizer(code_documents(max_bytes=300_000), out, vocab_size=small_tokenizer.vocab_size)
    assert Tokenizer(out).vocab_size == small_tokenizer.vocab_size
    return out


def copy_of(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "copy"))


# ----------------------------------------------------------------------------- tokenizer


def test_a_tokenizer_other_than_the_recorded_one_is_refused_unless_forced(
    ckpt, other_tokenizer, small_tokenizer, tmp_path, capsys
):
    ours, theirs = small_tokenizer.sha256(), Tokenizer(other_tokenizer).sha256()
    with pytest.raises(CheckpointError) as e:
        load(ckpt, tokenizer=other_tokenizer)
    msg = one_line(e)
    assert str(other_tokenizer) in msg and str(ckpt / "params.json") in msg
    assert ours in msg and theirs in msg and "--force" in msg
    model, tok = load(ckpt, tokenizer=other_tokenizer, force=True)
    assert tok.sha256() == theirs and "warning:" in capsys.readouterr().err
    # the checkpoint's own tokenizer.model replaced by another of the same size
    swapped = copy_of(ckpt, tmp_path)
    shutil.copy(other_tokenizer, swapped / "tokenizer.model")
    with pytest.raises(CheckpointError, match=f"{theirs} differs from .* {ours}"):
        load(swapped)
    # the commands: one line and exit status 2, or with --force a warning and the output
    argv = ["generate", "--ckpt", str(swapped), "--device", "cpu", "--prompt", "x"]
    assert main([*argv, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamaforge generate: error: ") and err.count("\n") == 1
    assert main([*argv, "--max-new-tokens", "2", "--force", "--seed", "0"]) == 0
    assert "warning:" in capsys.readouterr().err
    # the evaluation's loader takes the same check and the same --force
    from llamaforge.eval.lm import LlamaforgeLM

    with pytest.raises(CheckpointError, match="--force"):
        LlamaforgeLM.from_checkpoint(swapped, device="cpu", progress=False)
    lm = LlamaforgeLM.from_checkpoint(swapped, device="cpu", progress=False, force=True)
    assert lm.tokenizer.sha256() == theirs


# ----------------------------------------------------------------------------- shard paths


def _sharded(tmp_path: Path, small_tokenizer) -> tuple[Path, dict]:
    model = tiny_model(small_tokenizer.vocab_size)
    out = save(model, small_tokenizer, tmp_path / "sharded", max_shard_size=60_000)
    return out, json.loads((out / "model.safetensors.index.json").read_text())


def _point(out: Path, index: dict, target: str) -> str:
    """Make the index's first tensor's entry ``target``; returns the tensor's name."""
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = target
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return name


def test_index_entries_that_leave_the_checkpoint_folder_are_refused(tmp_path, small_tokenizer):
    out, index = _sharded(tmp_path, small_tokenizer)
    first = index["weight_map"][next(iter(index["weight_map"]))]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(out / first, outside / first)  # a readable file: only the path is wrong
    for target in (f"../elsewhere/{first}", str(outside / first)):
        name = _point(out, index, target)
        with pytest.raises(CheckpointError) as e:
            load(out)
        assert f"weight_map[{name!r}]" in one_line(e) and "refused" in str(e.value)
    os.symlink(outside / first, out / "linked.safetensors")
    _point(out, index, "linked.safetensors")
    with pytest.raises(CheckpointError, match="is a link to .*outside"):
        load(out)
    (out / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        load(out)


def test_a_shard_that_is_a_fifo_is_refused_without_blocking(tmp_path, small_tokenizer):
    out, index = _sharded(tmp_path, small_tokenizer)
    name = _point(out, index, "fifo.safetensors")
    os.mkfifo(out / "fifo.safetensors")
    with pytest.raises(CheckpointError, match="fifo.safetensors: not a regular file"):
        load(out)
    assert name


# ----------------------------------------------------------------------------- params.json

PARAMS_CASES = [
    ("rope_theta", "NaN", "expected a finite number 0 < rope_theta <= 1e+15"),
    ("rope_theta", "Infinity", "expected a finite number"),
    ("rope_theta", "1" + "0" * 400, "too large for a float"),
    ("norm_eps", "NaN", "expected a finite number 0 < norm_eps < 1"),
    ("norm_eps", "0", "0 < norm_eps"),
    ("max_seq_len", "1000000000000", "max_seq_len <= 1048576 (LLAMAFORGE_MAX_SEQ_LEN"),
    ("dim", "0", "1 <= dim <= 65536"),
    ("n_heads", "3", "dim=64 must split into n_heads=3"),
    ("n_kv_heads", "3", "n_kv_heads=3: expected a divisor of n_heads=4"),
    ("n_kv_heads", "0", "n_kv_heads=0"),
    ("vocab_size", "0", "1 <= vocab_size"),
    ("vocab_size", "1000000000", "vocab_size <= 4194304"),
    ("multiple_of", "0", "1 <= multiple_of"),
    ("n_layers", "100000", "n_layers <= 1024"),
    ("ffn_dim_multiplier", "-1.5", "0 < ffn_dim_multiplier <= 64"),
    ("ffn_dim_multiplier", "1e-9", "SwiGLU hidden size 0"),
]


@pytest.mark.parametrize("field, value, message", PARAMS_CASES)
def test_params_json_fields_out_of_range_name_file_field_and_range(
    ckpt, tmp_path, field, value, message
):
    bad = copy_of(ckpt, tmp_path)
    text = (bad / "params.json").read_text()
    params = json.loads(text)
    params[field] = "@"
    (bad / "params.json").write_text(json.dumps(params).replace('"@"', value))
    with pytest.raises(CheckpointError) as e:
        load(bad)
    msg = one_line(e)
    assert str(bad / "params.json") in msg and field in msg and message in msg, msg


def test_max_seq_len_bound_is_raised_by_the_environment(ckpt, tmp_path, monkeypatch, capsys):
    bad = copy_of(ckpt, tmp_path)
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "max_seq_len": 2**21}))
    argv = ["generate", "--ckpt", str(bad), "--device", "cpu", "--prompt", "x"]
    assert main([*argv, "--max-new-tokens", "1"]) == 2  # 1 PB of KV cache is not tried
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_seq_len=2097152" in err
    monkeypatch.setenv("LLAMAFORGE_MAX_SEQ_LEN", str(2**21))
    assert load(bad)[0].args.max_seq_len == 2**21
    monkeypatch.setenv("LLAMAFORGE_MAX_SEQ_LEN", "lots")
    with pytest.raises(CheckpointError, match="LLAMAFORGE_MAX_SEQ_LEN='lots': expected a pos"):
        load(bad)


def test_params_json_nested_too_deeply_is_one_line(ckpt, tmp_path):
    bad = copy_of(ckpt, tmp_path)
    (bad / "params.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="params.json: not valid JSON"):
        load(bad)


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, small_tokenizer) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=small_tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    out = tmp_path_factory.mktemp("hf") / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    small_tokenizer.save(out / "tokenizer.model")
    return out


HF_CASES = [
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported (LLaMA's is 'silu' or 'swish')"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quantization_config="),
    ("architectures", ["LlamaForSequenceClassification"], "architectures="),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5 is not supported"),
    ("hidden_size", 64.5, "hidden_size=64.5: expected a positive integer"),
    ("num_key_value_heads", 0, "num_key_value_heads=0: expected a positive integer"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps=nan: expected a finite number"),
    ("max_position_embeddings", 10**12, "max_position_embeddings <= 1048576"),
    ("intermediate_size", 10**12, "intermediate_size=1000000000000: expected at most"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 0}, "rope_theta=0.0"),
]


@pytest.mark.parametrize("key, value, message", HF_CASES)
def test_hf_config_options_outside_llama_are_refused_by_name(hf_dir, tmp_path, key, value, message):
    src = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "out", source="hf", target="native", progress=False)
    msg = one_line(e)
    assert str(src / "config.json") in msg and message in msg, msg
    assert not (tmp_path / "out").exists()


def test_tied_embeddings_untie_exactly_and_a_stored_lm_head_must_agree(tmp_path, small_tokenizer):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    vocab = small_tokenizer.vocab_size
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    src = tmp_path / "tied"
    hf.save_pretrained(src)
    out = convert(src, tmp_path / "native", source="hf", target="native", progress=False)
    ours, _ = llamaforge.load(out)
    tokens = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4
    # a stored lm_head that is not the embedding: transformers would ignore it, we refuse it
    (weights,) = src.glob("*.safetensors")
    state = load_file(weights)
    state["lm_head.weight"] = torch.randn(vocab, 64)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "native2", source="hf", target="native", progress=False)
    assert "lm_head.weight differs from model.embed_tokens.weight" in one_line(e)


def test_hf_index_entries_are_confined_but_hub_snapshot_links_import(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    # a hub cache: snapshots/REV/ holds links into blobs/, and an index
    blobs, snap = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    state = load_file(hf_dir / "model.safetensors")
    names = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": names[:5],
        "model-00002-of-00002.safetensors": names[5:],
    }
    weight_map = {}
    for i, (fname, part) in enumerate(halves.items()):
        save_file({n: state[n] for n in part}, blobs / f"blob{i}", metadata={"format": "pt"})
        os.symlink(blobs / f"blob{i}", snap / fname)
        weight_map.update(dict.fromkeys(part, fname))
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(hf_dir / f, snap / f)
    index = {"metadata": {}, "weight_map": weight_map}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    out = convert(snap, tmp_path / "native", source="hf", target="native", progress=False)
    assert load(out)[0].args.dim == 64
    index["weight_map"][names[0]] = "../../blobs/blob0"
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        convert(snap, tmp_path / "native2", source="hf", target="native", progress=False)
    assert "'../../blobs/blob0' is not a file name inside" in one_line(e)


# ----------------------------------------------------------------------------- pickles


class _RunsCode:
    """A pickle payload: unpickling it would create the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _hostile_pickle(path: Path, proof: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _RunsCode(proof)}, path)


def test_pickles_holding_more_than_tensors_are_refused_in_one_line(hf_dir, tmp_path, capsys):
    proof = tmp_path / "code-ran"
    src = tmp_path / "hf"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src / "config.json")
    _hostile_pickle(src / "pytorch_model.bin", proof)
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "out", source="hf", target="native", progress=False)
    msg = one_line(e)
    assert str(src / "pytorch_model.bin") in msg and "safetensors" in msg
    argv = ["convert", "--from", "hf", "--to", "native", str(src), str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (src / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 10)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused"):
        convert(src, tmp_path / "out", source="hf", target="native", progress=False)
    assert not proof.exists()


def test_meta_and_adapter_pickles_are_refused_in_one_line(tmp_path):
    from llamaforge.finetune.lora import LoraError, read_adapter

    proof = tmp_path / "code-ran"
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    _hostile_pickle(meta / "consolidated.00.pth", proof)
    with pytest.raises(CheckpointError) as e:
        convert(meta, tmp_path / "out", source="meta", target="native", progress=False)
    assert "consolidated.00.pth: refused" in one_line(e)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    peft = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(peft))
    _hostile_pickle(adapter / "adapter_model.bin", proof)
    with pytest.raises(LoraError) as e:
        read_adapter(adapter)
    assert "adapter_model.bin: refused" in one_line(e)
    assert not proof.exists()


# ----------------------------------------------------------------------------- training


def test_a_newest_checkpoint_damaged_in_place_is_skipped_and_the_run_matches(
    corpus,  # noqa: F811
    tmp_path,
    capsys,
):
    full = run_pretrain(cfg_of(corpus, tmp_path / "full"))
    ref = metrics(tmp_path / "full")
    part = tmp_path / "part"
    run_pretrain(cfg_of(corpus, part, "stop_at=7"))
    found = dict(list_checkpoints(part / "checkpoints"))
    assert sorted(found) == [5, 7]
    shard = max(found[7].glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    flip_a_byte(shard)
    assert shard.stat().st_size == size
    capsys.readouterr()
    second = run_pretrain(cfg_of(corpus, part))  # resume = "auto"
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {found[7]}" in err and str(shard) in err
    assert "at step 5" in err
    assert second["step"] == 10 and metrics(part) == ref  # steps 6-10 replayed: bitwise
    assert second["val_loss"] == full["val_loss"]


@pytest.mark.slow
def test_two_ranks_hash_their_shares_and_skip_a_damaged_checkpoint_together(
    corpus,  # noqa: F811
    tmp_path,
):
    one = tmp_path / "one"
    run_pretrain(cfg_of(corpus, one))
    ref = metrics(one)
    two = tmp_path / "two"
    run(corpus, two, "parallel.data=fsdp", "stop_at=7", nproc=2)
    step7 = two / "checkpoints" / "step-000007"
    state = json.loads((step7 / "state.json").read_text())
    files = sorted(p.name for p in step7.iterdir() if p.name != "state.json")
    assert sorted(state["sha256"]) == files and "__1_0.distcp" in files
    # the ranks hash every second file of .metadata, __0_0, __1_0: this one is rank 1's, and
    # rank 0 learns of it through the gathered hashes
    flip_a_byte(step7 / "__0_0.distcp")
    proc = run(corpus, two, "parallel.data=fsdp", nproc=2)
    assert f"skipping damaged checkpoint {step7}" in proc.stderr and "at step 5" in proc.stderr
    got = metrics(two)
    assert sorted(got) == list(range(1, 11))
    for step in got:
        assert abs(got[step] - ref[step]) < 1e-4, (step, got[step], ref[step])
