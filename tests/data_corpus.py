"""A small multi-file corpus with cross-file duplicates, for the datatrove pipeline tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

WORDS = (
    "river stone forest light morning quiet garden window paper music winter summer road "
    "city harbor bridge market teacher student letter story island mountain valley cloud "
    "orange silver golden ancient modern simple careful gentle bright narrow wide"
).split()


def _sentence(rng: random.Random, n: int = 9) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def _paragraph(rng: random.Random, sentences: int = 6) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def build_corpus(root: Path) -> dict[str, Path]:
    """web/, code/, books/, stories/ under ``root``; duplicates span files (and so tasks)."""
    rng = random.Random(7)
    dirs = {k: root / k for k in ("web", "code", "books", "stories")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    boiler = "Subscribe to our newsletter for the latest river and stone news today."
    first_pages: list[str] = []
    for i in range(8):
        pages = []
        for j in range(6):
            lines = [_sentence(rng) for _ in range(6)]
            if j % 2 == 0:
                lines.insert(rng.randrange(len(lines)), boiler)  # a line repeated everywhere
            pages.append("\n".join(lines))
        if i == 5:
            pages.append(first_pages[1])  # a whole page of file 0 again
        if i == 0:
            first_pages = list(pages)
        (dirs["web"] / f"page{i:02d}.txt").write_text("\n\n".join(pages) + "\n")
    bodies = []
    for i in range(7):
        funcs = "\n\n".join(
            f"def {rng.choice(WORDS)}_{k}(x):\n    return x + {rng.randrange(100)}\n"
            for k in range(6)
        )
        body = f'# SPDX-License-Identifier: MIT\n"""Module {i}."""\n\n{funcs}'
        bodies.append(body)
    bodies[6] = bodies[1]  # an exact duplicate file in another task
    for i, body in enumerate(bodies):
        (dirs["code"] / f"mod{i:02d}.py").write_text(body)
    books = [" ".join(_paragraph(rng, 5) for _ in range(6)) for _ in range(5)]
    words = books[1].split()
    words[10:14] = ["changed", "words", "in", "copy"]  # a 99 % copy of book 1
    books.append(" ".join(words))
    for i, book in enumerate(books):
        (dirs["books"] / f"book{i:02d}.txt").write_text(book + "\n")
    for i in range(5):
        rows = [{"text": _paragraph(rng, 3)} for _ in range(40)]
        (dirs["stories"] / f"part{i:02d}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n"
        )
    return dirs


def write_config(
    root: Path, tokenizer: Path, out: Path, executor: str = "", only: tuple[str, ...] = ()
) -> Path:
    dirs = (
        build_corpus(root / "corpus")
        if not (root / "corpus").is_dir()
        else {k: root / "corpus" / k for k in ("web", "code", "books", "stories")}
    )
    config = root / f"data-{out.name}.toml"
    text = f"""
tokenizer = "{tokenizer}"
output = "{out}"
val_fraction = 0.2
shard_tokens = 700
[[sources]]
name = "web"
kind = "web"
paths = ["{dirs["web"]}"]
options = {{ quality = "c4", languages = [], c4_min_sentences = 3 }}
[[sources]]
name = "code"
kind = "code"
paths = ["{dirs["code"]}"]
[[sources]]
name = "books"
kind = "books"
paths = ["{dirs["books"]}"]
options = {{ min_words = 50 }}
[[sources]]
name = "stories"
kind = "generic"
paths = ["{dirs["stories"]}"]
weight = 2.0
"""
    if only:
        blocks = text.split("[[sources]]")
        text = blocks[0] + "".join(
            "[[sources]]" + b for b in blocks[1:] if any(f'name = "{n}"' in b for n in only)
        )
    config.write_text(text + executor + "\n")
    return config


def source_output(folder: Path) -> dict:
    """What must not depend on the number of tasks: documents and tokens of each split
    (the token streams themselves) and the filter counts."""
    meta = json.loads((folder / "meta.json").read_text())
    out: dict = {
        "clean": {
            k: meta["clean"][k]
            for k in ("documents_in", "documents_out", "bytes_in", "bytes_out", "removed")
        }
    }
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        s = meta["splits"][split]
        arrays = [np.fromfile(folder / sh["file"], dtype=dtype) for sh in s["shards"]]
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
        assert len(tokens) == s["tokens"]
        out[split] = (s["documents"], s["tokens"], tokens.tobytes())
    return out
