"""The serving engine's compiled decode step (``Engine(compile=True)``, ``serve --compile``):
greedy text equals the eager engine's on the real llama2.c weights, with rows of changing
batch sizes and contexts that cross block-width buckets, on int8 weights and with a draft;
the number of graphs Dynamo compiles stays within the buckets however many steps run; and
a real server process compiles before it serves."""

from __future__ import annotations

import copy
import time

import openai
import pytest
import torch
from torch._dynamo.utils import counters

from llamaforge.inference.quantize import quantize_int8
from llamaforge.serve.engine import Engine, SamplingParams
from llamaforge.serve.kv_cache import PagedKVCache
from llamaforge.serve.runner import CompiledRunner, ModelRunner, batch_buckets

from .test_serve import ServerProcess
from .test_serve_engine import PROMPTS, _one_thread, check_idle, l2c_ckpt, loaded, run_all  # noqa: F401
from .test_serve_spec import perturbed


def greedy_jobs(tok, lengths: list[int]) -> list[tuple[list[int], SamplingParams]]:
    return [
        (tok.encode(p, bos=True), SamplingParams(max_tokens=n, temperature=0.0, logprobs=0))
        for p, n in zip(PROMPTS, lengths)
    ]


def texts(outs) -> list[tuple[str, list[int], str | None]]:
    """Each request's text, token ids and finish reason."""
    return [
        ("".join(o.text for o in out), [t.id for x in out for t in x.tokens], out[-1].finish_reason)
        for out in outs
    ]


def graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


def test_buckets_and_refusals(loaded):  # noqa: F811
    """Buckets: powers of two, then max_batch; a step beyond them is refused by name."""
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="max_batch 0"):
        batch_buckets(0)
    model, _ = loaded
    cache = PagedKVCache(model.args, 8, 16, torch.float32, torch.device("cpu"))
    assert CompiledRunner(model, cache, max_batch=6, max_blocks=32).widths == [4, 8, 16, 32]
    runner = CompiledRunner(model, cache, max_batch=6, max_blocks=5, min_blocks=5)
    assert runner.widths == [5]  # one width: the whole table
    runner = CompiledRunner(model, cache, max_batch=6, max_blocks=5)
    assert runner.widths == [1, 2, 4, 5]
    assert runner.bucket(3, 3) == (4, 4) and runner.bucket(6, 5) == (6, 5)
    with pytest.raises(ValueError, match="7 rows over 1 blocks.*at most 6 rows and 5 blocks"):
        runner.bucket(7, 1)
    with pytest.raises(ValueError, match="6 blocks"):
        runner.bucket(1, 6)


@pytest.mark.slow
def test_compiled_greedy_equals_eager_with_bounded_graphs(loaded):  # noqa: F811
    """2 rows for 4 requests of different lengths: batches of 2 and 1, contexts crossing
    64-position blocks; each (rows, blocks) bucket compiles once, and a second round of
    requests compiles nothing."""
    model, tok = loaded
    lengths = [70, 20, 45, 90]
    kw = dict(max_batch=2, prefill_chunk=7, block_size=64)
    ref = texts(run_all(Engine(model, tok, **kw), greedy_jobs(tok, lengths)))
    engine = Engine(model, tok, compile=True, **kw)
    runner = engine.runner
    assert isinstance(runner, CompiledRunner) and runner.widths == [1, 2]
    before = graphs()
    assert texts(run_all(engine, greedy_jobs(tok, lengths))) == ref
    check_idle(engine)
    made = graphs() - before
    assert runner.shapes == {(b, 1, w) for b in (1, 2) for w in (1, 2)}
    assert made == len(runner.shapes)  # one compilation per bucket met, none per step
    assert texts(run_all(engine, greedy_jobs(tok, lengths))) == ref
    assert graphs() - before == made


@pytest.mark.slow
def test_compiled_int8_and_draft(loaded):  # noqa: F811
    """int8 weights compiled give the eager int8 engine's text; the model with a perturbed
    draft, both compiled (the model verifying k + 1 tokens per row), the text without a
    draft."""
    model, tok = loaded
    lengths = [30, 12]
    kw = dict(max_batch=1, prefill_chunk=16, block_size=64)  # every context in one block
    q = quantize_int8(copy.deepcopy(model))
    ref = texts(run_all(Engine(q, tok, **kw), greedy_jobs(tok, lengths)))
    engine = Engine(q, tok, compile=True, **kw)
    assert texts(run_all(engine, greedy_jobs(tok, lengths))) == ref
    assert engine.runner.shapes == {(1, 1, 1)}
    ref = texts(run_all(Engine(model, tok, **kw), greedy_jobs(tok, lengths)))
    engine = Engine(model, tok, compile=True, draft=perturbed(model, 0.5), draft_k=2, **kw)
    before = graphs()
    assert texts(run_all(engine, greedy_jobs(tok, lengths))) == ref
    assert 0 < engine.stats.spec_accepted < engine.stats.spec_drafted
    check_idle(engine)
    draft = engine.draft_runner
    assert isinstance(draft, CompiledRunner) and isinstance(engine.runner, CompiledRunner)
    assert engine.runner.shapes == {(1, 3, 1)} and draft.shapes == {(1, 1, 1)}
    assert graphs() - before == 2
    assert type(Engine(model, tok, **kw).runner) is ModelRunner  # eager unless asked


@pytest.mark.slow
def test_serve_compile_process(l2c_ckpt, loaded):  # noqa: F811
    """``serve --compile`` compiles its one bucket before it listens, then serves the eager
    engine's greedy text."""
    model, tok = loaded
    lengths = [40, 40]
    ref = texts(run_all(Engine(model, tok, max_batch=1), greedy_jobs(tok, lengths)))
    args = ("--ckpt", str(l2c_ckpt), "--max-batch", "1", "--block-size", "128", "--compile")
    srv = ServerProcess(*args, timeout=600)
    try:
        for _ in range(50):  # the stderr reader's lines
            if "compiled in" in "".join(srv.stderr):
                break
            time.sleep(0.1)
        assert "compiled in" in "".join(srv.stderr), srv.stderr
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=120)
        for prompt, (text, _, _) in zip(PROMPTS, ref):
            r = c.completions.create(
                model="aidreams260K", prompt=prompt, max_tokens=40, temperature=0
            )
            assert r.choices[0].text == text
    finally:
        srv.stop()
