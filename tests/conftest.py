"""Shared fixtures. Real files only: ../shared/data (or $LLAMAFORGE_SHARED_DATA) for Meta's
tokenizer, and tokenizers trained here on the Python standard library."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from llamaforge.model import ModelArgs, Transformer, build_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLAMAFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
META_TOKENIZER = SHARED_DATA / "tokenizer" / "llama" / "tokenizer.model"


def json_objects(text: str) -> list[dict]:
    """Every JSON object printed in ``text`` (the stdout of several torchrun ranks, whose
    lines may interleave: two objects on one line, a line split by another rank's)."""
    import json

    decoder, out, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            out.append(obj)
        i = text.find("{", end)
    return out


def shared_file(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"{path} not found: set LLAMAFORGE_SHARED_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def meta_tokenizer_path() -> Path:
    return shared_file("tokenizer/llama/tokenizer.model")


@pytest.fixture(scope="session")
def small_tokenizer_path(tmp_path_factory) -> Path:
    """A 512-piece BPE tokenizer trained on the standard library's documentation."""
    from llamaforge.data.stdlib import docs_documents
    from llamaforge.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(docs_documents(max_bytes=300_000), out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def small_tokenizer(small_tokenizer_path):
    from llamaforge.tokenizer import Tokenizer

    return Tokenizer(small_tokenizer_path)


def tiny_args(vocab_size: int, **overrides: Any) -> ModelArgs:
    """The tests' tiny architecture: dim 64, 2 layers, 4 query and 2 key/value heads (GQA),
    SwiGLU hidden size a multiple of 32, a 64-token context; ``overrides`` replace any field
    (``n_kv_heads=None`` for MHA)."""
    fields: dict[str, Any] = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=64
    )
    return ModelArgs(**{**fields, "vocab_size": vocab_size, **overrides})


def tiny_model(
    vocab_size: int,
    *,
    seed: int = 0,
    norm_gains: bool = False,
    output_scale: float | None = None,
    **overrides: Any,
) -> Transformer:
    """A random ``tiny_args(vocab_size, **overrides)`` model in eval mode, built right after
    ``torch.manual_seed(seed)`` (the same weights each time). ``norm_gains`` draws the 1-D
    norm gains from U(0.5, 1.5), so that a swapped or mis-typed norm shows; ``output_scale``
    multiplies the classifier (25: a less flat distribution than the 0.02 init, so that
    greedy choices are not ties)."""
    torch.manual_seed(seed)
    model = build_model(tiny_args(vocab_size, **overrides)).eval()
    with torch.no_grad():
        if norm_gains:
            for p in model.parameters():
                if p.ndim == 1:
                    p.uniform_(0.5, 1.5)
        if output_scale is not None:
            model.output.weight.mul_(output_scale)
    return model


@pytest.fixture(scope="session")
def save_tiny(tmp_path_factory, small_tokenizer) -> Callable[..., Path]:
    """``save_tiny(**kwargs)``: ``tiny_model(small_tokenizer.vocab_size, **kwargs)`` saved
    with the small tokenizer as a native checkpoint, in a new directory each call."""
    from llamaforge.checkpoint.native import save

    def make(**kwargs: Any) -> Path:
        model = tiny_model(small_tokenizer.vocab_size, **kwargs)
        return save(model, small_tokenizer, tmp_path_factory.mktemp("tiny") / "ckpt")

    return make


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def next_argv(output: str) -> list[str]:
    """The argv of the last ``next: COMMAND`` line in a command's ``output``, as this checkout
    runs it: ``llamaforge`` is ``python -m llamaforge``, ``python`` this interpreter."""
    import shlex
    import sys

    lines = [ln for ln in output.splitlines() if ln.startswith("next: ")]
    assert lines, f"no 'next:' line in {output[-2000:]!r}"
    argv = shlex.split(lines[-1][len("next: ") :], comments=True)
    if argv[0] == "llamaforge":
        return [sys.executable, "-m", "llamaforge", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def run_next(output: str, *extra: str, input: str | None = None, cwd=None):
    """Run the last ``next:`` command of ``output`` (plus ``extra`` arguments) in a fresh
    process, as a user pastes it; returns the finished process after checking it exits 0."""
    import subprocess

    proc = subprocess.run(
        [*next_argv(output), *extra],
        input=input,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.args} → exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


WORDS = "the fox ran to a green tree and the dog sat by the red door while birds sang".split()


def story_corpus(root: Path, rows: int) -> Path:
    """``rows`` short stories over `WORDS`, prepared in ROOT/out with their own 300-piece
    tokenizer (10 % held out): a corpus tiny models learn in a few steps."""
    import json

    from llamaforge.data.prepare import load_data_config, prepare

    lines = []
    for i in range(rows):
        words = [WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(12 + i % 9)]
        lines.append(json.dumps({"text": f"Story {i}: " + " ".join(words) + "."}))
    (root / "stories.jsonl").write_text("\n".join(lines) + "\n")
    config = root / "data.toml"
    config.write_text(f"""
tokenizer = "{root / "out" / "tokenizer.model"}"
tokenizer_vocab_size = 300
output = "{root / "out"}"
val_fraction = 0.1
workers = 1
[[sources]]
name = "stories"
kind = "generic"
paths = ["{root / "stories.jsonl"}"]
""")
    prepare(load_data_config(config), progress=False, log=lambda s: None)
    return root / "out"
