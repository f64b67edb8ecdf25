"""Speculative decoding in the server (``Engine(draft=...)``, ``serve --draft``): with a
draft that is the model itself, its int8 copy, a perturbed copy or an unrelated small model,
greedy text, tokens, finish reasons and logprobs equal the engine's without a draft, in a
busy batch over the paged cache, with stop strings, with max_tokens or the context ending in the
middle of an accepted run, and with a request arriving mid-stream; the acceptance counters
reach /metrics and /health of a real server process."""

from __future__ import annotations

import copy
import re
import time

import httpx
import openai
import pytest
import torch

import llamaforge
from llamaforge.cli.main import main
from llamaforge.inference.quantize import quantize_int8
from llamaforge.model import Transformer
from llamaforge.serve.engine import Engine, Output, SamplingParams

from .conftest import tiny_model
from .test_serve import ServerProcess
from .test_serve_engine import (  # noqa: F401
    PROMPTS,
    _one_thread,
    check_idle,
    l2c_ckpt,
    loaded,
    run_all,
)


def perturbed(model: Transformer, scale: float = 0.05) -> Transformer:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return out


@pytest.fixture(scope="module")
def drafts(loaded):  # noqa: F811
    model, _ = loaded
    return {
        "itself": model,
        "int8": quantize_int8(copy.deepcopy(model)),
        "perturbed": perturbed(model),
        # another model with the same vocabulary and a shorter context (64 < 128)
        "unrelated": tiny_model(model.args.vocab_size, seed=3),
    }


class Summary:
    """What must not change: the text, the token ids, the finish, the usage, and the tokens'
    logprobs (to 1e-4: the model scores k+1 positions at once instead of one)."""

    def __init__(self, outs: list[Output]) -> None:
        tokens = [t for o in outs for t in o.tokens]
        last = outs[-1]
        self.text = "".join(o.text for o in outs)
        self.exact = (self.text, [t.id for t in tokens], last.finish_reason,
                      last.completion_tokens, last.error)  # fmt: skip
        self.logprobs = [t.logprob for t in tokens]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Summary)
            and self.exact == other.exact
            and all(
                (a is None and b is None) or (a is not None and b is not None and abs(a - b) < 1e-4)
                for a, b in zip(self.logprobs, other.logprobs)
            )
        )

    def __repr__(self) -> str:
        return f"Summary{self.exact}"


def summary(outs: list[Output]) -> Summary:
    return Summary(outs)


def greedy_jobs(tok, stop: str | None = None) -> list[tuple[list[int], SamplingParams]]:
    lengths = [30, 7, 20, 45, 3, 25]
    jobs = [
        (tok.encode(p), SamplingParams(max_tokens=n, temperature=0.0))
        for p, n in zip(PROMPTS, lengths)
    ]
    jobs[1][1].logprobs = 2
    if stop is not None:
        jobs[0][1].stop = [stop]
    return jobs


def test_greedy_with_any_draft_equals_no_draft(loaded, drafts):  # noqa: F811
    model, tok = loaded
    # 3 rows for 6 requests, prefill chunks of 5 tokens: waiting, block reuse (the draft's
    # paged cache follows the same block tables), rows retiring mid-step
    plain = Engine(model, tok, max_batch=3, prefill_chunk=5)
    ref_texts = [summary(o) for o in run_all(plain, greedy_jobs(tok))]
    first = ref_texts[0].text
    stop = first[10:13]  # a stop string the first text reaches
    jobs = greedy_jobs(tok, stop)
    ref = [summary(o) for o in run_all(plain, jobs)]
    assert ref[0].exact[2] == "stop" and ref[0].text == first[: first.find(stop)]
    assert ref[1].logprobs and all(lp is not None for lp in ref[1].logprobs)
    rates = {}
    # (draft, k, speculating only with at most this many rows decoding: others plain)
    runs = [(name, k, None) for name in drafts for k in (1, 4)]
    runs += [("itself", 3, 1), ("perturbed", 3, 1)]
    for name, k, most in runs:
        engine = Engine(
            model, tok, max_batch=3, prefill_chunk=5, draft=drafts[name], draft_k=k,
            draft_max_batch=most,
        )  # fmt: skip
        outs = run_all(engine, greedy_jobs(tok, stop))
        assert [summary(o) for o in outs] == ref, (name, k, most)
        assert all(stop not in x.text for x in outs[0])  # no cut piece was ever streamed
        check_idle(engine)
        s = engine.stats
        assert s.spec_drafted > 0 and 0 <= s.spec_accepted <= s.spec_drafted
        rates[name, k, most] = s.acceptance_rate
    # the model as its own draft is always right, also when its cache followed plain steps
    assert rates["itself", 1, None] == rates["itself", 4, None] == rates["itself", 3, 1] == 1.0
    assert rates["int8", 4, None] > 0.5 and rates["perturbed", 4, None] > 0.0, rates
    assert rates["unrelated", 4, None] < 1.0, rates


def test_limits_inside_an_accepted_run(loaded):  # noqa: F811
    """A draft equal to the model is always right, so each step accepts k tokens: max_tokens
    and the end of the context fall inside accepted runs."""
    model, tok = loaded
    plain = Engine(model, tok, max_batch=2)
    spec = Engine(model, tok, max_batch=2, draft=model, draft_k=4)
    ids = tok.encode("Once upon a time")
    long = (tok.encode(" ".join(PROMPTS)) * 3)[:121]  # 7 positions left of 128
    jobs = [(ids, SamplingParams(max_tokens=n, temperature=0.0)) for n in (1, 2, 3, 6, 8)]
    jobs += [(long, SamplingParams(max_tokens=7, temperature=0.0))]
    for job in jobs:
        (want,) = run_all(plain, [job])
        (got,) = run_all(spec, [job])
        assert summary(got) == summary(want), job[1]
    assert spec.stats.acceptance_rate == 1.0
    check_idle(spec)


def test_request_arriving_mid_stream(loaded, drafts):  # noqa: F811
    model, tok = loaded
    a = (tok.encode(PROMPTS[2]), SamplingParams(max_tokens=40, temperature=0.0))
    b = (tok.encode(PROMPTS[4]), SamplingParams(max_tokens=30, temperature=0.0))
    plain = Engine(model, tok, max_batch=2, prefill_chunk=4)
    want = [summary(run_all(plain, [job])[0]) for job in (a, b)]
    engine = Engine(model, tok, max_batch=2, prefill_chunk=4, draft=drafts["perturbed"])
    outs: list[list[Output]] = [[], []]
    engine.submit(*a, outs[0].append)
    for _ in range(8):  # a is prefilled and decoding
        engine._drain()
        engine.step()
    assert outs[0] and not outs[0][-1].finished
    engine.submit(*b, outs[1].append)  # b's prefill chunks interleave with a's decoding
    for _ in range(1000):
        engine._drain()
        if all(o and o[-1].finished for o in outs):
            break
        engine.step()
    assert [summary(o) for o in outs] == want
    check_idle(engine)


def test_sampling_with_a_draft(loaded, drafts):  # noqa: F811
    """Sampled requests speculate with the rejection rule beside greedy ones: seeded ones
    repeat, and the greedy one's text is still the plain engine's."""
    model, tok = loaded
    ids = tok.encode("The little dog")
    greedy = (tok.encode(PROMPTS[0]), SamplingParams(max_tokens=30, temperature=0.0))
    p = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=7)
    q = SamplingParams(max_tokens=30, temperature=0.8, seed=8)
    (want,) = run_all(Engine(model, tok), [greedy])
    engine = Engine(model, tok, max_batch=4, draft=drafts["perturbed"], draft_k=3)
    first = run_all(engine, [(ids, p), greedy, (ids, q)])
    again = run_all(engine, [(ids, p), greedy, (ids, q)])
    assert [summary(o) for o in first] == [summary(o) for o in again]
    assert summary(first[1]) == summary(want)
    assert all(o[-1].finish_reason and not o[-1].error for o in first)
    assert 0 < engine.stats.spec_accepted < engine.stats.spec_drafted
    check_idle(engine)


def test_cancel_and_refusals(loaded):  # noqa: F811
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, draft=model, draft_k=2)
    outs: list[Output] = []
    rid = engine.submit(tok.encode("Once upon a time"), SamplingParams(60, 0.0), outs.append)
    engine._drain()
    for _ in range(3):
        engine.step()
    assert engine.stats.running == 1 and len([t for o in outs for t in o.tokens]) > 3
    engine.cancel(rid)
    engine._drain()
    engine.step()
    check_idle(engine)
    other = tiny_model(300)
    with pytest.raises(ValueError, match="vocab_size 300 differs from the model's 512"):
        Engine(model, tok, draft=other)
    with pytest.raises(ValueError, match="draft_k 0"):
        Engine(model, tok, draft=model, draft_k=0)


# ------------------------------------------------------------------ a real server process


def test_serve_draft_process(l2c_ckpt, loaded, tmp_path):  # noqa: F811
    model, tok = loaded
    draft_dir = llamaforge.save(perturbed(model), tok, tmp_path / "draft")
    plain = ServerProcess("--ckpt", str(l2c_ckpt), "--max-batch", "2")
    spec = ServerProcess(
        "--ckpt", str(l2c_ckpt), "--max-batch", "2", "--draft", str(draft_dir), "--draft-k", "3"
    )
    try:
        texts = []
        for srv in (plain, spec):
            c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
            kw = dict(model="aidreams260K", max_tokens=40, temperature=0)
            r = c.completions.create(prompt=PROMPTS, **kw)
            streamed = "".join(
                ch.choices[0].text
                for ch in c.completions.create(prompt=PROMPTS[2], stream=True, **kw)
            )
            texts.append(([ch.text for ch in r.choices], streamed, r.usage.completion_tokens))
        assert texts[0] == texts[1]
        metrics = httpx.get(f"{spec.url}/metrics").text
        drafted = re.search(r"^llamaforge_spec_draft_tokens_total (\S+)$", metrics, re.M)
        accepted = re.search(r"^llamaforge_spec_accepted_tokens_total (\S+)$", metrics, re.M)
        assert drafted and accepted, metrics
        assert 0 < float(accepted.group(1)) <= float(drafted.group(1))
        health = httpx.get(f"{spec.url}/health").json()["speculative"]
        assert health["draft_k"] == 3 and health["draft_tokens"] == float(drafted.group(1))
        assert "llamaforge_spec" not in httpx.get(f"{plain.url}/metrics").text
    finally:
        plain.stop()
        spec.stop()
    for _ in range(50):  # the stderr reader's last lines
        if "stopped" in "".join(spec.stderr):
            break
        time.sleep(0.1)
    line = r"speculative decoding: \d+/\d+ drafted tokens accepted \(\S+%\), draft_k=3"
    assert re.search(line, "".join(spec.stderr)), spec.stderr


def test_cli_draft_refusals(l2c_ckpt, tmp_path, capsys):  # noqa: F811
    other = llamaforge.save(tiny_model(300), None, tmp_path / "other-vocab")
    assert main(["serve", "--ckpt", str(l2c_ckpt), "--draft", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--draft {other}" in err and "vocab_size 300 differs from the model's 512" in err
    assert main(["serve", "--ckpt", str(l2c_ckpt), "--draft", str(other), "--draft-k", "0"]) == 2
    assert "--draft-k 0" in capsys.readouterr().err
    argv = ["serve", "--ckpt", str(l2c_ckpt), "--draft", str(l2c_ckpt), "--draft-max-batch", "0"]
    assert main(argv) == 2
    assert "--draft-max-batch 0" in capsys.readouterr().err
