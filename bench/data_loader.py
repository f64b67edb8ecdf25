"""Loader throughput: tokens/s that MixtureLoader delivers from memory-mapped shards on one
core, for a three-source mixture (synthetic tokens written in the prepared-data format).

    python bench/data_loader.py --tokens 30_000_000 --seq-len 2048 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llamaforge.data.mixture import MixtureLoader, MixtureSampler, open_sources


def write_source(root: Path, name: str, n: int, weight: float) -> dict:
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for k, start in enumerate(range(0, n, 10_000_000)):
        part = rng.integers(0, 32000, min(10_000_000, n - start), dtype=np.uint16)
        part.tofile(d / f"train-{k:05d}.bin")
        shards.append({"file": f"train-{k:05d}.bin", "tokens": len(part)})
    meta = {
        "name": name,
        "kind": "generic",
        "weight": weight,
        "tokenizer": "",
        "dtype": "uint16",
        "tokenizer_sha256": "",
        "vocab_size": 32000,
        "bos": True,
        "eos": True,
        "bos_id": 1,
        "eos_id": 2,
        "complete": True,
        "clean": {"bytes_out": 0},
        "splits": {
            "train": {"tokens": n, "documents": 1, "shards": shards},
            "val": {"tokens": 0, "documents": 0, "shards": []},
        },
    }
    (d / "meta.json").write_text(json.dumps(meta))
    return {"name": name, "weight": weight}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=30_000_000, help="total tokens on disk")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    if os.environ.get("PROFILE"):
        import cProfile

        cProfile.runctx("run(a)", globals(), {"run": run, "a": a}, sort="tottime")
        return
    run(a)


def run(a) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        split = [(0.67, "web"), (0.18, "books"), (0.15, "wiki")]
        entries = [write_source(root, n, int(a.tokens * f), f * 100) for f, n in split]
        (root / "mixture.json").write_text(json.dumps({"sources": entries}))
        sources, weights = open_sources(root)
        loader = MixtureLoader(MixtureSampler(sources, weights, a.seq_len), a.batch)
        next(loader)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            x, _ = next(loader)
            n += x.numel()
        dt = time.perf_counter() - t0
        # peer: nanoGPT's get_batch (random offsets into one memmap, with replacement)
        data = np.memmap(root / "web" / "train-00000.bin", dtype=np.uint16, mode="r")
        m, t1 = 0, time.perf_counter()
        while time.perf_counter() - t1 < a.seconds:
            ix = torch.randint(len(data) - a.seq_len - 1, (a.batch,))
            x = torch.stack(
                [torch.from_numpy(data[i : i + a.seq_len].astype(np.int64)) for i in ix]
            )
            torch.stack(
                [torch.from_numpy(data[i + 1 : i + 1 + a.seq_len].astype(np.int64)) for i in ix]
            )
            m += x.numel()
        dt_peer = time.perf_counter() - t1
    print(
        f"# {platform.machine()}, 1 thread, torch {torch.__version__}, numpy {np.__version__}, "
        f"{platform.processor() or 'cpu'}"
    )
    print(
        f"seq_len {a.seq_len}, batch {a.batch}: {n / dt / 1e6:.1f}M tokens/s "
        f"({n / dt / a.seq_len / a.batch:.0f} batches/s); nanoGPT get_batch "
        f"{m / dt_peer / 1e6:.1f}M tokens/s; ratio {(n / dt) / (m / dt_peer):.2f}x"
    )


if __name__ == "__main__":
    main()
