"""Bad inputs become clear one-line errors (issue 15): damaged (missing, truncated, or of the
same size with other content) or mismatched training checkpoints, out-of-vocabulary shards,
generate/decode arguments, non-finite native weights, and the CLI's error mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamaforge.cli.main import main
from llamaforge.config import ConfigError
from llamaforge.data.base import DataError
from llamaforge.data.mixture import open_sources
from llamaforge.inference.generate import generate_completions
from llamaforge.training.checkpointer import CheckpointerError, verify_checkpoint

from .conftest import tiny_model
from .test_data_mixture import make_prepared
from .test_trainer import trainer


def _saved(tmp_path, steps=(1, 2)):
    t = trainer(tmp_path / "run")
    for s in steps:
        t.step = s
        t.checkpointer.save(s, t.model, t.optimizer, {"step": s, "tokens": 0, "loader": {"i": 0}})
    return t


def test_resume_from_another_model_size_names_the_tensor_and_shapes(tmp_path):
    t = _saved(tmp_path, (1,))
    other = trainer(tmp_path / "run", "model.dim=48", "model.n_heads=3")
    with pytest.raises(
        ConfigError,
        match=r"tok_embeddings.weight has shape \(64, 32\) in the "
        r"checkpoint but \(64, 48\)",
    ):
        other.resume()
    assert t.checkpointer.latest() is not None


def _shard(ckpt):
    return max((p for p in ckpt.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)


def flip_a_byte(f):
    """Damage ``f`` without changing its size (a bad sector, a bit flip in transit)."""
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["missing", "truncated", "state", "flipped", "state edited"])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage, capsys):
    t = _saved(tmp_path)
    good, bad = (p for _, p in t.checkpointer.list())
    if damage == "missing":
        _shard(bad).unlink()
    elif damage == "truncated":
        f = _shard(bad)
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "flipped":  # the same size: only the content hash can tell
        flip_a_byte(_shard(bad))
    elif damage == "state edited":  # still valid JSON of the same size, another step
        state = bad / "state.json"
        state.write_text(state.read_text().replace('"step": 2', '"step": 3'))
    else:
        (bad / "state.json").write_text('{"step": 2, "tok')
    with pytest.raises(CheckpointerError, match=str(bad)):
        verify_checkpoint(bad)
    verify_checkpoint(good)
    fresh = trainer(tmp_path / "run")
    assert fresh.resume() == good
    assert fresh.step == 1
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and str(bad) in err
    # an explicit resume=PATH that is damaged is an error naming the file
    explicit = trainer(tmp_path / "run", f"resume={bad}")
    with pytest.raises(ConfigError, match=str(bad)):
        explicit.resume()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    t = _saved(tmp_path, (1,))
    (t.checkpointer.latest() / "state.json").write_text("not json")
    with pytest.raises(ConfigError, match="every checkpoint is damaged"):
        trainer(tmp_path / "run").resume()


def test_a_shard_with_token_ids_outside_the_vocabulary_is_named(tmp_path):
    root = make_prepared(tmp_path / "d", [("a", 3000, 1.0)])
    shard = root / "a" / "train-00001.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[17] = 60001  # meta.json's vocab_size is 60000; the file keeps its size
    tokens.tofile(shard)
    with pytest.raises(
        DataError,
        match=r"train-00001.bin: token id 60001 \(at position 17\) "
        r"is outside the vocabulary of 60000",
    ):
        open_sources(root)


def test_a_corrupt_meta_or_mixture_json_names_the_file(tmp_path):
    root = make_prepared(tmp_path / "d", [("a", 3000, 1.0)])
    (root / "a" / "meta.json").write_text('{"name": "a", "spl')
    with pytest.raises(DataError, match=r"a/meta.json: not valid JSON"):
        open_sources(root)
    (root / "mixture.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"mixture.json: expected a JSON object"):
        open_sources(root)


@pytest.fixture(scope="module")
def ckpt(save_tiny):
    return save_tiny()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "caf\udcff"], "--prompt: not valid UTF-8 (byte 0xff at character 3)"),
        (["--prompt", "x", "--temperature", "nan"], "--temperature nan: must be a finite"),
        (["--prompt", "x", "--temperature", "inf"], "--temperature inf: must be a finite"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0: must be a finite"),
        (["--prompt", "x", "--top-k", "0"], "--top-k 0: must be at least 1"),
        (["--prompt", "x", "--top-k", "-3"], "--top-k -3: must be at least 1"),
        (["--prompt", "x", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--prompt", "x", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
        (["--prompt", "x", "--top-p", "nan"], "--top-p nan: must be in (0, 1]"),
    ],
)
def test_generate_refuses_bad_prompts_and_sampling_settings(ckpt, capsys, flags, message):
    assert main(["generate", "--ckpt", str(ckpt), "--device", "cpu", *flags]) == 2
    out = capsys.readouterr()
    assert (
        out.err.startswith("llamaforge generate: error: ")
        and message in out.err
        and out.err.count("\n") == 1
        and out.out == ""
    )


def test_generate_names_a_prompt_file_that_is_not_utf8(ckpt, tmp_path, capsys):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"ok \xff\xfe")
    assert main(["generate", "--ckpt", str(ckpt), "--prompt-file", str(bad)]) == 2
    assert f"{bad}: not valid UTF-8 (byte 0xff at offset 3)" in capsys.readouterr().err


def test_generate_completions_checks_its_arguments(ckpt, small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size)
    for kw in ({"temperature": float("nan")}, {"top_k": 0}, {"top_p": 2.0}):
        with pytest.raises(ValueError, match="must be"):
            generate_completions(model, small_tokenizer, ["x"], **kw)
    with pytest.raises(ValueError, match="prompt 0: not valid UTF-8"):
        generate_completions(model, small_tokenizer, ["\udc80"])


def test_tokenizer_decode_refuses_negative_ids(small_tokenizer_path, capsys):
    assert main(["tokenizer", "decode", "--model", str(small_tokenizer_path), "5", "-1"]) == 2
    assert "ids [-1] are outside the vocabulary" in capsys.readouterr().err


@pytest.fixture(scope="module")
def nan_ckpt(save_tiny):
    """A native checkpoint whose layer-0 attention wq holds a NaN and whose norm an Inf
    (save refuses such weights, so the safetensors file is rewritten afterwards)."""
    from safetensors.torch import load_file, save_file

    out = save_tiny()
    (f,) = out.glob("*.safetensors")
    tensors = load_file(f)
    tensors["layers.0.attention.wq.weight"][0, 0] = float("nan")
    tensors["norm.weight"][1] = float("inf")
    save_file(tensors, f, metadata={"format": "pt"})
    return out


def test_non_finite_native_weights_warn_on_load_and_strict_refuses(nan_ckpt, capsys):
    from llamaforge.checkpoint.native import CheckpointError, load

    load(nan_ckpt)
    err = capsys.readouterr().err
    assert "2 tensor(s) with NaN or Inf values" in err
    assert "layers.0.attention.wq.weight" in err and "norm.weight" in err
    with pytest.raises(CheckpointError, match="NaN or Inf.*refused: strict"):
        load(nan_ckpt, strict=True)


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "eval"])
def test_strict_commands_refuse_non_finite_weights(nan_ckpt, capsys, command, tmp_path):
    # eval gets a local one-question task, so neither ../shared nor the network is needed
    data = tmp_path / "eval"
    (data / "boolq").mkdir(parents=True)
    row = {"query": "Passage: x\nQuestion: y?\nAnswer:", "choices": ["no", "yes"], "gold": 1}
    (data / "boolq" / "boolq.jsonl").write_text(json.dumps(row) + "\n")
    eval_args = ["--tasks", "boolq", "--data-dir", str(data)]
    extra = {"generate": ["--prompt", "x"], "chat": [], "serve": [], "eval": eval_args}[command]
    argv = [command, "--ckpt", str(nan_ckpt), "--device", "cpu", "--strict", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "refused: strict" in err


def test_generate_from_non_finite_weights_says_so(nan_ckpt, capsys):
    argv = ["generate", "--ckpt", str(nan_ckpt), "--prompt", "x", "--max-new-tokens", "2"]
    assert main([*argv, "--device", "cpu", "--seed", "0"]) == 2
    out = capsys.readouterr()
    assert "NaN or Inf values" in out.err and "logits at position" in out.err
    assert "no text can be generated" in out.err


def _failing(monkeypatch, module, handler, exc_factory):
    def boom(a):
        raise exc_factory()

    monkeypatch.setattr(module, handler, boom)


def test_cli_reports_a_full_disk_with_its_path(monkeypatch, capsys):
    import errno

    from llamaforge.cli import tokenizer as tokenizer_cli
    from llamaforge.cli import train as train_cli

    def enospc():
        return OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")

    _failing(monkeypatch, tokenizer_cli, "_decode", enospc)
    assert main(["tokenizer", "decode", "--model", "m", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "llamaforge tokenizer decode: error: no space left on device: /data/out/model.safetensors\n"
    )
    _failing(monkeypatch, train_cli, "_quickstart", enospc)  # a training command: exit 1
    assert main(["quickstart"]) == 1
    assert "no space left on device: /data/out" in capsys.readouterr().err


def test_cli_reports_library_errors_in_one_line_and_debug_shows_the_traceback(
    monkeypatch, capsys, tmp_path
):
    import sentencepiece

    from llamaforge.cli import tokenizer as tokenizer_cli

    missing = str(tmp_path / "nope.model")
    _failing(
        monkeypatch,
        tokenizer_cli,
        "_decode",
        lambda: sentencepiece.SentencePieceProcessor(model_file=missing),
    )
    monkeypatch.delenv("LLAMAFORGE_DEBUG", raising=False)
    assert main(["tokenizer", "decode", "--model", "m", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamaforge tokenizer decode: error: RuntimeError: ")
    assert missing in err and err.count("\n") == 1
    assert main(["--debug", "tokenizer", "decode", "--model", "m", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "sentencepiece" in err
    assert err.splitlines()[-1].startswith("llamaforge tokenizer decode: error: RuntimeError")
    monkeypatch.setenv("LLAMAFORGE_DEBUG", "1")
    assert main(["tokenizer", "decode", "--model", "m", "1"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_cli_reports_a_dcp_checkpoint_exception(monkeypatch, capsys):
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from llamaforge.cli import train as train_cli

    inner = OSError(
        errno.ENOSPC, "No space left on device", "/runs/x/.step-000002.tmp/__0_0.distcp"
    )
    _failing(
        monkeypatch,
        train_cli,
        "_quickstart",
        lambda: CheckpointException("save", {0: (inner, None)}),
    )
    assert main(["quickstart"]) == 1
    assert capsys.readouterr().err == (
        "llamaforge quickstart: error: distributed checkpoint failed on rank 0: no space left "
        "on device: /runs/x/.step-000002.tmp/__0_0.distcp\n"
    )


def test_cli_keeps_interrupts_exit_codes_and_real_bugs(monkeypatch, capsys):
    from llamaforge.cli import tokenizer as tokenizer_cli

    _failing(monkeypatch, tokenizer_cli, "_decode", KeyboardInterrupt)
    assert main(["tokenizer", "decode", "--model", "m", "1"]) == 130
    _failing(monkeypatch, tokenizer_cli, "_decode", lambda: CheckpointerError("bad ckpt"))
    assert main(["tokenizer", "decode", "--model", "m", "1"]) == 1
    _failing(monkeypatch, tokenizer_cli, "_decode", lambda: RuntimeError("our own bug"))
    with pytest.raises(RuntimeError, match="our own bug"):  # not a library's: a traceback
        main(["tokenizer", "decode", "--model", "m", "1"])
