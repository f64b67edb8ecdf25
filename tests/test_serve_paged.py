"""The paged KV cache and its scheduler: the block manager's accounting (allocation,
reference counts, the hash chain, prefix matching, LRU eviction), the paged attention
against the model's own cache, and the engine on them: greedy text equal to `generate`'s
with and without prefix-cache hits, across block boundaries, under preemption, with a
draft; every block returned after a threaded load with cancellations; a request too big
for the pool refused."""

from __future__ import annotations

import copy
import random
import re
import threading
import time

import pytest
import torch

from llamaforge.inference.generate import generate_completions
from llamaforge.inference.quantize import quantize_int8
from llamaforge.serve.engine import ContextLengthExceeded, Engine, Output, SamplingParams
from llamaforge.serve.kv_cache import BlockManager, BlockTable, PagedKVCache

from .conftest import tiny_model
from .test_serve_engine import (  # noqa: F401  (module fixtures)
    PROMPTS,
    _one_thread,
    _text,
    check_idle,
    l2c_ckpt,
    loaded,
    run_all,
)

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


# ---------------------------------------------------------------- the engine on them

LONG = "Once upon a time, there was a little girl named Lily. She loved to play in the park"


def _generate(model, tok, prompt: str, n: int) -> str:
    (ref,) = generate_completions(model, tok, [prompt], max_new_tokens=n, temperature=0.0)
    return ref.text


def _greedy(tok, prompt: str, n: int):
    return tok.encode(prompt), SamplingParams(max_tokens=n, temperature=0.0)


def test_prefix_cache_hits_give_generates_text(loaded):  # noqa: F811
    """The same request twice, then requests sharing a long prefix with other tails: the
    later ones take cached blocks (hits counted) and their greedy text is still `generate`'s
    and the text of an engine without the prefix cache; blocks of 4 put many boundaries in
    every prompt."""
    model, tok = loaded
    tails = ["", " and", " Lily ran to get it. She", " but then"]
    prompts = [LONG + t for t in tails]
    want = [_generate(model, tok, p, 24) for p in prompts]
    off = Engine(model, tok, max_batch=2, block_size=4, prefix_cache=False)
    engine = Engine(model, tok, max_batch=2, block_size=4)
    texts = [_text(run_all(engine, [_greedy(tok, prompts[0], 24)])[0])]
    assert engine.stats.prefix_hits == 0 and engine.stats.kv_blocks_cached > 0
    for p in prompts:  # the first again (a full hit but its last block), then the others
        texts.append(_text(run_all(engine, [_greedy(tok, p, 24)])[0]))
    assert texts == [want[0], *want]
    n = len(tok.encode(prompts[0]))
    assert engine.stats.prefix_hits >= (n - 1) // 4 * 4  # the second run took all it could
    assert 0 < engine.stats.prefix_hit_rate < 1
    # two at once after a third shares their prefix: both take it in one step
    both = run_all(engine, [_greedy(tok, prompts[2], 24), _greedy(tok, prompts[3], 24)])
    assert [_text(o) for o in both] == want[2:]
    assert [_text(o) for o in run_all(off, [_greedy(tok, p, 24) for p in prompts])] == want
    assert off.stats.prefix_hits == 0 and off.stats.kv_blocks_cached == 0
    check_idle(engine)
    check_idle(off)


def test_meta_tokenizer_across_block_boundaries(meta_tokenizer_path):
    """Meta's tokenizer (multi-byte UTF-8 in the prompt) and a model of its vocabulary:
    prompts longer than many blocks of 4, prefilled in chunks of 7 with a prefix hit, give
    `generate`'s greedy text."""
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer(meta_tokenizer_path)
    model = tiny_model(tok.vocab_size, seed=2).eval()
    prompts = [
        "Les élèves ont étudié le théorème de Gödel — 数学 is fun — and then",
        "Les élèves ont étudié le théorème de Gödel — 数学 is fun — but later",
    ]
    engine = Engine(model, tok, max_batch=2, block_size=4, prefill_chunk=7)
    got = [_text(run_all(engine, [_greedy(tok, p, 20)])[0]) for p in prompts]
    assert got == [_generate(model, tok, p, 20) for p in prompts]
    assert engine.stats.prefix_hits > 0
    check_idle(engine)


def test_a_pool_too_small_for_all_preempts_and_every_request_finishes(loaded):  # noqa: F811
    """Six requests, each fitting the pool alone but not all together: requests are
    preempted (their blocks released, their tokens recomputed later) and each still gets
    `generate`'s greedy text, streamed deltas included; with the prefix cache on and off."""
    model, tok = loaded
    lengths = [40, 35, 30, 45, 25, 38]
    jobs = [_greedy(tok, p, n) for p, n in zip(PROMPTS, lengths)]
    want = [_generate(model, tok, p, n) for p, n in zip(PROMPTS, lengths)]
    for prefix_cache in (True, False):
        engine = Engine(
            model, tok, max_batch=4, block_size=4, num_blocks=22, prefix_cache=prefix_cache
        )
        outs = run_all(engine, jobs)
        assert [_text(o) for o in outs] == want
        assert all(o[-1].finish_reason and not o[-1].error for o in outs)
        assert engine.stats.preemptions > 0
        check_idle(engine)


def test_preemption_with_a_draft(loaded):  # noqa: F811
    """Speculative decoding over the paged cache with a pool too small for all: the draft's
    cache follows the same tables through preemptions; the text equals the plain engine's."""
    model, tok = loaded
    lengths = [30, 20, 40, 25]
    jobs = [_greedy(tok, p, n) for p, n in zip(PROMPTS, lengths)]
    want = [_generate(model, tok, p, n) for p, n in zip(PROMPTS, lengths)]
    draft = quantize_int8(copy.deepcopy(model))
    engine = Engine(model, tok, max_batch=3, block_size=4, num_blocks=20, draft=draft, draft_k=3)
    outs = run_all(engine, jobs)
    assert [_text(o) for o in outs] == want
    assert engine.stats.preemptions > 0 and engine.stats.spec_accepted > 0
    check_idle(engine)


def test_a_request_too_big_for_the_pool_is_refused(loaded):  # noqa: F811
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, block_size=4, num_blocks=4)
    with pytest.raises(ContextLengthExceeded, match="5 KV blocks of 4 positions, more than the"):
        engine.submit([1] * 10, SamplingParams(max_tokens=10), print)
    (o,) = run_all(engine, [([1] * 10, SamplingParams(max_tokens=7, temperature=0.0))])
    assert o[-1].finish_reason == "length" and o[-1].completion_tokens == 7
    check_idle(engine)


def test_threaded_load_with_cancellations_returns_every_block(loaded):  # noqa: F811
    """Many requests from several threads against the engine's own thread, a pool that
    forces preemption, a third of them cancelled mid-way: every other one finishes, and
    afterwards no block is held and the accounting is consistent."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=6, block_size=4, num_blocks=40, prefill_chunk=16)
    rng = random.Random(0)
    jobs = []
    for i in range(36):
        prompt = tok.encode(rng.choice(PROMPTS) + rng.choice(["", " and", " the"]))
        temperature = rng.choice([0.0, 1.0])
        jobs.append((prompt, SamplingParams(rng.randint(4, 40), temperature, seed=i)))
    done: dict[int, threading.Event] = {}
    outs: dict[int, list[Output]] = {}
    lock = threading.Lock()

    def client(part: list[tuple[list[int], SamplingParams]], cancel_every: int) -> None:
        for j, (prompt, params) in enumerate(part):
            got: list[Output] = []
            event = threading.Event()

            def emit(out: Output, got=got, event=event) -> None:
                got.append(out)
                if out.finished:
                    event.set()

            rid = engine.submit(prompt, params, emit)
            with lock:
                outs[rid], done[rid] = got, event
            if j % cancel_every == 0:
                time.sleep(0.01)
                engine.cancel(rid)
                with lock:
                    del done[rid]

    engine.start()
    try:
        threads = [threading.Thread(target=client, args=(jobs[i::3], 3)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for rid, event in list(done.items()):
            assert event.wait(60), f"request {rid} was never answered"
            assert outs[rid][-1].finish_reason and not outs[rid][-1].error, outs[rid][-1]
        deadline = time.monotonic() + 30
        while engine.scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.stop()
    assert len(done) == 24 and engine.stats.preemptions > 0
    check_idle(engine)


# ------------------------------------------------------------------ a real server process


def test_serve_process_pool_flags_and_metrics(l2c_ckpt, loaded):  # noqa: F811
    """``serve --kv-cache-gb G --block-size 4``: the pool holds as many blocks as G GiB
    does, a repeated prompt hits the prefix cache with the same text, and /metrics reports
    the pool, the hit rate and the bytes held per token."""
    import httpx
    import openai

    from llamaforge.serve.kv_cache import block_nbytes

    from .test_serve import ServerProcess, idle

    model, tok = loaded
    gb = 0.002
    blocks = int(gb * 2**30 // block_nbytes(model.args, 4, torch.float32))
    srv = ServerProcess("--ckpt", str(l2c_ckpt), "--kv-cache-gb", str(gb), "--block-size", "4")
    try:
        assert f"KV pool {blocks} blocks x 4 positions" in srv.banner, srv.banner
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="aidreams260K", prompt=LONG, max_tokens=20, temperature=0)
        texts = [c.completions.create(**kw).choices[0].text for _ in range(2)]
        assert texts == [_generate(model, tok, LONG, 20)] * 2
        idle(srv)
        m = httpx.get(f"{srv.url}/metrics").text

        def value(name: str) -> float:
            found = re.search(rf"^{name} (\S+)$", m, re.M)
            assert found, (name, m)
            return float(found.group(1))

        assert value("llamaforge_kv_cache_blocks_total") == blocks
        assert value("llamaforge_kv_cache_blocks_used") == 0
        assert value("llamaforge_kv_cache_blocks_cached") > 0
        assert value("llamaforge_prefix_cache_hits_total") > 0
        assert 0 < value("llamaforge_prefix_cache_hit_ratio") < 1
        assert value("llamaforge_kv_cache_bytes_per_token") == 0  # nothing running
        assert value("llamaforge_preemptions_total") == 0
    finally:
        srv.stop()


def test_cli_pool_refusals(l2c_ckpt, capsys):  # noqa: F811
    from llamaforge.cli.main import main

    base = ["serve", "--ckpt", str(l2c_ckpt)]
    for flags, said in (
        (["--num-blocks", "0"], "--num-blocks 0: must be >= 1"),
        (["--block-size", "0"], "--block-size 0: must be >= 1"),
        (["--kv-cache-gb", "-1"], "--kv-cache-gb -1.0: must be a number of GiB > 0"),
        (["--kv-cache-gb", "1e-9"], "--kv-cache-gb 1e-09: less than one block"),
    ):
        assert main(base + flags) == 2, flags
        assert said in capsys.readouterr().err, flags


def test_several_prompts_prefill_in_one_forward(loaded):  # noqa: F811
    """Four waiting prompts of different lengths within the step's budget: one step admits
    them all and prefills them in a single forward of the model (rows padded to the longest,
    each with its own mask and positions), and their text is still `generate`'s."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4, block_size=4)
    jobs = [_greedy(tok, p, 12) for p in PROMPTS[:4]]
    outs: list[list[Output]] = [[] for _ in jobs]
    for (prompt, params), o in zip(jobs, outs):
        engine.submit(prompt, params, o.append)
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    try:
        engine._drain()
        engine.step()
    finally:
        hook.remove()
    longest = max(len(p) for p, _ in jobs)
    assert calls == [torch.Size([4, longest])] and len(engine.scheduler.running) == 4
    for _ in range(100):
        if all(o[-1].finished for o in outs):
            break
        engine.step()
    assert [_text(o) for o in outs] == [_generate(model, tok, p, 12) for p in PROMPTS[:4]]
    check_idle(engine)


def test_requests_with_one_prefix_at_once_compute_it_once(loaded):  # noqa: F811
    """Four requests with one long prompt submitted together (an ``n``-choices request, or a
    burst sharing a system prompt): the first prefills it, the others wait for its blocks and
    take them from the prefix cache instead of computing the same tokens beside it; the
    prompt's tokens are computed once, not four times, and every text is `generate`'s."""
    model, tok = loaded
    prompts = [LONG + t for t in ["", "", " and", " but then"]]
    engine = Engine(model, tok, max_batch=4, block_size=4)
    jobs = [_greedy(tok, p, 12) for p in prompts]
    outs: list[list[Output]] = [[] for _ in jobs]
    for (prompt, params), o in zip(jobs, outs):
        engine.submit(prompt, params, o.append)
    computed = []
    hook = model.register_forward_hook(
        lambda m, args, out: computed.append(args[0].numel()) if args[0].shape[1] > 1 else None
    )
    try:
        for _ in range(200):
            engine._drain()
            if all(o and o[-1].finished for o in outs):
                break
            engine.step()
    finally:
        hook.remove()
    n = len(tok.encode(LONG))
    shared = (n - 1) // 4 * 4  # what each follower can take: full blocks before its last token
    assert engine.stats.prefix_hits >= 3 * shared
    assert sum(computed) < 2 * n  # padded prefill rows included
    assert [_text(o) for o in outs] == [_generate(model, tok, p, 12) for p in prompts]
    check_idle(engine)
