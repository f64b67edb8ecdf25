"""The command line, run as a user runs it: real subprocesses."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def run(*args, input=None, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "llamaforge", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_info_7b():
    out = run("info", "--preset", "7B").stdout
    assert "6,738,415,616" in out and "11008" in out
    info = json.loads(run("info", "--preset", "65B", "--json").stdout)
    assert info["params"]["total"] == 65_285_660_672
    n = info["params"]["non_embedding"]
    assert info["flops_per_token"] == 6 * n + 12 * 80 * 8192 * 2048
    assert info["memory_bytes"]["training_total"] == 16 * 65_285_660_672


def test_init_generate_and_info_from_ckpt(tmp_path, small_tokenizer_path):
    ckpt = tmp_path / "ckpt"
    run(
        "init",
        "--preset",
        "1M",
        "--tokenizer",
        small_tokenizer_path,
        "--out",
        ckpt,
        "max_seq_len=64",
    )
    assert json.loads(run("info", "--ckpt", ckpt, "--json").stdout)["args"]["vocab_size"] == 512
    r = run(
        "generate",
        "--ckpt",
        ckpt,
        "--prompt",
        "The",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--seed",
        "1",
    )
    assert r.stdout.strip()  # streamed text
    r2 = run(
        "generate",
        "--ckpt",
        ckpt,
        "--prompt",
        "The",
        "--prompt",
        "def x",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.7",
        "--seed",
        "1",
    )
    assert r2.stdout.count("=== ") == 2
    again = run(
        "init", "--preset", "1M", "--tokenizer", small_tokenizer_path, "--out", ckpt, check=False
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    long = run("generate", "--ckpt", ckpt, "--prompt", "word " * 200, check=False)
    assert long.returncode == 2 and "context is 64" in long.stderr


def test_tokenizer_commands(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(2000))
    )
    model = tmp_path / "t.model"
    run("tokenizer", "train", corpus, "--out", model, "--vocab-size", "300")
    ids = run("tokenizer", "encode", "--model", model, "the lazy dog 42").stdout.split()
    assert run("tokenizer", "decode", "--model", model, *ids).stdout.strip() == "the lazy dog 42"
    piped = run("tokenizer", "encode", "--model", model, "--bos", input="fox").stdout.split()
    assert piped[0] == "1"
    pieces = run("tokenizer", "encode", "--model", model, "--pieces", "42").stdout
    assert ":4" in pieces and ":2" in pieces  # digits are split


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--ckpt", "/nonexistent", "--prompt", "x"], "no such checkpoint"),
        (["tokenizer", "encode", "--model", "/nonexistent.model", "x"], "nonexistent.model"),
        (["info", "--preset", "7.5B"], "unknown model preset"),
    ],
)
def test_errors_exit_nonzero_with_a_clear_message(args, needle):
    r = run(*args, check=False)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_with_metas_tokenizer(tmp_path, meta_tokenizer_path):
    ids = run("tokenizer", "encode", "--model", meta_tokenizer_path, "Hello world").stdout
    assert ids.split() == ["15043", "3186"]
    assert run("tokenizer", "decode", "--model", meta_tokenizer_path, "15043", "3186").stdout == (
        "Hello world\n"
    )
    ckpt = tmp_path / "meta-vocab"
    run(
        "init",
        "--preset",
        "1M",
        "--tokenizer",
        meta_tokenizer_path,
        "--out",
        ckpt,
        "max_seq_len=32",
        "--dtype",
        "bfloat16",
    )
    info = json.loads(run("info", "--ckpt", ckpt, "--json").stdout)
    assert info["args"]["vocab_size"] == 32000
    r = run(
        "generate",
        "--ckpt",
        ckpt,
        "--prompt",
        "Hello",
        "--prompt",
        "The llama",
        "--max-new-tokens",
        "4",
        "--seed",
        "0",
    )
    assert r.stdout.count("=== ") == 2
