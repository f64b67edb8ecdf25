"""The paged KV cache and its scheduler: the block manager's accounting (allocation,
reference counts, the hash chain, prefix matching, LRU eviction), the paged attention
against the model's own cache, and the engine on them: greedy text equal to `generate`'s
with and without prefix-cache hits, across block boundaries, under preemption, with a
draft; every block returned after a threaded load with cancellations; a request too big
for the pool refused."""

from __future__ import annotations

import pytest
import torch

from llamaforge.serve.kv_cache import BlockManager, BlockTable, PagedKVCache

from .conftest import tiny_model

# ---------------------------------------------------------------- the block manager


def test_allocate_and_free_account_for_every_block():
    bm = BlockManager(8, block_size=4)
    a, b = BlockTable(), BlockTable()
    assert bm.allocate(a, 1) and len(a.blocks) == 1
    assert bm.allocate(a, 4) and len(a.blocks) == 1  # still one block
    assert bm.allocate(a, 5) and len(a.blocks) == 2
    assert bm.allocate(b, 24) and len(b.blocks) == 6 and bm.available == 0
    assert not set(a.blocks) & set(b.blocks)
    c = BlockTable()
    assert not bm.allocate(c, 1) and c.blocks == []  # short: nothing taken
    bm.free(b)
    assert b.blocks == [] and bm.available == 6 and bm.used == 2
    bm.free(a)
    assert bm.available == 8 and bm.used == 0
    bm.check()
    with pytest.raises(ValueError, match="num_blocks 0"):
        BlockManager(0)


def test_hash_chain_covers_everything_before_a_block():
    bm = BlockManager(4, block_size=2)
    one = bm.block_hashes([1, 2, 3, 4, 5])
    assert len(one) == 2  # full blocks only
    assert bm.block_hashes([9, 9, 3, 4])[1] != one[1]  # same block, another past
    assert bm.block_hashes([1, 2, 3, 4])[:2] == one
    assert bm.block_hashes([1, 2, 3, 4], extra="adapter")[0] != one[0]
    assert bm.block_hashes([12, 3])[0] != bm.block_hashes([1, 23])[0]


def test_prefix_match_shares_blocks_and_never_the_last_tokens_block():
    bm = BlockManager(16, block_size=4)
    prompt = list(range(100, 110))  # 10 tokens: blocks [0:4] [4:8] [8:10]
    a = BlockTable()
    assert bm.match(a, prompt) == 0
    assert bm.allocate(a, len(prompt))
    bm.commit(a, prompt, len(prompt))
    assert len(a.hashes) == 2 and bm.cached == 2
    b = BlockTable()
    assert bm.match(b, prompt) == 8 and b.blocks == a.blocks[:2]  # shared, refcount 2
    bm.free(a)
    assert bm.used == 2  # b still holds the shared blocks
    bm.free(b)
    assert bm.used == 0 and bm.cached == 2  # released, still cached
    # a prompt of exactly two blocks: its second block holds the last token, not matched
    c = BlockTable()
    assert bm.match(c, prompt[:8]) == 4 and len(c.blocks) == 1
    bm.free(c)
    # another extra key shares nothing; the cache off matches nothing
    assert bm.match(BlockTable(extra="lora"), prompt) == 0
    off = BlockManager(4, block_size=4, prefix_cache=False)
    t = BlockTable()
    off.allocate(t, 8)
    off.commit(t, prompt, 8)
    off.free(t)
    assert off.cached == 0 and off.match(BlockTable(), prompt) == 0
    bm.check()


def test_a_block_another_already_holds_stays_private():
    bm = BlockManager(8, block_size=2)
    a, b = BlockTable(), BlockTable()
    for t in (a, b):  # both computed the same tokens before either was cached
        bm.allocate(t, 4)
    bm.commit(a, [1, 2, 3, 4], 4)
    bm.commit(b, [1, 2, 3, 4], 4)
    assert bm.cached == 2 and b.hashes == a.hashes
    bm.free(b)
    assert bm.available == 6  # b's copies went back to the free list, not the cache
    bm.check()


def test_lru_eviction_takes_unused_cached_blocks_tail_first():
    bm = BlockManager(4, block_size=2)
    first, second = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    for prompt in (first, second):
        t = BlockTable()
        bm.allocate(t, 4)
        bm.commit(t, prompt, 4)
        bm.free(t)
    assert bm.cached == 4 and bm.available == 4 and bm.used == 0
    t = BlockTable()
    assert bm.allocate(t, 2)  # evicts the least recently used: first's tail block
    assert bm.cached == 3
    probe = BlockTable()
    assert bm.match(probe, first) == 2  # first's head survives
    bm.free(probe)
    assert bm.allocate(t, 4)  # one more: first's head was used last, second's tail goes
    probe = BlockTable()
    assert bm.match(probe, second) == 2 and bm.match(BlockTable(), first) == 2
    bm.free(probe)
    bm.check()


# ---------------------------------------------------------------- paged attention


def test_paged_attention_equals_the_models_own_cache():
    """Two rows of different lengths, their blocks interleaved in the pool, prefilled in two
    chunks and decoded two steps: the logits equal a plain forward of each row alone."""
    from llamaforge.serve.runner import ModelRunner

    torch.manual_seed(0)
    model = tiny_model(97, seed=1).eval()
    bs = 4
    cache = PagedKVCache(model.args, 16, bs, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, cache)
    rows = [torch.randint(0, 97, (23,)).tolist(), torch.randint(0, 97, (9,)).tolist()]
    tables = [[3, 0, 7, 1, 9, 12], [2, 5, 15]]
    with torch.no_grad():
        want = [model(torch.tensor([r]))[0] for r in rows]
        got: list[list[torch.Tensor]] = [[], []]
        cuts = [(0, 10), (0, 6)], [(10, 21), (6, 7)]
        for step in cuts:
            chunks = [rows[i][a:b] for i, (a, b) in enumerate(step)]
            starts = [a for a, _ in step]
            out = runner.prefill(chunks, starts, tables, keep_all=[True, True])
            for i in range(2):
                got[i].append(out[i])
        for offset in (0, 1):  # two decode steps, one token per row
            pos = [21 + offset, 7 + offset]
            tokens = torch.tensor([[rows[0][pos[0]]], [rows[1][pos[1]]]])
            logits = runner.decode(tokens, pos, tables)
            for i in range(2):
                got[i].append(logits[i])
    for i in range(2):
        torch.testing.assert_close(torch.cat(got[i]), want[i], rtol=1e-4, atol=1e-4)
