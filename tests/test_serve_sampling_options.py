"""Sampling options of the serving engine and the server: presence, frequency and
repetition penalties, logit_bias, min_tokens, stop_token_ids and ``n``. Greedy text under
each option equals a direct computation on the model's logits (full forwards, no cache,
the penalties computed here, HF transformers' RepetitionPenaltyLogitsProcessor for the
repetition penalty), alone and in a batch mixing options; bad values are refused naming
the field; ``n`` gives n choices."""

from __future__ import annotations

from collections import Counter

import httpx
import openai
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from llamaforge.serve.engine import Engine, SamplingParams

from .test_serve import ServerProcess, chat_ckpt  # noqa: F401  (fixtures)
from .test_serve_engine import _one_thread, check_idle, l2c_ckpt, loaded, run_all  # noqa: F401

PROMPT = "Once upon a time, there was a little girl named Lily. She"


def reference(model, prompt: list[int], p: SamplingParams, eos: int) -> list[int]:
    """Greedy tokens under ``p``'s penalties, each step a full forward of every token."""
    tokens, out = list(prompt), []
    hf = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)
    for _ in range(p.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([tokens]))[0, -1].float()
        if p.repetition_penalty != 1.0:
            logits = hf(torch.tensor([tokens]), logits[None].clone())[0]
        for t, c in Counter(out).items():
            logits[t] -= c * p.frequency_penalty + p.presence_penalty
        for t, b in p.logit_bias.items():
            logits[t] += b
        if len(out) < p.min_tokens:
            logits[[eos, *p.stop_token_ids]] = float("-inf")
        t = int(logits.argmax())
        out.append(t)
        if t == eos or t in p.stop_token_ids:
            break
        tokens.append(t)
    return out


def generated(outs) -> list[int]:
    return [t.id for o in outs for t in o.tokens]


SETTINGS = [
    {},
    {"presence_penalty": 1.5},
    {"frequency_penalty": 0.7},
    {"frequency_penalty": -0.5, "presence_penalty": 0.3},
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.8},
    {"repetition_penalty": 1.2, "frequency_penalty": 0.4, "logit_bias": {13: 5.0, 50: -100}},
    {"logit_bias": {300: 8.0}},
]


def test_penalties_and_bias_equal_a_direct_computation(loaded):  # noqa: F811
    model, tok = loaded
    prompt = tok.encode(PROMPT)
    jobs = [(prompt, SamplingParams(max_tokens=24, temperature=0, **kw)) for kw in SETTINGS]
    engine = Engine(model, tok, max_batch=4)  # 8 rows through 4: mixed batches, slots reused
    outs = run_all(engine, jobs)
    want = [reference(model, prompt, p, tok.eos_id) for _, p in jobs]
    for kw, o, w in zip(SETTINGS, outs, want):
        assert generated(o) == w, kw
    assert len({tuple(w) for w in want}) >= 5  # the options change the text
    check_idle(engine)
    assert len(engine.logits_state._free) == engine.logits_state._size  # every slot back


def test_min_tokens_and_stop_token_ids(loaded):  # noqa: F811
    model, tok = loaded
    prompt = tok.encode(PROMPT)
    eos = tok.eos_id
    plain = run_all(Engine(model, tok), [(prompt, SamplingParams(max_tokens=12, temperature=0))])
    stop_at = generated(plain[0])[4]
    jobs = [
        # eos favoured by 100: generated at once, unless min_tokens holds it back
        (prompt, SamplingParams(max_tokens=12, temperature=0, logit_bias={eos: 100})),
        (prompt, SamplingParams(max_tokens=12, temperature=0, logit_bias={eos: 100}, min_tokens=5)),
        (prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_at])),
        (
            prompt,
            SamplingParams(
                max_tokens=12,
                temperature=0,
                stop_token_ids=[stop_at],
                min_tokens=8,
                logit_bias={stop_at: 50},
            ),
        ),  # fmt: skip
    ]
    engine = Engine(model, tok)
    outs = run_all(engine, jobs)
    assert generated(outs[0]) == [eos] and outs[0][-1].finish_reason == "stop"
    got = generated(outs[1])
    assert len(got) == 6 and got[-1] == eos and eos not in got[:5]
    assert got[:5] == reference(model, prompt, jobs[1][1], eos)[:5]
    got = generated(outs[2])
    assert got[-1] == stop_at and outs[2][-1].finish_reason == "stop"
    text = "".join(o.text for o in outs[2])
    assert text == tok.decode(got[:-1])  # the stop token is not in the text
    got = generated(outs[3])
    assert len(got) == 9 and got[-1] == stop_at and stop_at not in got[:8]
    check_idle(engine)


def test_sampled_penalties_are_reproducible_and_change_the_text(loaded):  # noqa: F811
    model, tok = loaded
    prompt = tok.encode(PROMPT)
    a = SamplingParams(max_tokens=30, temperature=1.0, seed=7)
    b = SamplingParams(max_tokens=30, temperature=1.0, seed=7, frequency_penalty=2.0)
    outs = run_all(Engine(model, tok, max_batch=2), [(prompt, a), (prompt, b), (prompt, b)])
    assert generated(outs[1]) == generated(outs[2]) != generated(outs[0])


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {600: 1}}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_engine_refuses_bad_values_naming_them(loaded, kw, name):  # noqa: F811
    model, tok = loaded
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match=name):
        engine.submit([1, 2], SamplingParams(max_tokens=2, **kw), lambda o: None)


def test_engine_refuses_penalties_with_a_draft(loaded):  # noqa: F811
    model, tok = loaded
    engine = Engine(model, tok, draft=model, draft_k=2)
    with pytest.raises(ValueError, match="presence_penalty.*speculative"):
        engine.submit([1, 2], SamplingParams(max_tokens=2, presence_penalty=1), lambda o: None)


# ------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def server(chat_ckpt):  # noqa: F811
    srv = ServerProcess("--ckpt", str(chat_ckpt), "--max-batch", "4", "--max-queue", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_server_penalties_equal_the_engine(server, client, loaded):  # noqa: F811
    model, tok = loaded
    kw = {"presence_penalty": 1.0, "frequency_penalty": 0.5}
    extra = {"repetition_penalty": 1.3, "min_tokens": 3, "stop_token_ids": [13]}
    r = client.completions.create(model="l2c-chat", prompt=PROMPT, max_tokens=20, temperature=0,
                                  logit_bias={"300": 5}, extra_body=extra, **kw)  # fmt: skip
    p = SamplingParams(max_tokens=20, temperature=0, logit_bias={300: 5.0}, **kw, **extra)
    want = reference(model, tok.encode(PROMPT), p, tok.eos_id)
    if want[-1] in (tok.eos_id, 13):
        want = want[:-1]
    assert r.choices[0].text == tok.decode(want)


def test_server_n_choices(server, client):
    r = client.completions.create(model="l2c-chat", prompt=["Once", "The dog"], max_tokens=12,
                                  temperature=1.0, seed=3, n=3)  # fmt: skip
    assert [c.index for c in r.choices] == list(range(6))
    assert len({c.text for c in r.choices[:3]}) > 1  # each choice samples on its own
    again = client.completions.create(model="l2c-chat", prompt=["Once", "The dog"], max_tokens=12,
                                      temperature=1.0, seed=3, n=3)  # fmt: skip
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    greedy = client.chat.completions.create(
        model="l2c-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0, n=2,
    )  # fmt: skip
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    stream = client.chat.completions.create(
        model="l2c-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
        temperature=0, n=2, stream=True,
    )  # fmt: skip
    texts, finished = ["", ""], set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and texts == [greedy.choices[0].message.content] * 2


BAD = [
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),  # more choices than --max-queue 8
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "0"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"50": 101}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"512": 1}}, "logit_bias"),  # vocab 512
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 20}, "min_tokens"),  # beyond max_tokens
    ({"stop_token_ids": [512]}, "stop_token_ids"),
]


@pytest.mark.parametrize("kw, param", BAD)
def test_server_bad_values_are_a_400_naming_them(server, kw, param):
    body = {"prompt": "Once", "max_tokens": 8, **kw}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == param, r.text
