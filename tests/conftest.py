"""Shared fixtures. Real files only: ../shared/data (or $LLAMAFORGE_SHARED_DATA) for Meta's
tokenizer, and tokenizers trained here on the Python standard library."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
