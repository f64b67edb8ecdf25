import json

import pytest
import torch
from safetensors import safe_open

import llamaforge
from llamaforge.checkpoint.native import CheckpointError, load, save

from .conftest import tiny_model


@pytest.fixture()
def model(small_tokenizer):
    return tiny_model(small_tokenizer.vocab_size)


def _logits(m, n=20):
    torch.manual_seed(1)
    with torch.no_grad():
        return m(torch.randint(0, m.args.vocab_size, (2, n)))


def test_roundtrip_single_file(tmp_path, model, small_tokenizer):
    out = llamaforge.save(model, small_tokenizer, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors",
        "params.json",
        "tokenizer.model",
    ]
    params = json.loads((out / "params.json").read_text())
    assert params["dim"] == 64 and params["n_kv_heads"] == 2
    assert params["llamaforge"]["tokenizer_sha256"] == small_tokenizer.sha256()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "layers.1.feed_forward.w3.weight" in set(f.keys())
    loaded, tok = llamaforge.load(out)
    assert torch.equal(_logits(loaded), _logits(model))
    assert tok.encode("hello world") == small_tokenizer.encode("hello world")
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary directory left behind


def test_sharded_save_with_index(tmp_path, model, small_tokenizer):
    out = save(model, small_tokenizer, tmp_path / "ckpt", max_shard_size=60_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded, _ = load(out)
    assert torch.equal(_logits(loaded), _logits(model))
    (out / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        load(out)


def test_dtype_on_save_and_load(tmp_path, model, small_tokenizer):
    out = save(model, small_tokenizer, tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "params.json").read_text())["llamaforge"]["dtype"] == "bfloat16"
    loaded, _ = load(out)
    assert loaded.output.weight.dtype == torch.bfloat16
    loaded32, _ = load(out, dtype=torch.float32)
    assert loaded32.output.weight.dtype == torch.float32
    torch.testing.assert_close(loaded32.output.weight, model.output.weight, atol=1e-2, rtol=1e-2)


def test_existing_directory_is_refused_then_replaced(tmp_path, model, small_tokenizer):
    out = save(model, small_tokenizer, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="already exists"):
        save(model, small_tokenizer, out)
    with torch.no_grad():
        model.output.weight.add_(1.0)
    save(model, small_tokenizer, out, overwrite=True)
    assert torch.equal(load(out)[0].output.weight, model.output.weight)


def test_a_failed_save_leaves_the_good_checkpoint_untouched(tmp_path, model, small_tokenizer):
    out = save(model, small_tokenizer, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(TypeError):  # fails after the weights were written (params.json)
        save(model, small_tokenizer, out, overwrite=True, extra={"bad": object()})
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with torch.no_grad():
        model.output.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="tensor output.weight has non-finite"):
        save(model, small_tokenizer, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_load_errors_name_the_problem(tmp_path, model, small_tokenizer):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "nope")
    out = save(model, small_tokenizer, tmp_path / "ckpt")
    params = json.loads((out / "params.json").read_text())
    (out / "params.json").write_text(json.dumps({**params, "dim": 128}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor layers\.0\.attention\.\w+\.weight has shape .* implied by .*params\.json",
    ):
        load(out)
    n = params["n_layers"]
    (out / "params.json").write_text(json.dumps({**params, "n_layers": n - 1}))
    with pytest.raises(CheckpointError, match=rf"ckpt: unexpected tensor 'layers\.{n - 1}\."):
        load(out)
    (out / "params.json").write_text(json.dumps({**params, "n_layers": n + 1}))
    with pytest.raises(CheckpointError, match=rf"ckpt: missing \d+ tensor\(s\): layers\.{n}\."):
        load(out)
    (out / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(out)
    (out / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json: missing"):
        load(out)
    out2 = save(model, small_tokenizer, tmp_path / "c2")
    (out2 / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load(out2)


def test_vocab_minus_one_takes_the_tokenizer_size(tmp_path, model, small_tokenizer):
    out = save(model, small_tokenizer, tmp_path / "ckpt")
    params = json.loads((out / "params.json").read_text())
    (out / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    loaded, tok = load(out)
    assert loaded.args.vocab_size == tok.vocab_size == small_tokenizer.vocab_size


def test_loading_assigns_tensors_without_a_second_copy(tmp_path, model, small_tokenizer):
    out = save(model, small_tokenizer, tmp_path / "ckpt")
    loaded, _ = load(out)
    # every parameter is a real tensor (nothing left on meta), and no buffers exist to copy
    assert all(not p.is_meta for p in loaded.parameters())
    assert not list(loaded.buffers())
