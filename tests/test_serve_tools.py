"""Tool calls: the hermes-format parser (whole and streamed answers, unfinished and invalid
calls), the grammar of a required or named tool_choice, and the `openai` client's
tool-calling flow against a real `llamaforge serve` with the hermes template (random
weights: a constrained answer is always a valid call of the named function)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import llamaforge
from llamaforge.chat_templates import load_template
from llamaforge.serve.tools import (
    AnswerReader,
    ToolCallParser,
    ToolChoice,
    ToolError,
    answer_message,
    parse_tool_calls,
    tool_grammar,
)
from llamaforge.tokenizer import Tokenizer

from .conftest import tiny_model
from .test_serve import ServerProcess

xgr = pytest.importorskip("xgrammar")

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {  # bounded: a random model's constrained call always ends
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}, "metric": {"type": "boolean"}},
        "required": ["city", "metric"],
    },
}
NOW = {"name": "now", "description": "The time."}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": NOW}]


def call_text(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


PARIS = call_text("get_weather", '{"city": "Paris", "metric": true}')


def streamed(text: str, names=None, step: int = 1) -> tuple[str, list, int]:
    """``text`` fed to an AnswerReader ``step`` characters at a time: the content, the
    calls (as OpenAI's client accumulates deltas) and the number of calls."""
    reader = AnswerReader(names)
    deltas = []
    for i in range(0, len(text), step):
        deltas += reader.deltas(text[i : i + step])
    deltas += reader.deltas("", finished=True)
    content = "".join(d.get("content", "") for d in deltas)
    calls: list[dict] = []
    for d in deltas:
        for c in d.get("tool_calls", []):
            if c["index"] == len(calls):
                calls.append({"id": c["id"], "name": c["function"]["name"], "arguments": ""})
            calls[c["index"]]["arguments"] += c["function"]["arguments"]
    return content, calls, reader.calls


# ----------------------------------------------------------------------------- parsing


def test_a_complete_call():
    content, calls = parse_tool_calls(PARIS, ["get_weather"])
    assert content == "" and len(calls) == 1
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris", "metric": True}
    assert calls[0].id.startswith("call_")
    msg = answer_message(PARIS, ["get_weather"])
    assert msg["content"] is None and msg["tool_calls"][0]["type"] == "function"


def test_text_then_several_calls():
    text = "Let me look.\n" + PARIS + "\n" + call_text("now", "{}") + "\n"
    content, calls = parse_tool_calls(text, ["get_weather", "now"])
    assert content == "Let me look."
    assert [c.name for c in calls] == ["get_weather", "now"] and calls[1].arguments == "{}"
    for step in (1, 3, 7, len(text)):
        s_content, s_calls, n = streamed(text, ["get_weather", "now"], step)
        assert s_content == content and n == 2
        assert [(c["name"], c["arguments"]) for c in s_calls] == [
            (c.name, c.arguments) for c in calls
        ]


def test_an_unfinished_call_is_content():
    """Cut at max_tokens inside a block: no half-parsed call, the text is content."""
    for cut in (3, len("<tool_call>"), len(PARIS) // 2, len(PARIS) - 1):
        text = "Sure. " + PARIS[:cut]
        content, calls = parse_tool_calls(text, ["get_weather"])
        assert calls == [] and content == text
        assert streamed(text, ["get_weather"])[:2] == (text, [])


def test_invalid_json_or_unknown_function_is_content():
    for block in (
        call_text("get_weather", '{"city": "Par'),  # invalid JSON inside a closed block
        call_text("launch", "{}"),  # not among the tools
        "<tool_call>\n[1, 2]\n</tool_call>",
        call_text("now", "[1]"),  # arguments not an object
        "<tool_call>\n" + "[" * 100_000 + "\n</tool_call>",  # nested too deeply
    ):
        content, calls = parse_tool_calls("A " + block, ["get_weather", "now"])
        assert calls == [] and content == "A " + block
        assert streamed("A " + block, ["get_weather", "now"], 5)[:2] == ("A " + block, [])
    # arguments given as a JSON string of an object are a call
    (call,) = parse_tool_calls(call_text("now", json.dumps('{"a": 1}')), ["now"])[1]
    assert call.arguments == '{"a": 1}'


def test_what_may_start_a_marker_is_held_back():
    parser = ToolCallParser(["now"])
    assert [p.content for p in parser.feed("Hi <tool")] == ["Hi"]  # " <tool" held
    assert [p.content for p in parser.feed("box>")] == [" <toolbox>"]
    assert parser.feed("\n\n<tool_call>") == []
    assert parser.feed('\n{"name": "now", "arguments": {}}\n</tool_') == []
    (piece,) = parser.feed("call>")
    assert piece.call is not None and piece.call.name == "now"
    assert parser.feed("\n  ") == [] and parser.finish() == []


def test_the_template_renders_what_the_parser_reads():
    """An assistant message the server returned, sent back, renders as the model wrote it."""
    msg = {"role": "assistant", **answer_message("Looking.\n" + PARIS, ["get_weather"])}
    text = load_template("hermes").render([{"role": "user", "content": "?"}, msg])
    assert text.endswith("<|im_start|>assistant\nLooking.\n" + PARIS + "<|im_end|>\n")


# ----------------------------------------------------------------------------- tool_choice


def test_tool_choice():
    assert ToolChoice.of(None, None) is None and ToolChoice.of([], "auto") is None
    auto = ToolChoice.of(TOOLS, None)
    assert auto.parse and auto.rendered == TOOLS and auto.spec() is None
    none = ToolChoice.of(TOOLS, "none")
    assert not none.parse and none.rendered is None and none.spec() is None
    required = ToolChoice.of(TOOLS, "required")
    assert [f["name"] for f in required.forced] == ["get_weather", "now"]
    named = ToolChoice.of(TOOLS, {"type": "function", "function": {"name": "now"}})
    assert [f["name"] for f in named.forced] == ["now"]
    assert named.spec().kind == "grammar" and named.spec().param == "tool_choice"
    with pytest.raises(ToolError, match=r"tool_choice: the function \"launch\" is not among"):
        ToolChoice.of(TOOLS, {"type": "function", "function": {"name": "launch"}})
    with pytest.raises(ToolError, match='tool_choice: "required" needs tools'):
        ToolChoice.of([], "required")
    bad = [{"type": "function", "function": {**NOW, "parameters": {"not": {}}}}]
    with pytest.raises(ToolError, match="'not'"):
        ToolChoice.of(bad, "required").spec()


def test_the_grammar_is_one_call_of_the_forced_functions():
    from xgrammar.testing import _is_grammar_accept_string as accepts

    both = xgr.Grammar.from_ebnf(tool_grammar([WEATHER, NOW]))
    now = xgr.Grammar.from_ebnf(tool_grammar([NOW]))
    assert accepts(both, PARIS) and accepts(both, call_text("now", "{}"))
    assert accepts(now, call_text("now", "{}")) and not accepts(now, PARIS)
    for wrong in (
        call_text("get_weather", '{"city": "Rome", "metric": true}'),  # not in the enum
        call_text("get_weather", '{"city": "Paris"}'),  # a required argument missing
        call_text("launch", "{}"),
        "Sure. " + PARIS,  # no text before the call
        PARIS + "\n" + PARIS,  # one call
    ):
        assert not accepts(both, wrong), wrong


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def tool_ckpt(meta_tokenizer_path, tmp_path_factory):
    tok = Tokenizer(meta_tokenizer_path)
    model = tiny_model(tok.vocab_size, max_seq_len=1024)
    return llamaforge.save(model, tok, tmp_path_factory.mktemp("tools") / "tools")


@pytest.fixture(scope="module")
def server(tool_ckpt):
    srv = ServerProcess("--ckpt", str(tool_ckpt), "--template", "hermes", "--max-batch", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_weather_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "metric"} and args["city"] in ("Paris", "Oslo")
    assert isinstance(args["metric"], bool)
    return args


def test_named_tool_call_then_its_result(client):
    """The openai client's flow: a forced call of get_weather (valid for its schema on
    random weights), its result sent back as a tool message, then an answer."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model="tools", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=200,
        temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    check_weather_call(call)
    messages = [
        *USER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model="tools", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)


def test_streamed_required_call_equals_the_whole_one(client):
    kw = dict(model="tools", messages=USER, tools=TOOLS, tool_choice="required",
              max_tokens=200, temperature=0)  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    (call,) = whole.message.tool_calls
    assert call.function.name in ("get_weather", "now")
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or []:
            entry = calls.setdefault(c.index, {"id": c.id, "name": "", "arguments": ""})
            entry["name"] += (c.function.name or "") if c.function else ""
            entry["arguments"] += (c.function.arguments or "") if c.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments)
    ]
    assert calls[0]["id"].startswith("call_")


def test_a_call_cut_at_max_tokens_is_length_and_content(client):
    kw = dict(model="tools", messages=USER, tools=TOOLS, max_tokens=24, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("<tool_call>")
    streamed_text, finish, saw_calls = "", None, False
    for chunk in client.chat.completions.create(**kw, stream=True):
        delta = chunk.choices[0].delta
        streamed_text += delta.content or ""
        saw_calls = saw_calls or bool(delta.tool_calls)
        finish = chunk.choices[0].finish_reason or finish
    assert (streamed_text, finish, saw_calls) == (choice.message.content, "length", False)


def test_auto_answers_parse_or_stay_content(client):
    """tool_choice auto on random weights: whatever the text, a valid response (the calls,
    if any, of declared functions), streamed or not; n choices each read on their own."""
    r = client.chat.completions.create(
        model="tools", messages=USER, tools=TOOLS, max_tokens=16, temperature=1, seed=3, n=2
    )
    for choice in r.choices:
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        for call in choice.message.tool_calls or []:
            assert call.function.name in ("get_weather", "now")
    stream = client.chat.completions.create(
        model="tools", messages=USER, tools=TOOLS, max_tokens=16, temperature=1, seed=3,
        n=2, stream=True,
    )  # fmt: skip
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content or "" for c in r.choices]


def test_tool_requests_refused(server):
    def post(body: dict) -> dict:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    base = {"messages": USER, "max_tokens": 4}
    named = {"type": "function", "function": {"name": "launch"}}
    assert post({**base, "tools": TOOLS, "tool_choice": named})["param"] == "tool_choice"
    assert post({**base, "tool_choice": "required"})["param"] == "tool_choice"
    twice = [TOOLS[0], TOOLS[0]]
    assert "given twice" in post({**base, "tools": twice})["message"]
    bad_name = [{"type": "function", "function": {"name": "no spaces"}}]
    assert post({**base, "tools": bad_name})["param"] == "tools.0.function.name"
    not_schema = [{"type": "function", "function": {**NOW, "parameters": {"not": {}}}}]
    err = post({**base, "tools": not_schema, "tool_choice": "required"})
    assert err["param"] == "tools" and "'not'" in err["message"]
    both = {**base, "tools": TOOLS, "tool_choice": "required"}
    err = post({**both, "response_format": {"type": "json_object"}})
    assert err["param"] == "tool_choice"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
