"""The serving engine in-process (no HTTP): continuous batching with chunked prefill over a
paged KV cache gives, at temperature 0, exactly the text of `generate_completions`, for
every request of a batch busier than ``max_batch``; seeds make sampling reproducible; every
block is released afterwards."""

from __future__ import annotations

import time

import pytest
import torch

import llamaforge
from llamaforge.checkpoint.convert.llama2c import import_llama2c
from llamaforge.inference.generate import generate_completions
from llamaforge.serve.engine import Engine, EngineStopped, Output, QueueFull, SamplingParams

from .conftest import shared_file

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "In a land far away, there lived a king who loved",
    "Lily",
    "The sun was shining and the birds were singing in the tall green trees of the park",
    "One day, a boy named Tim",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """A 260K-parameter model gains nothing from more threads, and on a shared machine
    waiting for a descheduled OpenMP thread dominates its tiny matrix products."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def l2c_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_l2c") / "aidreams260K"
    import_llama2c(
        shared_file("weights/llama2c/aidreams260K.bin"),
        shared_file("weights/llama2c/tok512.bin"),
        out,
    )
    return out


@pytest.fixture(scope="module")
def loaded(l2c_ckpt):
    return llamaforge.load(l2c_ckpt)


def run_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[Output]]:
    """Submit every job, step the engine (no thread) until all have finished."""
    outs: list[list[Output]] = [[] for _ in jobs]
    for i, (prompt, params) in enumerate(jobs):
        engine.submit(prompt, params, outs[i].append)
    for _ in range(10_000):
        engine._drain()
        if all(o and o[-1].finished for o in outs):
            break
        engine.step()
    assert all(o and o[-1].finished for o in outs)
    return outs


def check_idle(engine: Engine) -> None:
    """Nothing admitted, every block released, the accounting consistent."""
    s = engine.scheduler
    assert engine.stats.kv_used == 0 and not s.running and not s.prefilling and not s.waiting
    assert engine.blocks.used == 0 and engine.stats.kv_blocks_used == 0
    engine.blocks.check()


def test_greedy_batch_equals_generate(loaded):
    model, tok = loaded
    # 3 rows for 7 requests (waiting, block reuse), prefill chunks of 5 tokens (several
    # steps per prompt while others decode, several prompts in one forward), different
    # lengths (rows retire mid-batch), blocks of 4 positions (many block boundaries)
    engine = Engine(model, tok, max_batch=3, prefill_chunk=5, block_size=4)
    lengths = [30, 7, 20, 45, 3, 25]
    jobs = [
        (tok.encode(p), SamplingParams(max_tokens=n, temperature=0.0))
        for p, n in zip(PROMPTS, lengths)
    ]
    # a sampled request in the same batch must not change the greedy ones
    jobs.append((tok.encode("Once"), SamplingParams(max_tokens=30, temperature=1.0, seed=3)))
    outs = run_all(engine, jobs)
    for (_, params), o, text in zip(jobs, outs, PROMPTS):
        if params.temperature > 0:
            continue
        (ref,) = generate_completions(
            model, tok, [text], max_new_tokens=params.max_tokens, temperature=0.0
        )
        assert "".join(x.text for x in o) == ref.text
        assert o[-1].completion_tokens == len(ref.tokens) + (ref.finish_reason == "eos")
        assert o[-1].finish_reason == ("stop" if ref.finish_reason == "eos" else "length")
    check_idle(engine)


def test_stop_strings_and_streamed_deltas(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2)
    prompt = "Once upon a time"
    (full,) = generate_completions(model, tok, [prompt], max_new_tokens=40, temperature=0.0)
    stop = full.text[12:15]  # a stop string the greedy text reaches
    (ref,) = generate_completions(
        model, tok, [prompt], max_new_tokens=40, temperature=0.0, stop=[stop]
    )
    (o,) = run_all(engine, [(tok.encode(prompt), SamplingParams(40, 0.0, stop=[stop]))])
    assert "".join(x.text for x in o) == ref.text == full.text[: full.text.find(stop)]
    assert o[-1].finish_reason == "stop"
    # no delta ever showed a piece of the stop string that was later cut
    assert all(stop not in x.text for x in o)


def test_seeded_sampling_is_reproducible(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4)
    p = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=1234)
    q = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=99)
    ids = tok.encode("The little dog")
    a, b, c = run_all(engine, [(ids, p), (ids, p), (ids, q)])
    text = ["".join(x.text for x in o) for o in (a, b, c)]
    assert text[0] == text[1] and text[0] != text[2]


def test_logprobs_and_prompt_logprobs(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, prefill_chunk=4)
    ids = tok.encode("In a land far away")
    params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=True)
    (o,) = run_all(engine, [(ids, params)])
    prompt_lp = o[0].prompt_logprobs
    assert prompt_lp is not None and [t.id for t in prompt_lp] == ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    assert prompt_lp[0].logprob is None
    for j in range(1, len(ids)):
        assert prompt_lp[j].logprob == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        assert len(prompt_lp[j].top) == 2
    gen = [t for x in o for t in x.tokens]
    assert len(gen) == 3 and all(t.logprob is not None and t.top[0][0] == t.id for t in gen)


def test_refusals(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=1, max_queue=2)
    with pytest.raises(ValueError, match="context of 128"):
        engine.submit([1] * 100, SamplingParams(max_tokens=29), print)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, 99999], SamplingParams(max_tokens=1), print)
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1], SamplingParams(max_tokens=1, temperature=-1), print)
    engine.submit([1], SamplingParams(max_tokens=1), print)
    engine.submit([1], SamplingParams(max_tokens=1), print)
    with pytest.raises(QueueFull):
        engine.submit([1], SamplingParams(max_tokens=1), print)


def test_cancel_releases_the_blocks(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2)
    outs: list[Output] = []
    rid = engine.submit(tok.encode("Once upon a time"), SamplingParams(50, 0.0), outs.append)
    engine._drain()
    for _ in range(5):
        engine.step()
    assert engine.stats.running == 1 and engine.stats.kv_used > 0
    engine.cancel(rid)
    engine._drain()
    engine.step()
    assert engine.stats.running == 0
    check_idle(engine)


def test_non_finite_logits_are_an_error_and_the_engine_goes_on(l2c_ckpt):
    model, tok = llamaforge.load(l2c_ckpt)
    engine = Engine(model, tok, max_batch=2)
    ok = run_all(engine, [(tok.encode("Once"), SamplingParams(5, 0.0))])
    with torch.no_grad():
        model.output.weight[7] = float("nan")
    (bad,) = run_all(engine, [(tok.encode("Once"), SamplingParams(5, 0.0))])
    assert bad[-1].error and "NaN" in bad[-1].error and engine.stats.running == 0
    with torch.no_grad():
        model.output.weight[7] = 0.0
    (again,) = run_all(engine, [(tok.encode("Once"), SamplingParams(5, 0.0))])
    assert again[-1].finish_reason and not again[-1].error and ok[0][-1].finish_reason


def test_non_streamed_request_gets_one_output_with_everything(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2)
    ids = tok.encode("The little dog")
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)
    (streamed,) = run_all(engine, [(ids, params)])
    whole: list[Output] = []
    engine.submit(ids, params, whole.append, stream=False)
    while not whole:
        engine._drain()
        engine.step()
    (out,) = whole
    assert out.text == "".join(o.text for o in streamed) and out.finish_reason == "length"
    assert [t.id for t in out.tokens] == [t.id for o in streamed for t in o.tokens]


# ------------------------------------------------------- failures stay with their request


def _threaded(
    engine: Engine, jobs: list[tuple[list[int], SamplingParams]], then=lambda: None
) -> list[list[Output]]:
    """Submit every job, call ``then``, start the engine's thread if it is not running (so
    that it finds them all at once), and wait (bounded) until each has its final Output."""
    import threading

    outs: list[list[Output]] = [[] for _ in jobs]
    done = [threading.Event() for _ in jobs]

    def emitter(i: int):
        def emit(out: Output) -> None:
            outs[i].append(out)
            if out.finished:
                done[i].set()

        return emit

    for i, (prompt, params) in enumerate(jobs):
        engine.submit(prompt, params, emitter(i))
    then()
    engine.start()
    for i, event in enumerate(done):
        assert event.wait(30), f"request {i} was never answered"
    return outs


def _text(outs: list[Output]) -> str:
    return "".join(o.text for o in outs)


def test_submit_refuses_what_the_engine_cannot_take(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=1)
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            engine.submit([1], SamplingParams(max_tokens=1, seed=seed), print)
    with pytest.raises(ValueError, match="stop"):
        engine.submit([1], SamplingParams(max_tokens=1, stop=[""]), print)
    engine.submit([1], SamplingParams(max_tokens=1, seed=2**64 - 1), print)  # torch takes it


def test_a_request_failing_in_the_engine_fails_alone_and_releases_its_blocks(loaded):
    """Requests whose admission raises (their seed set out of torch's range after submit
    checked it: what any bug in admitting one request looks like), admitted beside a good
    one, get an error each; the good requests get their text, every block is free again, and
    more such requests than rows leave an engine that serves."""
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2)
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    alone = [_text(run_all(engine, [(p, SamplingParams(12, 0.0))])[0]) for p in prompts]
    bad = [SamplingParams(12, 0.0, seed=1) for _ in range(3)]
    jobs = [(prompts[0], SamplingParams(12, 0.0)), *((prompts[1], b) for b in bad)]
    jobs.append((prompts[1], SamplingParams(12, 0.0)))

    def break_seeds() -> None:
        for b in bad:
            b.seed = 2**64

    try:
        outs = _threaded(engine, jobs, then=break_seeds)
        for i in (1, 2, 3):
            assert outs[i][-1].error and "internal error" in outs[i][-1].error, outs[i]
        for got, want in ((outs[0], alone[0]), (outs[4], alone[1])):
            assert _text(got) == want and not got[-1].error
        (again,) = _threaded(engine, [(prompts[0], SamplingParams(12, 0.0))])
        assert _text(again) == alone[0]
        assert engine.health() is None
    finally:
        engine.stop()
    assert engine.stats.running == 0
    check_idle(engine)


def test_health_reports_a_wedged_engine_and_a_stopped_one(loaded):
    """An engine stuck inside a step (here: a consumer that blocks the thread) is reported
    by `health` after ``stall_timeout``, and is healthy again once it moves; a stopped engine
    refuses new requests and has answered every one it held."""
    import threading

    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, stall_timeout=0.5)
    engine.start()
    release = threading.Event()
    outs: list[Output] = []

    def stuck(out: Output) -> None:
        release.wait(30)
        outs.append(out)

    try:
        time.sleep(1.0)  # idle for longer than stall_timeout: that is not a stall
        assert engine.health() is None
        engine.submit(tok.encode("Once"), SamplingParams(3, 0.0, stop=["zzz"]), stuck)
        deadline = time.monotonic() + 20
        while engine.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "no progress" in (engine.health() or "")
        release.set()
        deadline = time.monotonic() + 20
        while not (outs and outs[-1].finished) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outs[-1].finish_reason and engine.health() is None
        held: list[Output] = []
        engine.submit(tok.encode("Once"), SamplingParams(100, 1.0), held.append)
    finally:
        engine.stop()
    assert engine.health() == "the engine thread has stopped"
    assert held and held[-1].finished
    with pytest.raises(EngineStopped):
        engine.submit([1], SamplingParams(max_tokens=1), print)
