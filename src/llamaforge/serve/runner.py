"""One model's batched forward over a paged KV cache: the seam of the serving engine that a
compiled decode step or a tensor-parallel runner replaces.

Rows are given as token lists (prefill: each row a chunk at its own start) or a (rows, s)
tensor (decode: each row's pending token, or its pending token and a draft's proposals, at
consecutive positions), with each row's block table. The runner turns positions into the
flat slot of each new token and a per-row mask over the row's gathered blocks, binds them
to the `PagedKVCache` and calls the model with explicit rotary positions; padding positions
of short prefill rows write to the cache's scratch block and are masked out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llamaforge.model import Transformer
from llamaforge.serve.kv_cache import PagedKVCache, blocks_for

if TYPE_CHECKING:
    from llamaforge.serve.adapters import AdapterBatch

__all__ = ["ModelRunner"]


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
        mask = self._bind(pos, valid, tables, top)
        if self.lora is not None:
            self.lora.bind(adapters, keep if logits else None)
        if not logits:
            self.model(tokens, 0, mask=mask, positions=pos, cache=self.cache, return_hidden=True)
            return []
        out = self.model(tokens, 0, mask=mask, positions=pos, cache=self.cache, only=keep.to(dev))
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
        s = tokens.shape[1]
        start = torch.tensor(starts, dtype=torch.long, device=self.device)
        pos = start[:, None] + torch.arange(s, device=self.device)
        mask = self._bind(pos, None, tables, max(starts) + s)
        if self.lora is not None:
            self.lora.bind(adapters)
        return self.model(tokens, 0, mask=mask, positions=pos, cache=self.cache)

    def _bind(
        self, pos: torch.Tensor, valid: torch.Tensor | None, tables: list[list[int]], top: int
    ) -> torch.Tensor:
        """Bind the rows' tables (the blocks holding positions below ``top``) and the new
        tokens' slots to the cache; the (rows, 1, s, keys) mask: each query sees its row's
        keys up to its own position (a padding query: the row's first key)."""
        cache, bs = self.cache, self.cache.block_size
        width = blocks_for(top, bs)
        padded = [t[:width] + [cache.scratch] * (width - len(t[:width])) for t in tables]
        table = torch.tensor(padded, dtype=torch.long, device=self.device)
        slots = table.gather(1, pos // bs) * bs + pos % bs
        if valid is not None:
            slots = torch.where(valid, slots, cache.scratch * bs)
        cache.bind(table, slots.reshape(-1))
        keys = torch.arange(width * bs, device=self.device)
        return (keys[None, None, :] <= pos[:, :, None])[:, None]
