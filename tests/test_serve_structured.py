"""Structured output: ``response_format`` (json_object, json_schema), ``guided_regex`` and
``guided_grammar`` decode under xgrammar's token masks, each row of a batch with its own
matcher (or none): the output parses and validates, on a small trained model and on random
weights, through the ``openai`` client's ``chat.completions.parse``; an unconstrained row in
the same batch is unaffected; what cannot be compiled is a 400 naming it."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from llamaforge.serve.engine import Engine, SamplingParams
from llamaforge.serve.grammar import GrammarCompiler, GrammarError, GrammarSpec

from .test_serve import ServerProcess, chat_ckpt  # noqa: F401  (fixtures)
from .test_serve_engine import _one_thread, check_idle, l2c_ckpt, loaded, run_all  # noqa: F401


class Pet(BaseModel):  # short: the trained model's context is 128 tokens
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=99)
    kind: Literal["cat", "dog", "bird"]
    friendly: bool
    tags: list[Annotated[str, Field(max_length=5)]] = Field(max_length=2)


SCHEMA = Pet.model_json_schema()


def text_of(outs) -> str:
    return "".join(o.text for o in outs)


def test_engine_rows_follow_their_own_grammar(loaded):  # noqa: F811
    model, tok = loaded
    compiler = GrammarCompiler(tok, model.args.vocab_size)
    pet = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    code = compiler.compile(GrammarSpec("regex", r"[A-Z]{2}-[0-9]{3}", "guided_regex"))
    yes_no = compiler.compile(GrammarSpec("grammar", 'root ::= "yes" | "no"', "guided_grammar"))
    obj = compiler.compile(GrammarSpec("json_object"))
    prompt = tok.encode("Once")
    plain = SamplingParams(max_tokens=20, temperature=0)
    alone = run_all(Engine(model, tok), [(prompt, plain)])
    jobs = [(prompt, SamplingParams(max_tokens=100, temperature=1.0, seed=s, grammar=pet))
            for s in range(8)]  # fmt: skip
    jobs += [
        (prompt, plain),
        (prompt, SamplingParams(max_tokens=20, temperature=0, grammar=code)),
        (prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=1, grammar=yes_no)),
        (prompt, SamplingParams(max_tokens=100, temperature=0, grammar=obj)),
    ]
    engine = Engine(model, tok, max_batch=8)
    outs = run_all(engine, jobs)
    for o in outs[:8]:
        assert o[-1].finish_reason == "stop", text_of(o)
        Pet.model_validate_json(text_of(o))
    assert text_of(outs[8]) == text_of(alone[0])  # the unconstrained row is unaffected
    assert (
        re.fullmatch(r"[A-Z]{2}-[0-9]{3}", text_of(outs[9])) and outs[9][-1].finish_reason == "stop"
    )
    assert text_of(outs[10]) in ("yes", "no")
    if outs[11][-1].finish_reason == "stop":
        assert isinstance(json.loads(text_of(outs[11])), dict)
    check_idle(engine)


def test_grammar_with_a_draft_is_refused(loaded):  # noqa: F811
    model, tok = loaded
    grammar = GrammarCompiler(tok, model.args.vocab_size).compile(GrammarSpec("json_object"))
    engine = Engine(model, tok, draft=model, draft_k=2)
    with pytest.raises(ValueError, match="response_format.*speculative"):
        engine.submit([1, 2], SamplingParams(max_tokens=4, grammar=grammar), lambda o: None)


@pytest.mark.parametrize(
    "spec, words",
    [
        (
            GrammarSpec("json_schema", json.dumps({"patternProperties": {"a": {}}})),
            "patternProperties",
        ),
        (GrammarSpec("json_schema", json.dumps({"type": "object", "not": {}})), "'not'"),
        (GrammarSpec("regex", "[a-", "guided_regex"), "guided_regex"),
        (GrammarSpec("grammar", "root ::= undefined_rule", "guided_grammar"), "guided_grammar"),
    ],
)
def test_what_cannot_compile_is_named(loaded, spec, words):  # noqa: F811
    model, tok = loaded
    with pytest.raises(GrammarError, match=re.escape(words)):
        GrammarCompiler(tok, model.args.vocab_size).compile(spec)


# ------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def server(chat_ckpt):  # noqa: F811
    # Llama 2's template: Alpaca's preamble would leave the JSON too little of the context
    srv = ServerProcess("--ckpt", str(chat_ckpt), "--max-batch", "4", "--template", "llama2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def parse(client, model: str, seed: int):
    return client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        response_format=Pet,
        temperature=1.0,
        seed=seed,
    )


def test_openai_parse_validates_on_a_trained_model(server, client):
    for seed in range(3):
        r = parse(client, "l2c-chat", seed)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(r.choices[0].message.parsed, Pet)


def test_openai_parse_validates_on_random_weights(save_tiny):
    ckpt = save_tiny(seed=3, max_seq_len=512)
    srv = ServerProcess("--ckpt", str(ckpt), "--template", "alpaca", "--model-name", "tiny")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        for seed in range(2):
            assert isinstance(parse(client, "tiny", seed).choices[0].message.parsed, Pet)
    finally:
        srv.stop()


def test_completions_json_object_regex_and_streams(server, client):
    regex = {"guided_regex": "(red|green|blue) [0-9]{2}"}
    r = client.completions.create(model="l2c-chat", prompt="Once", max_tokens=60, temperature=0,
                                  extra_body=regex)  # fmt: skip
    assert re.fullmatch(r"(red|green|blue) [0-9]{2}", r.choices[0].text)
    schema = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    stream = client.completions.create(model="l2c-chat", prompt="Once", max_tokens=100,
                                       temperature=1.0, seed=4, n=2, stream=True,
                                       extra_body={"response_format": schema})  # fmt: skip
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    for t in texts:
        Pet.model_validate_json(t)
    r = client.chat.completions.create(
        model="l2c-chat", messages=[{"role": "user", "content": "JSON please"}], max_tokens=100,
        temperature=0.7, seed=1, response_format={"type": "json_object"},
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


BAD = [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
        "response_format.json_schema.schema",
    ),  # fmt: skip
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"patternProperties": {}}},
            }
        },
        "response_format",
    ),  # fmt: skip
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "root ::= nothing_here"}, "guided_grammar"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
]


@pytest.mark.parametrize("kw, param", BAD)
def test_bad_formats_are_a_400_naming_them(server, client, kw, param):
    for path, body in (
        ("/v1/completions", {"prompt": "Once", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}),
    ):
        r = httpx.post(f"{server.url}{path}", json={**body, **kw}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    assert client.completions.create(model="l2c-chat", prompt="Once", max_tokens=2).choices
