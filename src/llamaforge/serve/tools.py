"""Tool calls: OpenAI's ``tools`` and ``tool_choice`` over chat templates that take tools.

The model calls a function in the format of the built-in ``hermes`` template
(`llamaforge.chat_templates.HERMES`): ``<tool_call>\\n{"name": ..., "arguments": {...}}
\\n</tool_call>``, as many as it likes, after some text or none. `ToolCallParser` reads the
generated text, whole or as it streams, into content and `ToolCall`s:

- a block is a call when it is closed (``</tool_call>``) and holds a JSON object with a
  ``name`` among the request's functions and ``arguments`` a JSON object (or a string that
  is the JSON of one); ``arguments`` is then passed on as compact JSON text (OpenAI's
  ``function.arguments`` is a string). Any other block (invalid JSON, an unknown function)
  stays in the content as the model wrote it;
- a block the model has not closed when the answer ends (at ``max_tokens``: finish_reason
  "length") is content too: no half-parsed call is ever returned;
- while streaming, text that may be the start of ``<tool_call>`` is held back until it is
  known not to be, and a call is sent when its block closes (its ``id``, ``type`` and name in
  one delta, its arguments in the next, as OpenAI's deltas carry them): a call already sent
  is never taken back;
- whitespace between the content and a call, between calls and after the last one is not
  content (the template writes a newline there); around a block that is not a call, it is.

``tool_choice`` ("auto" when tools are given): ``"auto"`` renders the tools and parses the
answer; ``"none"`` renders no tools (the model is not told of them) and parses nothing:
the answer is content; ``"required"`` and a named function (``{"type": "function",
"function": {"name": ...}}``) render the tools and constrain the answer, with `tool_grammar`,
to exactly one call of one of the functions (the named one), its arguments valid against the
function's ``parameters`` schema. An answer that holds a call ends with finish_reason
"tool_calls" (not when it was cut at ``max_tokens``: that stays "length").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamaforge.serve.grammar import GrammarError, GrammarSpec, check_schema

__all__ = [
    "CLOSE",
    "OPEN",
    "AnswerReader",
    "ToolCall",
    "ToolCallParser",
    "ToolChoice",
    "ToolError",
    "answer_message",
    "call_deltas",
    "finish_reason",
    "parse_tool_calls",
    "tool_grammar",
]

OPEN, CLOSE = "<tool_call>", "</tool_call>"
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolError(ValueError):
    """Tools or a tool choice that cannot be used (the message names the field)."""


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made: ``arguments`` is JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Piece:
    """What the parser releases: content text, or a call."""

    content: str = ""
    call: ToolCall | None = None


def _as_call(block: str, names: frozenset[str] | None) -> ToolCall | None:
    """The call a closed block holds, or None when it holds none (see the module doc)."""
    try:
        obj = json.loads(block)
    except (ValueError, RecursionError):  # invalid JSON, nested too deeply, huge numbers
        return None
    if not isinstance(obj, dict):
        return None
    name, args = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or (names is not None and name not in names):
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _held(text: str, marker: str) -> int:
    """Where the longest end of ``text`` that starts ``marker`` begins (``len(text)`` when
    none does)."""
    for start in range(max(0, len(text) - len(marker) + 1), len(text)):
        if marker.startswith(text[start:]):
            return start
    return len(text)


class ToolCallParser:
    """Reads an answer into content and calls, as it streams (`feed` each new piece of text,
    then `finish`) or whole (`parse_tool_calls`). ``names``: the functions the request
    declared (a call of any other is content); None accepts any name."""

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self.names = None if names is None else frozenset(names)
        self.buf = ""  # text not yet released
        self.inside = False  # in a block: after <tool_call>, before </tool_call>
        self.gap = ""  # the whitespace before the block: content unless the block is a call
        self.after_call = False  # the last thing released was a call
        self.calls = 0

    def _content(self, text: str) -> list[Piece]:
        if self.after_call:
            text = text.lstrip()
        if not text:
            return []
        self.after_call = False
        return [Piece(content=text)]

    def feed(self, text: str) -> list[Piece]:
        """What ``text`` (the answer's next piece) lets go of, in order."""
        self.buf += text
        out: list[Piece] = []
        while True:
            if self.inside:
                end = self.buf.find(CLOSE)
                if end < 0:
                    return out
                block, self.buf = self.buf[:end], self.buf[end + len(CLOSE) :]
                self.inside = False
                call = _as_call(block, self.names)
                if call is None:
                    out += self._content(self.gap + OPEN + block + CLOSE)
                else:
                    self.calls += 1
                    self.after_call = True
                    out.append(Piece(call=call))
                continue
            start = self.buf.find(OPEN)
            if start < 0:  # hold what may start a marker, and the whitespace before it
                keep = _held(self.buf, OPEN)
                keep = len(self.buf[:keep].rstrip())
                out += self._content(self.buf[:keep])
                self.buf = self.buf[keep:]
                return out
            before = self.buf[:start]
            out += self._content(before.rstrip())
            self.gap = before[len(before.rstrip()) :]
            self.buf, self.inside = self.buf[start + len(OPEN) :], True

    def finish(self) -> list[Piece]:
        """The rest, at the end of the answer: held text, and a block left open, as content."""
        rest = (self.gap + OPEN if self.inside else "") + self.buf
        self.buf, self.inside = "", False
        return self._content(rest)


def parse_tool_calls(text: str, names: Iterable[str] | None = None) -> tuple[str, list[ToolCall]]:
    """A whole answer's content (the text that is not a call) and calls."""
    parser = ToolCallParser(names)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p.content for p in pieces)
    return content, [p.call for p in pieces if p.call is not None]


def finish_reason(reason: str | None, calls: int) -> str | None:
    """OpenAI's finish_reason of an answer that made ``calls`` calls: "tool_calls" for one
    that ended on its own ("stop"); "length" (cut at max_tokens) stays."""
    return "tool_calls" if reason == "stop" and calls else reason


def call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """The streamed deltas of the answer's ``index``-th call: id, type and name with empty
    arguments, then the arguments."""
    head = {"index": index, "id": call.id, "type": "function"}
    return [
        {"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]},
        {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]},
    ]


class AnswerReader:
    """One answer (a choice) read for calls as it streams: `deltas` of each new piece of
    text (OpenAI's chat deltas: ``{"content": ...}`` or ``{"tool_calls": [...]}``), then
    `finish_reason`."""

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self.parser = ToolCallParser(names)
        self.calls = 0

    def deltas(self, text: str, finished: bool = False) -> list[dict[str, Any]]:
        pieces = self.parser.feed(text) + (self.parser.finish() if finished else [])
        out: list[dict[str, Any]] = []
        for p in pieces:
            if p.call is not None:
                out += call_deltas(self.calls, p.call)
                self.calls += 1
            elif p.content:
                out.append({"content": p.content})
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return finish_reason(reason, self.calls)


def answer_message(text: str, names: Iterable[str] | None = None) -> dict[str, Any]:
    """A whole answer as an assistant message's ``content`` and ``tool_calls`` (present only
    when it made calls; ``content`` is then None when no text is left)."""
    content, calls = parse_tool_calls(text, names)
    if not calls:
        return {"content": content}
    return {"content": content or None, "tool_calls": [c.openai() for c in calls]}


# ----------------------------------------------------------------------------- the request


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    fn = tool.get("function")
    return fn if isinstance(fn, Mapping) else {}


@dataclass(frozen=True)
class ToolChoice:
    """A request's tools and what to do with them: ``rendered`` the tools the template sees
    (None: none), ``parse`` whether the answer is read for calls, ``names`` the functions
    a call may name, ``forced`` the functions the answer must call one of (``required``: all,
    a named choice: that one; empty: not constrained)."""

    rendered: list[dict[str, Any]] | None
    parse: bool
    names: frozenset[str]
    forced: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def of(cls, tools: Sequence[Mapping[str, Any]] | None, choice: Any) -> ToolChoice | None:
        """From a request's ``tools`` (OpenAI's ``[{"type": "function", "function": {...}}]``,
        already checked) and ``tool_choice`` (``"none"``, ``"auto"``, ``"required"``, a
        named function or None); None when the request uses no tools."""
        if not tools:
            if choice in (None, "none", "auto"):
                return None
            raise ToolError(f"tool_choice: {_shown(choice)} needs tools; the request has none")
        functions = [_function(t) for t in tools]
        names = frozenset(str(f.get("name")) for f in functions)
        if choice is None:
            choice = "auto"
        if choice == "none":
            return cls(None, False, names)
        plain = [dict(t) for t in tools]
        if choice == "auto":
            return cls(plain, True, names)
        if choice == "required":
            return cls(plain, True, names, tuple(functions))
        wanted = _function(choice).get("name") if isinstance(choice, Mapping) else None
        forced = tuple(f for f in functions if f.get("name") == wanted)
        if not forced:
            raise ToolError(
                f"tool_choice: the function {_shown(wanted)} is not among the tools "
                f"({', '.join(sorted(names))})"
            )
        return cls(plain, True, names, forced[:1])

    def spec(self) -> GrammarSpec | None:
        """The grammar the answer must follow (`tool_grammar` as a `GrammarSpec` of kind
        "grammar", its ``param`` "tool_choice"), or None when it is free. Parameters with a
        schema keyword the grammar engine cannot enforce are a ToolError naming it."""
        if not self.forced:
            return None
        for fn in self.forced:
            try:
                check_schema(fn.get("parameters") or {}, f"tools: {fn.get('name')}.parameters")
            except GrammarError as e:
                raise ToolError(str(e)) from None
        return GrammarSpec("grammar", tool_grammar(self.forced), "tool_choice")


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:59] + "…"


def call_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of ``function`` as the hermes template writes it:
    ``{"name": NAME, "arguments": ...}`` (``arguments`` the function's ``parameters``, an
    object without properties when it has none)."""
    params = function.get("parameters")
    return {
        "type": "object",
        "properties": {
            "name": {"const": function.get("name")},
            "arguments": params if params is not None else EMPTY_PARAMETERS,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_grammar(functions: Sequence[Mapping[str, Any]]) -> str:
    """The EBNF grammar (xgrammar's dialect, for a `GrammarSpec` of kind "grammar") of an
    answer that is exactly one call, in the hermes format, of one of ``functions`` (OpenAI's
    ``function`` objects: name, parameters): ``<tool_call>\\n`` + the call's JSON (compact:
    ``", "`` and ``": "`` as the template's ``tojson`` writes them) + ``\\n</tool_call>``. A
    ``parameters`` schema xgrammar cannot compile is a ToolError naming the function."""
    import xgrammar as xgr

    calls = []
    for fn in functions:
        try:
            calls.append(
                xgr.Grammar.from_json_schema(
                    json.dumps(call_schema(fn)), any_whitespace=False, strict_mode=True
                )
            )
        except Exception as e:  # xgrammar's errors: RuntimeError, InvalidJSONError, …
            text = " ".join(str(e).split())[:200]
            raise ToolError(
                f"tools: the parameters of the function {_shown(fn.get('name'))} cannot be "
                f"compiled: {text}"
            ) from None
    body = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
    head = xgr.Grammar.from_ebnf(f"root ::= {json.dumps(OPEN + chr(10))}")
    tail = xgr.Grammar.from_ebnf(f"root ::= {json.dumps(chr(10) + CLOSE)}")
    return str(xgr.Grammar.concat(head, body, tail))
