"""One model's batched forward over a paged KV cache: the seam of the serving engine that a
compiled decode step or a tensor-parallel runner replaces.

Rows are given as token lists (prefill: each row a chunk at its own start) or a (rows, s)
tensor (decode: each row's pending token, or its pending token and a draft's proposals, at
consecutive positions), with each row's block table. The runner turns positions into the
flat slot of each new token and a per-row mask over the row's gathered blocks, binds them
to the `PagedKVCache` and calls the model with explicit rotary positions; padding positions
of short prefill rows write to the cache's scratch block and are masked out.

`CompiledRunner` runs the decode forward through ``torch.compile`` (CUDA graphs on a GPU)
with static shapes: the rows are padded up to a batch bucket (1, 2, 4, … up to
``max_batch``) and the block tables up to a width bucket (``min_blocks`` times a power of
two, at most the longest table a request can hold: at most four widths), so the number of
compiled graphs is bounded by the buckets and no step recompiles. Padding rows start at
position 0 with a table of scratch blocks: they write to the scratch block and their
outputs are dropped. The host sends each step one small integer tensor (each row's start
and block table); the new tokens' slots, the rotary positions and the mask are computed
inside the compiled graph. Prefill stays eager (its shapes vary with the prompts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from llamaforge.model import Transformer
from llamaforge.serve.kv_cache import PagedKVCache, blocks_for

if TYPE_CHECKING:
    from llamaforge.serve.adapters import AdapterBatch

__all__ = ["CompiledRunner", "ModelRunner", "batch_buckets", "make_runner", "paged_inputs"]


def paged_inputs(
    table: torch.Tensor, pos: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows with block tables ``table`` (rows, blocks) and new tokens at positions
    ``pos`` (rows, s): each new token's flat slot (rows, s) and the (rows, 1, s, keys) mask
    over the rows' gathered blocks (each query sees its row's keys up to its own
    position)."""
    slots = table.gather(1, pos // block_size) * block_size + pos % block_size
    keys = torch.arange(table.shape[1] * block_size, device=pos.device)
    return slots, (keys[None, None, :] <= pos[:, :, None])[:, None]


def _decode_step(
    model: Transformer, cache: PagedKVCache, tokens: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Logits (n, s, vocab) of ``tokens`` (n, s); ``rows`` (n, 1 + blocks) holds each row's
    first position, then its block table. The step `CompiledRunner` compiles."""
    start, table = rows[:, 0], rows[:, 1:]
    pos = start[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
    slots, mask = paged_inputs(table, pos, cache.block_size)
    cache.bind(table, slots.reshape(-1))
    return model(tokens, 0, mask=mask, positions=pos, cache=cache)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes compiled for: powers of two below ``max_batch``, then ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch}: must be at least 1")
    out = [1]
    while out[-1] * 2 < max_batch:
        out.append(out[-1] * 2)
    return out + [max_batch] if out[-1] != max_batch else out


def _bucket(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


class ModelRunner:
    """``model``'s forward over ``cache`` for rows given by block tables."""

    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        self.model, self.cache = model, cache
        self.device = model.tok_embeddings.weight.device
        # LoRA adapters served per row (serve.adapters): each forward binds its rows' slots
        self.lora: AdapterBatch | None = None

    def prefill(
        self,
        chunks: list[list[int]],
        starts: list[int],
        tables: list[list[int]],
        keep_all: list[bool] | None = None,
        logits: bool = True,
        adapters: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """Run every row's chunk (``chunks[i]`` at positions ``starts[i]…``) in one forward,
        rows padded to the longest; each row's logits, (its chunk's length, vocab) where
        ``keep_all[i]`` else (1, vocab) for its last token, or nothing when not ``logits``
        (a draft only filling its cache). ``adapters``: each row's LoRA slot (-1: none)."""
        n, s = len(chunks), max(len(c) for c in chunks)
        tokens = torch.zeros(n, s, dtype=torch.long)
        pos = torch.zeros(n, s, dtype=torch.long)
        valid = torch.zeros(n, s, dtype=torch.bool)
        keep = torch.zeros(n, s, dtype=torch.bool)
        for i, (chunk, start) in enumerate(zip(chunks, starts)):
            m = len(chunk)
            tokens[i, :m] = torch.tensor(chunk)
            pos[i, :m] = torch.arange(start, start + m)
            valid[i, :m] = True
            if keep_all is not None and keep_all[i]:
                keep[i, :m] = True
            else:
                keep[i, m - 1] = True
        top = max(st + len(c) for st, c in zip(starts, chunks))
        dev = self.device
        tokens, pos, valid = tokens.to(dev), pos.to(dev), valid.to(dev)
        cache, bs = self.cache, self.cache.block_size
        table = self._table(tables, blocks_for(top, bs), len(tables))
        slots, mask = paged_inputs(table, pos, bs)
        cache.bind(table, torch.where(valid, slots, cache.scratch * bs).reshape(-1))
        if self.lora is not None:
            self.lora.bind(adapters, keep if logits else None)
        if not logits:
            self.model(tokens, 0, mask=mask, positions=pos, cache=cache, return_hidden=True)
            return []
        out = self.model(tokens, 0, mask=mask, positions=pos, cache=cache, only=keep.to(dev))
        return list(out.float().split(keep.sum(dim=1).tolist()))

    def decode(
        self,
        tokens: torch.Tensor,
        starts: list[int],
        tables: list[list[int]],
        adapters: list[int] | None = None,
    ) -> torch.Tensor:
        """Logits (rows, s, vocab) of ``tokens`` (rows, s), row i's at positions
        ``starts[i]…``, each attending to its row's cache up to its own position;
        ``adapters``: each row's LoRA slot (-1: none)."""
        width = blocks_for(max(starts) + tokens.shape[1], self.cache.block_size)
        rows = self._rows(starts, tables, width, len(starts))
        if self.lora is not None:
            self.lora.bind(adapters)
        return _decode_step(self.model, self.cache, tokens, rows)

    def _table(self, tables: list[list[int]], width: int, n: int) -> torch.Tensor:
        """The (n, width) block ids of ``tables`` on the device: each cut or padded with the
        scratch block to ``width``, then rows of scratch blocks up to ``n``."""
        scratch = self.cache.scratch
        padded = [t[:width] + [scratch] * (width - len(t[:width])) for t in tables]
        padded += [[scratch] * width] * (n - len(tables))
        return torch.tensor(padded, dtype=torch.long).to(self.device, non_blocking=True)

    def _rows(self, starts: list[int], tables: list[list[int]], width: int, n: int) -> torch.Tensor:
        """`_decode_step`'s ``rows`` (n, 1 + width): each row's start, then its table cut or
        padded to ``width``; padding rows start at 0 over scratch blocks. One transfer."""
        scratch = self.cache.scratch
        rows = [
            [s, *t[:width]] + [scratch] * (width - len(t[:width])) for s, t in zip(starts, tables)
        ]
        rows += [[0] + [scratch] * width] * (n - len(rows))
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)


class CompiledRunner(ModelRunner):
    """A `ModelRunner` whose decode forward is compiled: ``torch.compile`` on the CPU, CUDA
    graphs (``mode="reduce-overhead"``, one graph per shape) on a GPU. Shapes are bucketed
    (see the module's docstring): rows up to `batch_buckets` (``max_batch``), block tables
    up to ``min_blocks`` times a power of two, at most ``max_blocks`` (the longest table a
    request holds). The default ``min_blocks``, an eighth of ``max_blocks``, makes at most
    four widths; ``min_blocks`` = ``max_blocks`` makes one, the whole table, which costs
    attention over every position a request may reach at every step (measured on the CPU,
    bench/serve_engine_step.py, 15M model, 512-position context, 80-position requests: 2.2x
    eager's time per step at 8 rows, 3x at 32, against 0.9x and 1.0x with widths by powers
    of two). Each bucket compiles on first use, or in `warm_up`."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        *,
        max_batch: int,
        max_blocks: int,
        min_blocks: int | None = None,
    ) -> None:
        super().__init__(model, cache)
        if max_blocks < 1:
            raise ValueError(f"max_blocks {max_blocks}: must be at least 1")
        self.batches = batch_buckets(max_batch)
        self.max_blocks = max_blocks
        self.min_blocks = min(min_blocks or blocks_for(max_blocks, 8), max_blocks)
        if self.min_blocks < 1:
            raise ValueError(f"min_blocks {min_blocks}: must be at least 1")
        self.graphs = self.device.type == "cuda"
        if self.graphs:  # CUDA graphs write the pool in place: its address must not move
            for t in (cache.k, cache.v):
                torch._dynamo.mark_static_address(t)
        _allow_graphs(len(self.batches) * len(self.widths) * 2)
        self._step: Callable[..., torch.Tensor] = torch.compile(
            _decode_step,
            mode="reduce-overhead" if self.graphs else None,
            fullgraph=True,
            dynamic=False,
        )
        self.shapes: set[tuple[int, int, int]] = set()  # (rows, s, blocks) run so far

    @property
    def widths(self) -> list[int]:
        """The block-table widths compiled for."""
        out = [self.min_blocks]
        while out[-1] < self.max_blocks:
            out.append(min(out[-1] * 2, self.max_blocks))
        return out

    def bucket(self, rows: int, blocks: int) -> tuple[int, int]:
        """The (rows, blocks) shape a step of ``rows`` rows needing ``blocks`` runs at."""
        if rows > self.batches[-1] or blocks > self.max_blocks:
            raise ValueError(
                f"a decode step of {rows} rows over {blocks} blocks: the compiled runner "
                f"takes at most {self.batches[-1]} rows and {self.max_blocks} blocks"
            )
        return _bucket(rows, self.batches), _bucket(blocks, self.widths)

    def decode(
        self,
        tokens: torch.Tensor,
        starts: list[int],
        tables: list[list[int]],
        adapters: list[int] | None = None,
    ) -> torch.Tensor:
        if self.lora is not None:  # the engine refuses compile with adapters
            raise ValueError("a compiled decode step serves no LoRA adapters")
        n, s = tokens.shape
        need = blocks_for(max(starts) + s, self.cache.block_size)
        batch, width = self.bucket(n, need)
        rows = self._rows(starts, tables, width, batch)
        if batch > n:
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, batch - n))
        return self._run(tokens, rows)[:n]

    def _run(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.shapes.add((tokens.shape[0], tokens.shape[1], rows.shape[1] - 1))
        if self.graphs:  # a replay overwrites the last one's outputs: copy them out
            torch.compiler.cudagraph_mark_step_begin()
            return self._step(self.model, self.cache, tokens, rows).clone()
        return self._step(self.model, self.cache, tokens, rows)

    @torch.inference_mode()
    def warm_up(self, steps: Iterable[tuple[int, int]] | None = None) -> float:
        """Compile the bucket of every step in ``steps``, (rows, tokens per row) pairs
        (default: 1 to ``max_batch`` rows of one token, plain decoding; a draft's k + 1
        tokens verify its proposals), at every width, running padding rows only (they write
        to the scratch block); the seconds it took."""
        t0 = time.perf_counter()
        steps = steps if steps is not None else ((n, 1) for n in self.batches)
        shapes = {(_bucket(n, self.batches), s) for n, s in steps}
        for batch, s in sorted(shapes):
            for width in self.widths:
                tokens = torch.zeros(batch, s, dtype=torch.long, device=self.device)
                self._run(tokens, self._rows([], [], width, batch))
        if self.graphs:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


_GRAPHS = [0]  # graphs the compiled runners made so far may need, all together


def _allow_graphs(n: int) -> None:
    """Dynamo keeps at most ``recompile_limit`` graphs per function (8 by default), shared
    by every runner (the model's and a draft's), and then runs it eagerly: raise the limit
    so that every bucket of every runner has its graph."""
    _GRAPHS[0] += n
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, _GRAPHS[0])
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, _GRAPHS[0])


def make_runner(
    model: Transformer,
    cache: PagedKVCache,
    *,
    compile: bool = False,
    max_batch: int = 1,
    max_blocks: int = 1,
) -> ModelRunner:
    """The engine's runner for ``model`` over ``cache``: eager, or with ``compile`` a
    `CompiledRunner` for up to ``max_batch`` rows of up to ``max_blocks`` blocks."""
    if not compile:
        return ModelRunner(model, cache)
    return CompiledRunner(model, cache, max_batch=max_batch, max_blocks=max_blocks)
