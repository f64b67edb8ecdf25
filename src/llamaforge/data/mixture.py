"""The Table 1 mixture: fixed windows from several token sources in set proportions.

Each source's training tokens (all its shards, memory-mapped, read as one array) are cut
into windows of ``seq_len + 1`` tokens that overlap by one (window i starts at i·seq_len),
so documents are packed across their boundaries and every token is a target once per epoch.

* **Which source.** The global sample sequence takes, at each index, the source furthest
  below its share (``weight·(g+1) − drawn``, ties to the first): proportions are exact to
  within one sample at every point, and depend on nothing but the weights.
* **Which window.** The k-th draw from a source is position ``k mod n`` of epoch
  ``k div n`` of that source, mapped through a seeded pseudo-random permutation of its n
  windows (a Feistel network: O(1) memory, any n). Within an epoch no window repeats; each
  new epoch is a fresh permutation — exactly what the epochs column of Table 1 implies.
* **Distributed.** Global batch b holds samples ``[b·B, (b+1)·B)``; rank r of w reads its
  contiguous ``B/w`` of them. The state — the global sample index and the per-source draw
  counts — is a few integers, the same on every rank, so a run resumes with the next batch
  on any number of ranks without repeating or skipping data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamaforge.data.base import DataError
from llamaforge.data.shards import META_FILE, MIXTURE_FILE, check_meta, check_token_ids, read_meta
from llamaforge.files import read_json_object

_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64-style hash of uint64 ``x`` with ``key`` (vectorised, wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64((key * 0x9E3779B97F4A7C15) & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A bijection of [0, n) applied to ``index``: a balanced Feistel network on the
    smallest even power of two ≥ n, cycle-walking values that fall outside [0, n)."""
    if n <= 1:
        return np.zeros_like(index, dtype=np.int64)
    bits = max(2, (int(n - 1).bit_length() + 1) // 2 * 2)
    half = bits // 2
    lo_mask = np.uint64((1 << half) - 1)
    x = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    out = np.empty(x.shape, dtype=np.uint64)
    while todo.any():
        v = x[todo]
        left, right = v >> np.uint64(half), v & lo_mask
        for r in range(rounds):
            left, right = right, left ^ (_mix(right, key * 31 + r) & lo_mask)
        v = (left << np.uint64(half)) | right
        inside = v < np.uint64(n)
        idx = np.flatnonzero(todo)
        out[idx[inside]] = v[inside]
        x[idx[~inside]] = v[~inside]  # cycle-walk: permute again until inside [0, n)
        todo[idx[inside]] = False
    return out.astype(np.int64)


def _mix_int(x: int, key: int) -> int:
    z = (x + key * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def permute_one(i: int, n: int, key: int, rounds: int = 4) -> int:
    """``permute`` for one index, in plain integers (faster than numpy for a few)."""
    if n <= 1:
        return 0
    bits = max(2, (int(n - 1).bit_length() + 1) // 2 * 2)
    half = bits // 2
    lo_mask = (1 << half) - 1
    v = i
    while True:
        left, right = v >> half, v & lo_mask
        for r in range(rounds):
            left, right = right, left ^ (_mix_int(right, key * 31 + r) & lo_mask)
        v = (left << half) | right
        if v < n:
            return v


class TokenSource:
    """One source's split as a single memory-mapped token array."""

    def __init__(self, directory: Path, split: str = "train") -> None:
        meta = read_meta(directory)
        if meta is None:
            raise DataError(f"{directory}: no {META_FILE}; run `llamaforge data prepare` first")
        check_meta(meta, directory / META_FILE)
        self.meta = meta
        self.name = self.meta["name"]
        dtype = np.dtype(self.meta["dtype"])
        self.arrays = []
        for shard in self.meta["splits"][split]["shards"]:
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(
                    f"{path}: missing or of the wrong size (expected "
                    f"{shard['tokens']} {dtype.name} tokens)"
                )
            tokens = np.memmap(path, dtype=dtype, mode="r")
            check_token_ids(tokens, int(self.meta["vocab_size"]), path)
            self.arrays.append(tokens)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.tokens = int(self.offsets[-1])

    def n_windows(self, seq_len: int) -> int:
        return max(0, (self.tokens - 1) // seq_len)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length), across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        while filled < length:
            i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            local = pos - int(self.offsets[i])
            take = min(length - filled, len(self.arrays[i]) - local)
            out[filled : filled + take] = self.arrays[i][local : local + take]
            filled += take
            pos += take
        return out


@dataclass
class LoaderState:
    sample: int = 0  # global samples consumed
    drawn: list[int] | None = None  # per source


def open_sources(
    data_dir: str | Path,
    split: str = "train",
    tokenizer_sha256: str | None = None,
    names: list[str] | None = None,
) -> tuple[list[TokenSource], list[float]]:
    """The sources of a prepared folder (its mixture.json), with their weights; a
    tokenizer other than the one the shards were built with is an error."""
    root = Path(data_dir)
    mixture = root / MIXTURE_FILE
    if not mixture.is_file():
        raise DataError(f"{root}: no {MIXTURE_FILE}; run `llamaforge data prepare` first")
    entries = read_json_object(mixture, DataError).get("sources")
    if not isinstance(entries, list):
        raise DataError(f"{mixture}: no 'sources' list")
    if names is not None:
        entries = [e for e in entries if e["name"] in names]
    sources, weights = [], []
    for e in entries:
        src = TokenSource(root / e["name"], split)
        if tokenizer_sha256 and src.meta["tokenizer_sha256"] != tokenizer_sha256:
            raise DataError(
                f"{root / e['name']}: shards were built with tokenizer "
                f"{src.meta['tokenizer_sha256'][:12]}…, not the one given "
                f"({tokenizer_sha256[:12]}…); prepare the data again with this tokenizer"
            )
        sources.append(src)
        weights.append(float(e["weight"]))
    if not sources:
        raise DataError(f"{root}: no prepared sources")
    return sources, weights


class MixtureSampler:
    """Deterministic, resumable windows from several sources in fixed proportions."""

    def __init__(
        self, sources: list[TokenSource], weights: list[float], seq_len: int, seed: int = 0
    ) -> None:
        usable = [(s, w) for s, w in zip(sources, weights) if w > 0]
        for s, _ in usable:
            if s.n_windows(seq_len) == 0:
                raise DataError(
                    f"source {s.name}: {s.tokens} tokens, fewer than one window of {seq_len + 1}"
                )
        if not usable:
            raise DataError("every source has weight 0")
        self.sources = [s for s, _ in usable]
        total = sum(w for _, w in usable)
        self.weights = np.array([w / total for _, w in usable])
        self.seq_len, self.seed = seq_len, seed
        self.windows = [s.n_windows(seq_len) for s in self.sources]
        self.state = LoaderState(0, [0] * len(self.sources))

    def plan(self, count: int) -> list[tuple[int, int]]:
        """(source, window) of the next ``count`` global samples; advances the state."""
        drawn = self.state.drawn
        weights = self.weights.tolist()
        choice, draw = [], []
        g = self.state.sample
        for _ in range(count):  # the source furthest below its share; ties to the first
            g += 1
            s = max(range(len(weights)), key=lambda i: weights[i] * g - drawn[i])
            choice.append(s)
            draw.append(drawn[s])
            drawn[s] += 1
        self.state.sample = g
        windows = []
        for s, k in zip(choice, draw):
            epoch, pos = divmod(k, self.windows[s])
            key = (self.seed * 1_000_003 + s) * 1_000_003 + epoch
            windows.append(permute_one(pos, self.windows[s], key))
        return list(zip(choice, windows))

    def fetch(self, plan: list[tuple[int, int]]) -> np.ndarray:
        rows = np.empty((len(plan), self.seq_len + 1), dtype=np.int64)
        for i, (s, w) in enumerate(plan):
            rows[i] = self.sources[s].read(w * self.seq_len, self.seq_len + 1)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {
            "sample": self.state.sample,
            "drawn": list(self.state.drawn),
            "sources": [s.name for s in self.sources],
            "seed": self.seed,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sources") != [s.name for s in self.sources]:
            raise DataError(
                f"loader state is for sources {state.get('sources')}, not "
                f"{[s.name for s in self.sources]}"
            )
        if state.get("seq_len") != self.seq_len or state.get("seed") != self.seed:
            raise DataError("loader state has another seq_len or seed")
        self.state = LoaderState(int(state["sample"]), [int(x) for x in state["drawn"]])

    def epochs(self) -> dict[str, float]:
        """Epochs drawn so far, per source."""
        return {s.name: d / n for s, d, n in zip(self.sources, self.state.drawn, self.windows)}


class MixtureLoader:
    """Batches of (inputs, targets) for one rank: ``global_batch`` samples per step, of
    which this rank reads the ``rank``-th contiguous ``global_batch / world_size``."""

    def __init__(
        self,
        sampler: MixtureSampler,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.sampler, self.global_batch = sampler, global_batch
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.sampler.plan(self.global_batch)
        local = self.global_batch // self.world_size
        rows = torch.from_numpy(
            self.sampler.fetch(plan[self.rank * local : (self.rank + 1) * local])
        )
        if self.device.type == "cuda":
            rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def validation_batches(
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    tokenizer_sha256: str | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: the first windows of each source's held-out split, in
    proportion to the weights (sources with too few held-out tokens are left out)."""
    sources, weights = open_sources(data_dir, "val", tokenizer_sha256)
    keep = [(s, w) for s, w in zip(sources, weights) if s.n_windows(seq_len) > 0 and w > 0]
    if not keep:
        return []
    total = sum(w for _, w in keep)
    want = max_batches * batch_size
    rows = []
    for s, w in keep:
        n = min(s.n_windows(seq_len), max(1, round(want * w / total)))
        rows += [s.read(i * seq_len, seq_len + 1) for i in range(n)]
    rows_t = torch.from_numpy(np.stack(rows[:want]))
    return [(b[:, :-1], b[:, 1:]) for b in rows_t.split(batch_size)]
