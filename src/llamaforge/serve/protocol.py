"""OpenAI's request bodies (pydantic) and error shape.

Types are strict, as OpenAI's API declares them: ``"5"`` is not an integer, ``"yes"`` not a
boolean, ``1`` is a number but ``true`` is not; NaN and infinities are refused. Every number
has the range the engine can take (``seed`` is a signed 64-bit integer, as OpenAI's). Fields
OpenAI defines that this server does not implement are accepted only with a value that changes
nothing (``functions: []``, ``best_of`` of 1 …); any other value is a 400 naming the field
(`Body.check`). Extensions (vLLM's names): ``repetition_penalty``, ``min_tokens``,
``stop_token_ids``, ``guided_regex`` and ``guided_grammar``. ``tools`` are OpenAI's function
tools (``{"type": "function", "function": {"name", "description", "parameters",
"strict"}}``, names unique), ``tool_choice`` ``"none"``, ``"auto"``, ``"required"`` or a
named function among them; messages may be assistant messages with ``tool_calls`` and
``role: "tool"`` messages with a ``tool_call_id``. Fields that
never change the output (``user``, ``store``, ``metadata`` …) and unknown fields are ignored:
clients send extra ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from llamaforge.serve.grammar import GrammarSpec

INT64 = (-(2**63), 2**63 - 1)
MAX_TOKENS = 2**31 - 1  # far beyond any context; keeps error messages short


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` with ``status``."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        408: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as JSON for an error message, cut to ``limit`` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): escape it
        text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (``messages.0.role``) and the value
    given."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-"))
    msg = err.get("msg", "invalid value")
    if err.get("type") != "missing" and "input" in err:
        msg = f"{msg} (got {shown(err['input'])})"
    return APIError(400, f"{param or 'body'}: {msg}", param=param or None, code="invalid_value")


def _one_of(what: str) -> WrapValidator:
    """A union's error as one sentence (pydantic reports each alternative)."""

    def wrap(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", f"must be {what}") from None

    return WrapValidator(wrap)


def _unset(v: Any) -> bool:
    return v is None


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == []


def _no_choice(v: Any) -> bool:  # "auto" with no tools is "none"
    return v is None or v in ("none", "auto")


def _one(v: Any) -> bool:
    return v is None or (type(v) is int and v == 1)


Prompt = Annotated[
    StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]],
    _one_of("a string, a list of strings, a list of token ids or a list of token-id lists"),
]
Stop = Annotated[StrictStr | list[StrictStr] | None, _one_of("a string or a list of strings")]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MAX_N = 128


class Body(BaseModel):
    """A request body: strict types, unknown fields ignored, and `check` for what pydantic
    cannot say (fields this server does not implement, combinations)."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    # field -> (is the value one that changes nothing?, the values accepted)
    UNSUPPORTED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    def check(self) -> None:
        """Raise APIError (400, naming the field) for a value this server does not
        implement."""
        for name, (noop, accepted) in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if not noop(value):
                raise APIError(
                    400,
                    f"{name}: not supported by this server (got {shown(value)}; accepted: "
                    f"{accepted})",
                    param=name,
                    code="unsupported_parameter",
                )


class StreamOptions(Body):
    include_usage: StrictBool = False


class _Sampling(Body):
    model: StrictStr | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # strict: an int is a number, a bool not
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Stop = None
    seed: Annotated[StrictInt, Field(ge=INT64[0], le=INT64[1])] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[StrictStr, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None  # extension
    min_tokens: Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)] = 0  # extension
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None  # extension
    response_format: Any = None
    guided_regex: StrictStr | None = None  # extension
    guided_grammar: StrictStr | None = None  # extension: EBNF (xgrammar's dialect)

    def check(self) -> None:
        super().check()
        self.logit_bias_ids()
        self.grammar_spec()
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "stream_options: only allowed with stream=true", param="stream_options"
            )
        self.stops()

    def logit_bias_ids(self) -> dict[int, float]:
        """``logit_bias`` with its keys as token ids (a key not a decimal integer: a 400)."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 9:
                raise APIError(
                    400, f"logit_bias: key {shown(key)} is not a token id", param="logit_bias"
                )
            out[int(key)] = value
        return out

    def grammar_spec(self) -> GrammarSpec | None:
        """What the output is constrained to (``response_format``, ``guided_regex`` or
        ``guided_grammar``: at most one), or None."""
        spec = response_format_spec(self.response_format)
        given = ["response_format"] if spec is not None else []
        given += [n for n in ("guided_regex", "guided_grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise APIError(400, f"{given[1]}: give only one of {', '.join(given)}", param=given[1])
        if self.guided_regex is not None:
            return GrammarSpec("regex", self.guided_regex, "guided_regex")
        if self.guided_grammar is not None:
            return GrammarSpec("grammar", self.guided_grammar, "guided_grammar")
        return spec

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: an empty stop sequence", param="stop")
        return stops


def _format_error(message: str, param: str = "response_format") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def response_format_spec(rf: Any) -> GrammarSpec | None:
    """OpenAI's ``response_format`` as a `GrammarSpec` (None for text or none); a 400 naming
    what is wrong."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise _format_error(f'must be an object with a "type" (got {shown(rf)})')
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind != "json_schema":
        raise _format_error(
            f'type {shown(kind)}: expected "text", "json_object" or "json_schema"',
            "response_format.type",
        )
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise _format_error("an object is expected", "response_format.json_schema")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise _format_error(
            f"must be a JSON schema object (got {shown(schema)})",
            "response_format.json_schema.schema",
        )
    if "name" in js and not isinstance(js["name"], str):
        raise _format_error("must be a string", "response_format.json_schema.name")
    return GrammarSpec("json_schema", json.dumps(schema), "response_format")


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)] | None = 16
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    suffix: Any = None
    best_of: Any = None

    UNSUPPORTED = {
        **_Sampling.UNSUPPORTED,
        "suffix": (lambda v: v is None or v == "", '""'),
        "best_of": (_one, "1"),
    }


class TextPart(Body):
    type: Literal["text"]
    text: StrictStr


Content = Annotated[
    StrictStr | list[TextPart] | None, _one_of('a string or a list of {"type": "text"} parts')
]


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a function's name


class CalledFunction(Body):
    name: StrictStr
    arguments: StrictStr  # JSON text, as the model wrote it


class MessageToolCall(Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: StrictStr | None = None
    function_call: Any = None

    UNSUPPORTED = {"function_call": (_unset, "null")}

    def check(self) -> None:
        super().check()
        if self.tool_calls and self.role != "assistant":
            raise APIError(
                400, f"tool_calls: only in an assistant message (this one is {self.role!r})",
                param="tool_calls",
            )  # fmt: skip
        if self.role == "tool" and self.tool_call_id is None:
            raise APIError(
                400, "tool_call_id: a tool message needs the id of the call it answers",
                param="tool_call_id",
            )  # fmt: skip

    def plain(self) -> dict[str, Any]:
        """The message as a chat template sees it: ``role`` (developer as system),
        ``content`` as text, and ``tool_calls`` / ``tool_call_id`` when it has them."""
        out: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def check_messages(messages: list[Message]) -> None:
    """`Message.check` of each message, the field named ``messages.I.FIELD``."""
    for i, m in enumerate(messages):
        try:
            m.check()
        except APIError as e:
            e.param, e.message = f"messages.{i}.{e.param}", f"messages.{i}.{e.message}"
            e.args = (e.message,)
            raise


class FunctionDefinition(Body):
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionChoice(Body):
    name: StrictStr


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionChoice


ToolChoiceField = Annotated[
    Literal["none", "auto", "required"] | NamedToolChoice | None,
    _one_of('"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceField = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    parallel_tool_calls: StrictBool | None = None  # only about tools: nothing to change

    UNSUPPORTED = {
        **_Sampling.UNSUPPORTED,
        "functions": (_empty, "[]"),
        "function_call": (_no_choice, '"none", "auto"'),
        "modalities": (lambda v: v is None or v == ["text"], '["text"]'),
        "audio": (_unset, "null"),
        "prediction": (_unset, "null"),
        "web_search_options": (_unset, "null"),
        "reasoning_effort": (_unset, "null"),
    }

    def check(self) -> None:
        super().check()
        check_messages(self.messages)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        names = [t.function.name for t in self.tools or []]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise APIError(400, f"tools: the function {twice!r} is given twice", param="tools")

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """``tools`` as plain JSON (what a chat template sees), unset fields left out."""
        if self.tools is None:
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def tool_choice_value(self) -> Any:
        """``tool_choice`` as plain JSON."""
        c = self.tool_choice
        return c.model_dump() if isinstance(c, NamedToolChoice) else c


class TokenizeRequest(Body):
    prompt: StrictStr | None = None
    messages: list[Message] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True

    def check(self) -> None:
        check_messages(self.messages or [])


class DetokenizeRequest(Body):
    tokens: list[StrictInt]
