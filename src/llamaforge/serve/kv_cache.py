"""The serving engine's memory: a pool of fixed-size KV blocks, shared by prefix.

`BlockManager` hands out blocks of ``block_size`` token positions from a pool of
``num_blocks``. Each request holds a `BlockTable` (its block ids, in position order) that
grows as its tokens arrive and is released when it ends, fails, is cancelled or preempted.
Blocks carry reference counts: a block full of computed tokens is keyed by a hash of its
tokens chained with the hash of every block before it (and an optional extra key, such as
an adapter's name), so a later request whose prompt starts with the same tokens takes the
same blocks instead of recomputing them (prefix caching). Matching stops before the block
that holds the prompt's last token, whose logits must be computed anyway, so a shared block
is only ever read. A released hashed block stays cached and is evicted, least recently used
first, only when the pool has no never-hashed block left.

`PagedKVCache` holds the keys and values of every block for every layer, (n_layers,
num_blocks + 1, block_size, kv_heads, head_dim) each; the extra block is a scratch block
that padding positions write to. Before a forward the caller `bind`s each row's block table
and the flat slot (block · block_size + offset) of every new token; the model's attention
calls `update`, which scatters the new keys and values into their slots and returns each
row's keys and values gathered from its blocks, (rows, kv_heads, blocks · block_size,
head_dim), for scaled_dot_product_attention with the per-row mask the caller passes.

Why gather + SDPA and not ``flex_attention`` over the pool with a paged block mask: one
decode step's attention for one layer, measured on this machine's CPU (2 cores shared with
other jobs: under load; one thread), with the 15M llama2.c model's attention shape (6 heads of
48) and 200-token contexts in 16-token blocks scattered over the pool, took 1.8 ms for 8 rows
and 9.6 ms for 32 rows as gather + SDPA, against 22 ms and 57 ms for eager ``flex_attention``
with a ``BlockMask`` whose mask_mod looks up each key's owner and logical position (34 ms and
86 ms counting the block mask's construction, needed each step as tables grow). Eager CPU
flex materialises the scores over the whole pool; compiled flex needs a C++ toolchain at
serve time and recompiles per shape. The gather copies each row's context once per layer,
which a CUDA paged-attention kernel would avoid; `update` is the one place to plug one in.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from llamaforge.model import ModelArgs

__all__ = ["BlockManager", "BlockTable", "PagedKVCache", "block_nbytes", "blocks_for"]


def blocks_for(tokens: int, block_size: int) -> int:
    """How many blocks of ``block_size`` positions hold ``tokens`` positions."""
    return -(-tokens // block_size)


def _root(extra: Hashable) -> bytes:
    """The hash chain's start for requests with this extra key."""
    return hashlib.sha256(repr(extra).encode()).digest()


def _chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a block of ``tokens`` after the blocks hashed into ``parent``."""
    return hashlib.sha256(parent + b"," + ",".join(map(str, tokens)).encode()).digest()


def block_nbytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block's keys and values over every layer of a model with ``args``."""
    per_token = 2 * args.n_layers * args.kv_heads * args.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


@dataclass
class BlockTable:
    """One request's blocks: ``blocks[i]`` holds positions ``i·block_size…``; ``hashes[i]``
    is the chained hash of block i once it is full of computed tokens (a prefix of
    ``blocks``); ``extra`` is mixed into every hash (requests with different extras share
    nothing)."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    extra: Hashable = None


class BlockManager:
    """The pool's accounting (no tensors): allocation, reference counts, prefix caching and
    LRU eviction. Used by one thread (the engine's)."""

    def __init__(self, num_blocks: int, block_size: int = 16, *, prefix_cache: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks {num_blocks}: must be at least 1")
        if block_size < 1:
            raise ValueError(f"block_size {block_size}: must be at least 1")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self._refs = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never-hashed, unused
        self._evictable: OrderedDict[int, None] = OrderedDict()  # hashed, unused; LRU first
        self._cached: dict[bytes, int] = {}  # hash -> block
        self.queries = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found there

    # -- counters ---------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks a request can take now: unused ones, cached ones included."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        """Blocks some request holds."""
        return self.num_blocks - self.available

    @property
    def cached(self) -> int:
        """Blocks keyed by their tokens (in use or not)."""
        return len(self._cached)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    # -- one request's blocks ---------------------------------------------------------

    def block_hashes(self, tokens: Sequence[int], extra: Hashable = None) -> list[bytes]:
        """The chained hash of every full block of ``tokens``."""
        out: list[bytes] = []
        parent = _root(extra)
        bs = self.block_size
        for i in range(len(tokens) // bs):
            parent = _chain(parent, tokens[i * bs : (i + 1) * bs])
            out.append(parent)
        return out

    def match(self, table: BlockTable, tokens: Sequence[int]) -> int:
        """Give an empty ``table`` the longest cached run of full blocks that starts
        ``tokens`` (never the block holding the last token); the number of tokens found.
        The hit counters are the caller's to `record` (a match may be undone)."""
        if table.blocks:
            raise ValueError(f"match: the table already holds {len(table.blocks)} blocks")
        if not self.prefix_cache:
            return 0
        usable = (len(tokens) - 1) // self.block_size
        for h in self.block_hashes(tokens[: usable * self.block_size], table.extra):
            block = self._cached.get(h)
            if block is None:
                break
            self._ref(block)
            table.blocks.append(block)
            table.hashes.append(h)
        return len(table.blocks) * self.block_size

    def record(self, queried: int, found: int) -> None:
        """Count a prefix lookup of ``queried`` tokens that found ``found`` of them."""
        self.queries += queried
        self.hits += found

    def allocate(self, table: BlockTable, tokens: int) -> bool:
        """Grow ``table`` to hold ``tokens`` positions; False (nothing taken) when the pool
        lacks the blocks."""
        need = blocks_for(tokens, self.block_size) - len(table.blocks)
        if need <= 0:
            return True
        if need > self.available:
            return False
        for _ in range(need):
            table.blocks.append(self._take())
        return True

    def commit(self, table: BlockTable, tokens: Sequence[int], computed: int) -> None:
        """Key every block of ``table`` now full of computed tokens (``tokens[:computed]``
        have their keys and values in the cache) so that later requests can share it. A block
        whose tokens another block already holds stays private."""
        full = min(computed // self.block_size, len(table.blocks))
        if full <= len(table.hashes):
            return
        bs = self.block_size
        parent = table.hashes[-1] if table.hashes else _root(table.extra)
        for i in range(len(table.hashes), full):
            parent = _chain(parent, tokens[i * bs : (i + 1) * bs])
            table.hashes.append(parent)
            block = table.blocks[i]
            if self.prefix_cache and parent not in self._cached and self._hash[block] is None:
                self._cached[parent] = block
                self._hash[block] = parent

    def free(self, table: BlockTable) -> None:
        """Release every block of ``table`` (last block first, so that a request's tail is
        evicted before its head) and empty it."""
        for block in reversed(table.blocks):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self._refs[block] == 0:
                if self._hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.blocks.clear()
        table.hashes.clear()

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            self._evictable.pop(block, None)
        self._refs[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            h = self._hash[block]
            assert h is not None
            del self._cached[h]
            self._hash[block] = None
        self._refs[block] = 1
        return block

    def check(self) -> None:
        """Raise AssertionError when the accounting is inconsistent (tests)."""
        assert len(set(self._free) | set(self._evictable)) == self.available, "listed twice"
        for b in range(self.num_blocks):
            unused = b in self._evictable or b in self._free
            assert (self._refs[b] == 0) == unused, f"block {b}: {self._refs[b]} references"
            if b in self._free:
                assert self._hash[b] is None, f"free block {b} has a hash"
            if b in self._evictable:
                assert self._hash[b] is not None, f"evictable block {b} has no hash"
        assert all(self._hash[b] == h for h, b in self._cached.items())


class PagedKVCache:
    """Keys and values of ``num_blocks`` blocks (plus a scratch block) for every layer, with
    the ``update(layer, start_pos, k, v)`` interface the model's attention calls; `bind` sets
    the rows' block tables and the new tokens' slots before each forward."""

    def __init__(
        self,
        args: ModelArgs,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (args.n_layers, num_blocks + 1, block_size, args.kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch = num_blocks  # the block padding writes to
        self._tables: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes // (self.num_blocks + 1)

    def bind(self, tables: torch.Tensor, slots: torch.Tensor) -> None:
        """The next forward's rows: ``tables`` (rows, blocks) block ids (short tables padded
        with `scratch`), ``slots`` (rows · new tokens,) the flat slot of each new token, in
        row-major order."""
        self._tables, self._slots = tables, slots

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (rows, kv_heads, new, head_dim) at the bound slots; return
        every row's keys and values over its blocks (rows, kv_heads, positions, head_dim).
        ``start_pos`` is unused: the slots say where each token goes."""
        if self._tables is None or self._slots is None:
            raise RuntimeError("PagedKVCache.update before bind")
        heads, dim = k.shape[1], k.shape[3]
        # indexing the pool itself, not a view of it: a compiled step then writes in place
        # (through a view, Inductor copied each layer out and back at every step)
        blocks, offsets = self._slots // self.block_size, self._slots % self.block_size
        at = (torch.full_like(blocks, layer), blocks, offsets)
        self.k.index_put_(at, k.transpose(1, 2).reshape(-1, heads, dim))
        self.v.index_put_(at, v.transpose(1, 2).reshape(-1, heads, dim))
        rows = self._tables.shape[0]
        keys = self.k[layer][self._tables].view(rows, -1, heads, dim).transpose(1, 2)
        values = self.v[layer][self._tables].view(rows, -1, heads, dim).transpose(1, 2)
        return keys, values
