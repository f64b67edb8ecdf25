"""Chat templates: Jinja strings rendered like Hugging Face's ``apply_chat_template``.

A template sees ``messages`` (``[{"role": ..., "content": ...}]``), ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``tools`` (the functions a model may call, as JSON schemas in
OpenAI's ``{"type": "function", "function": {...}}`` shape, or None) and a
``raise_exception(msg)`` callable, and is rendered in a
sandboxed environment set up as transformers sets up its own (``ImmutableSandboxedEnvironment``
with ``trim_blocks``, ``lstrip_blocks`` and the ``loopcontrols`` extension, a ``tojson`` that
does not escape HTML, ``strftime_now``), so a template exported with a checkpoint renders the
same text there. The ``{% generation %}`` tag of transformers is accepted and renders its body.

``tokenize_conversation`` turns a conversation into ``(ids, labels)`` for finetuning. Which
tokens are trained is found without markers in the template: for each assistant message k,
``render(messages[:k], add_generation_prompt=True)`` is the prompt inference would send, and
``render(messages[:k+1])`` the conversation with the answer; their difference is the answer.

Tokenization scheme (one, used for everything). The ``bos_token``/``eos_token`` strings *the
template itself writes* become the tokenizer's bos/eos ids (SentencePiece never sees ``"<s>"``
as text); each text piece between them is encoded by SentencePiece on its own, dummy prefix
included: this is how Meta's Llama-2 chat code encodes each turn
(``encode(f"[INST] ... [/INST] answer ", bos=True, eos=True)``) and how HF's Llama tokenizers
treat special tokens. Boundaries are found in *tokens*, not characters: the prompt of turn k is
``encode(render(messages[:k], add_generation_prompt=True))`` — exactly the ids inference feeds
the model — and it must be a prefix of the ids of the whole conversation; the answer's tokens
are those between it and ``encode(render(messages[:k+1]))``, also a prefix. So the model is
trained on the very tokens it will have to produce after the generation prompt. When
SentencePiece would merge characters across a boundary (a generation prompt that ends inside
a word), the prefix check fails with an error instead of training on tokens inference never
sees; both built-in templates end their prompts at whitespace, a newline or a special token.
The whole conversation is rendered and encoded once; a prefix is encoded again only from its
last special on (for both built-ins, one turn). Each prefix is a render of its own, so the
renders grow with the square of the turns: with ``max_tokens`` (finetuning's ``max_len``) the
answers that start past it are not rendered, nor the text past the piece that reaches it
encoded, which bounds that work by the turns that fit.

No turn forgery. Text in a message (its content or any other string in it) or in ``tools``
never becomes a special token: before rendering, each occurrence of ``bos_token``/
``eos_token`` in the messages and tools is replaced by a private-use character that occurs
nowhere in them (nor in the template); the specials found in the rendered text are therefore
the template's own, and the characters are turned back into the original text inside the
pieces SentencePiece encodes as plain text (``"</s>"`` in a message is ``▁</``, ``s``, ``>``,
as in Meta's own chat code).
``render`` returns a :class:`RenderedChat` (a ``str``) that carries where those specials are,
and ``encode_text`` cuts it only there; a plain ``str`` (a raw completion prompt) is still cut
at every bos/eos string. For conversations without such text, the ids are exactly HF's
``apply_chat_template`` + tokenizer and Meta's. A template that builds a special out of
message text by transforming it (``content | lower`` of ``"<S>"``) is beyond this guard.

Limits. The built-in templates are rendered in this process (their work is linear in the
conversation). Any other template (a file, a checkpoint's ``chat_template.jinja``) is rendered
in a worker process (POSIX), one of a small pool, which is killed when a render takes longer
than ``time_limit`` (2 s: a template renders a conversation in milliseconds; a slow machine has
a 100-fold margin) and whose address space may grow by at most ``memory_limit`` (256 MiB, plus
16 times the size of the messages; Linux) while rendering. A render may write at most
``max_output_chars`` (1 MiB of text, about 250k LLaMA tokens, 60 times the largest LLaMA-2
context) plus four times the characters of the messages. ``*`` building a string or list over
that limit and ``tojson`` with an ``indent`` over 64 are refused before they allocate. A template
that runs over a limit, recurses too deeply, raises (``1/0``, an undefined name, an unsafe
attribute, its own ``raise_exception``) or dies is a one-line ChatTemplateError naming the
template and what went wrong (the limits: :class:`ChatTemplateLimitError`); a template that
``include``s, ``import``s or ``extends`` another, or does not parse, is one at load time.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "BUILTIN_TEMPLATES",
    "IGNORE_INDEX",
    "ChatTemplate",
    "ChatTemplateError",
    "ChatTemplateLimitError",
    "RenderedChat",
    "encode_text",
    "load_template",
    "tokenize_conversation",
]

IGNORE_INDEX = -100

# Stanford Alpaca's prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT "prompt_no_input"),
# output followed by eos as in its training. A system message replaces the preamble; further
# turns repeat the Instruction/Response blocks. "### Response:\n" is the generation prompt.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA = (
    r"""{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = '"""
    + ALPACA_PREAMBLE
    + r"""' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token + system_message -}}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/...') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- '\n\n### Instruction:\n' + message['content'] -}}
    {%- else -%}
        {{- '\n\n### Response:\n' + message['content'] + eos_token -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '\n\n### Response:\n' -}}
{%- endif -%}"""
)

# Meta's Llama-2 chat format, exactly the chat_template of meta-llama/Llama-2-*-chat-hf:
# <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ...
# The generation prompt is the " [/INST]" every user turn ends with.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# ChatML turns with tool calls in the format of NousResearch's Hermes models (the format, not
# their template: this one is written here). Every marker is plain text, so any tokenizer
# spells it (with a LLaMA SentencePiece vocabulary "<|im_end|>" is a few pieces, and
# "<tool_call>" too); Llama 3.1's tool format needs special tokens LLaMA-1/2 vocabularies
# lack (<|python_tag|>, <|eom_id|>), and its calls are bare JSON with no opening marker, which
# a streaming parser cannot tell from an answer that starts with "{". The system turn lists
# ``tools`` (each as JSON, one a line, inside <tools></tools>); an assistant message renders its
# content and then each of its ``tool_calls`` as <tool_call>\n{"name": ..., "arguments": ...}
# \n</tool_call> (``arguments`` a JSON string, as OpenAI sends it, is written as it is; a
# mapping, as transformers' examples give it, as JSON); a ``tool`` message is a turn of its
# own with the result inside <tool_response></tool_response>. bos_token opens the text; turns
# end with "<|im_end|>\n" and no eos (the server stops at "<|im_end|>": see
# inference.chat.stop_strings). The generation prompt is "<|im_start|>assistant\n".
HERMES = r"""{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if tools -%}
    {{- '<|im_start|>system
' -}}
    {%- if system_message -%}
        {{- system_message + '

' -}}
    {%- endif -%}
    {{- 'You can call functions. Their JSON schemas are listed in <tools></tools>:
<tools>' -}}
    {%- for tool in tools -%}
        {{- '
' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '
</tools>

To call one, write its name and arguments as a JSON object inside '
        '<tool_call></tool_call>:
<tool_call>
{"name": <function name>, "arguments": '
        '<arguments as a JSON object>}
</tool_call><|im_end|>
' -}}
{%- elif system_message -%}
    {{- '<|im_start|>system
' + system_message + '<|im_end|>
' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] == 'assistant' -%}
        {{- '<|im_start|>assistant
' + (message['content'] or '') -}}
        {%- for call in message['tool_calls'] or [] -%}
            {%- set fn = call['function'] if call['function'] is defined else call -%}
            {%- if message['content'] or not loop.first -%}
                {{- '
' -}}
            {%- endif -%}
            {{- '<tool_call>
{"name": ' + (fn['name'] | tojson) + ', "arguments": ' -}}
            {%- if fn['arguments'] is string -%}
                {{- fn['arguments'] -}}
            {%- else -%}
                {{- fn['arguments'] | tojson -}}
            {%- endif -%}
            {{- '}
</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>
' -}}
    {%- elif message['role'] == 'tool' -%}
        {{- '<|im_start|>tool
<tool_response>
' + message['content'] -}}
        {{- '
</tool_response><|im_end|>
' -}}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>
' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant
' -}}
{%- endif -%}"""

BUILTIN_TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "hermes": HERMES, "llama2": LLAMA2}


# sources rendered in this process: their work is linear in the conversation
_TRUSTED = frozenset(BUILTIN_TEMPLATES.values())


class ChatTemplateError(ValueError):
    """A template that cannot be loaded or rendered, or a conversation it refuses."""


class ChatTemplateLimitError(ChatTemplateError):
    """A render that ran over the template's time, memory or output limit."""


class _Failure(Exception):
    """What went wrong in a render or a compile: one line, without the template's name."""

    def __init__(self, message: str, limit: bool = False) -> None:
        super().__init__(message)
        self.limit = limit


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------- environment

# the largest string or list ``*`` may build in the render under way (its output limit)
_max_built: ContextVar[int] = ContextVar("_max_built", default=1 << 20)
_MAX_INT_BITS = 1 << 16  # integers a template computes: any count fits, no slow bignums
_MAX_INDENT = 64  # tojson's indent


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with ``*`` and ``**`` checked before they allocate: ``'a' *
    4000000000`` would take gigabytes before the output or memory limit could see it."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = type(left) is int and type(right) is int
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and type(n) is int:
                    if len(seq) * n > _max_built.get():
                        raise _Failure(
                            f"'*' would build a {type(seq).__name__} of {len(seq) * n} items "
                            f"(the limit: {_max_built.get()})",
                            limit=True,
                        )
            if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise _Failure(f"'*' would compute an integer over {_MAX_INT_BITS} bits", True)
        elif ints and right > 0 and left.bit_length() * right > _MAX_INT_BITS:
            raise _Failure(f"'**' would compute an integer over {_MAX_INT_BITS} bits", True)
        return super().call_binop(context, operator, left, right)


class _Generation(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    if indent is not None and not (
        (type(indent) is int and 0 <= indent <= _MAX_INDENT)
        or (isinstance(indent, str) and len(indent) <= _MAX_INDENT)
    ):
        raise _Failure(
            f"tojson: indent must be an integer or a string of 0 to {_MAX_INDENT}, "
            f"got {_one_line(repr(indent), 40)}"
        )
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_OTHER_TEMPLATES = {
    jinja2.nodes.Extends: "extends",
    jinja2.nodes.Include: "include",
    jinja2.nodes.Import: "import",
    jinja2.nodes.FromImport: "from ... import",
}


def _parse(source: str) -> jinja2.nodes.Template:
    """The template's syntax tree; a _Failure when it does not parse or loads another template
    (a chat template is one self-contained file). Parsing evaluates nothing."""
    try:
        tree = _environment().parse(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise _Failure(f"invalid Jinja at line {e.lineno}: {_one_line(e.message or e)}") from None
    except RecursionError:
        raise _Failure("invalid Jinja: nested too deeply to parse") from None
    for node in tree.find_all(tuple(_OTHER_TEMPLATES)):
        raise _Failure(
            f"line {node.lineno}: {{% {_OTHER_TEMPLATES[type(node)]} %}} is not allowed: "
            "a chat template must be one self-contained file"
        )
    return tree


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """The compiled template (a _Failure when it does not compile, e.g. an unknown filter).
    Jinja evaluates constant expressions while compiling (``'%09999999999d' % 1`` included):
    only the built-ins are compiled outside a worker."""
    tree = _parse(source)
    try:
        return _environment().from_string(tree)
    except jinja2.exceptions.TemplateSyntaxError as e:  # an unknown filter or test
        raise _Failure(f"invalid Jinja at line {e.lineno}: {_one_line(e.message or e)}") from None
    except (RecursionError, SyntaxError, MemoryError, ValueError, OverflowError) as e:
        # Python's own limits ("too many statically nested blocks")
        what = e.msg if isinstance(e, SyntaxError) else e
        raise _Failure(f"cannot be compiled ({type(e).__name__}: {_one_line(what)})") from None


# ----------------------------------------------------------------------------- rendering

Span = tuple[int, int, str]  # (start, end, "bos" | "eos") of a special the template wrote


class RenderedChat(str):
    """A rendered template: the text, and in ``specials`` where the template itself wrote
    ``bos_token``/``eos_token`` (``(start, end, "bos" | "eos")``); ``encode_text`` cuts it
    only there. Slicing or concatenating it gives a plain ``str``."""

    specials: tuple[Span, ...]

    def __new__(cls, text: str, specials: Sequence[Sequence[Any]] = ()) -> RenderedChat:
        obj = super().__new__(cls, text)
        obj.specials = tuple((int(a), int(b), str(k)) for a, b, k in specials)
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (RenderedChat, (str(self), self.specials))


@lru_cache(maxsize=16)
def _special_pattern(bos_token: str, eos_token: str) -> re.Pattern[str] | None:
    alternatives = sorted({s for s in (bos_token, eos_token) if s}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alternatives))) if alternatives else None


def _find_specials(text: str, bos_token: str, eos_token: str) -> list[Span]:
    pattern = _special_pattern(bos_token, eos_token)
    if pattern is None:
        return []
    return [
        (m.start(), m.end(), "eos" if m.group() == eos_token else "bos")
        for m in pattern.finditer(text)
    ]


_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")


def _strings(value: Any) -> Iterator[str]:
    """Every string in a message: keys and values, nested."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _mark(
    messages: list[Any], bos: str, eos: str, source: str
) -> tuple[list[Any], dict[int, str], int]:
    """``messages`` (a list of anything: messages, tools) with each bos/eos string in them
    replaced by a private-use character found nowhere in them, in the template or in the
    specials; the ``str.translate`` table that turns those characters back; the messages' size
    in characters."""
    specials = [s for s in dict.fromkeys((bos, eos)) if s]
    used = set(_PRIVATE_USE.findall(source + bos + eos))
    size, found = 0, False
    for s in _strings(messages):
        size += len(s)
        found = found or any(sp in s for sp in specials)
        used.update(_PRIVATE_USE.findall(s))
    if not found:
        return messages, {}, size
    free = [chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used][: len(specials)]
    if len(free) < len(specials):
        raise _Failure("the messages use every private-use character: cannot mark bos/eos text")
    marks = dict(zip(specials, free))
    pattern = _special_pattern(bos, eos)
    assert pattern is not None

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(lambda m: marks[m.group()], value)
        if isinstance(value, Mapping):
            return {sub(k): sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        if isinstance(value, tuple):
            return tuple(sub(v) for v in value)
        return value

    return [sub(m) for m in messages], {ord(c): s for s, c in marks.items()}, size


def _render_one(
    template: jinja2.Template,
    messages: list[Any],
    tools: list[Any] | None,
    add_generation_prompt: bool,
    bos: str,
    eos: str,
    restore: dict[int, str],
    max_chars: int,
) -> tuple[str, list[Span]]:
    """The text of ``messages`` and ``tools`` (marked by ``_mark``) and the specials the
    template wrote; stops as soon as the output passes ``max_chars``."""
    chunks, size = [], 0
    token = _max_built.set(max_chars)
    try:
        for chunk in template.generate(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        ):
            size += len(chunk)
            if size > max_chars:
                raise _Failure(
                    f"renders more than {max_chars} characters (its max_output_chars plus 4 "
                    "times the messages' characters)",
                    limit=True,
                )
            chunks.append(chunk)
    finally:
        _max_built.reset(token)
    rendered = "".join(chunks)
    if not restore:
        return rendered, _find_specials(rendered, bos, eos)
    # the specials are the template's own; the marks in the text between them are message text
    parts: list[str] = []
    spans: list[Span] = []
    pos = length = 0
    for start, end, kind in _find_specials(rendered, bos, eos):
        piece = rendered[pos:start].translate(restore)
        parts += [piece, rendered[start:end]]
        length += len(piece)
        spans.append((length, length + end - start, kind))
        length += end - start
        pos = end
    parts.append(rendered[pos:].translate(restore))
    return "".join(parts), spans


def _template_line(e: BaseException) -> int | None:
    """The template line an error was raised at (Jinja rewrites its tracebacks so)."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _describe(e: Exception, memory_limit: int) -> _Failure:
    if isinstance(e, _Failure):
        return e
    if isinstance(e, jinja2.exceptions.TemplateError):  # raise_exception, unsafe access, ...
        return _Failure(_one_line(e))
    line = _template_line(e)
    at = f"line {line}: " if line else ""
    if isinstance(e, MemoryError):
        mib = f"{memory_limit / 2**20:g} MiB"
        return _Failure(f"{at}needs more memory than its memory_limit ({mib})", limit=True)
    if isinstance(e, RecursionError):
        return _Failure(f"{at}recurses too deeply (RecursionError)")
    return _Failure(f"{at}{type(e).__name__}: {_one_line(e)}")


def _render_job(template: jinja2.Template, job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Renders ``messages[:n]`` for each ``(n, add_generation_prompt)`` of ``job["prefixes"]``:
    a dict per render (``text``, ``specials``) or, at the first failure, one with ``error``
    (and ``limit``), and no more."""
    bos, eos = job["bos"], job["eos"]
    try:
        marked, restore, size = _mark([job["messages"], job["tools"]], bos, eos, job["source"])
        messages, tools = marked
        max_chars = job["max_output_chars"] + 4 * size
        for n, agp in job["prefixes"]:
            text, specials = _render_one(
                template, messages[:n], tools, agp, bos, eos, restore, max_chars
            )
            yield {"text": text, "specials": specials}
    except Exception as e:
        failure = _describe(e, job["memory_limit"])
        yield {"error": str(failure), "limit": failure.limit}


# ----------------------------------------------------------------------------- the workers

_START_TIMEOUT = 120.0  # seconds for a worker to start (import jinja2) on a loaded machine
_WORKERS = 4  # renders of non-built-in templates at once, per process
_WORKER_CODE = "from llamaforge.chat_templates import _worker_main; _worker_main()"


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


class _Worker:
    """A child process that renders jobs: pickled jobs in, JSON replies out, each an 8-byte
    length and the bytes. Killed when a reply does not come in time."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[1])  # the child imports this very module
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        except OSError as e:
            raise _Failure(f"cannot start a process to render it ({_one_line(e)})") from None
        self.buf = bytearray()
        try:
            self.recv(time.monotonic() + _START_TIMEOUT)
        except (TimeoutError, EOFError):
            err = self.stop()
            raise _Failure(
                f"the process to render it did not start ({err or 'no message'})"
            ) from None

    def send(self, job: dict[str, Any]) -> None:
        try:
            data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            raise _Failure(
                f"cannot pass the messages to the process that renders it ({_one_line(e)})"
            ) from None
        assert self.proc.stdin is not None
        self.proc.stdin.write(_frame(data))
        self.proc.stdin.flush()

    def recv(self, deadline: float) -> dict[str, Any]:
        head = self._read(8, deadline)
        return json.loads(self._read(int.from_bytes(head, "little"), deadline))

    def _read(self, n: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()  # read unbuffered: select must see every byte
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, max(n - len(self.buf), 1 << 16))
            if not chunk:
                raise EOFError
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def how_it_ended(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            name = signal.Signals(-code).name
            why = ", perhaps out of memory" if name == "SIGKILL" else ""
            return f"killed by {name}{why}"
        return f"exit code {code}"

    def stop(self) -> str:
        """Kills the process; the last line it wrote to stderr, if any."""
        self.proc.kill()
        try:
            _, err = self.proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, OSError, ValueError):
            err = b""
        lines = (err or b"").decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the worker's read ends: it exits
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self.stop()


class _Pool:
    """Up to ``_WORKERS`` workers of this process, reused; one busy with a render is held by
    its caller, and killed (then replaced) when the render runs over its time limit."""

    def __init__(self) -> None:
        self.idle: list[_Worker] = []
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(_WORKERS)

    @contextmanager
    def _worker(self) -> Iterator[_Worker]:
        with self.slots:
            with self.lock:
                worker = self.idle.pop() if self.idle else None
            if worker is None or worker.proc.poll() is not None:
                worker = _Worker()
            try:
                yield worker
            except BaseException:
                worker.stop()  # mid-job: its pipe is out of step
                raise
            with self.lock:
                self.idle.append(worker)

    def run(self, job: dict[str, Any], time_limit: float) -> list[dict[str, Any]]:
        """The worker's replies to ``job`` (see _render_job)."""
        with self._worker() as worker:
            try:
                worker.send(job)
            except OSError:
                raise _Failure(f"the process rendering it died ({worker.how_it_ended()})") from None
            replies: list[dict[str, Any]] = []
            for _ in range(max(1, len(job["prefixes"]))):  # a job without renders: compile
                try:
                    replies.append(worker.recv(time.monotonic() + time_limit))
                except TimeoutError:
                    what = "render" if job["prefixes"] else "compile"
                    raise _Failure(
                        f"takes longer than {time_limit:g} s to {what} (its time_limit); stopped",
                        limit=True,
                    ) from None
                except EOFError:
                    raise _Failure(
                        f"the process rendering it died ({worker.how_it_ended()})"
                    ) from None
                if "error" in replies[-1]:
                    break
            return replies

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.close()


_POOL = _Pool()
_INHERITED: list[_Pool] = []  # a forked child's copy of its parent's pool: not its to stop


def _pool_after_fork() -> None:
    global _POOL
    _INHERITED.append(_POOL)
    _POOL = _Pool()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_pool_after_fork)
atexit.register(lambda: _POOL.close())


def _address_space() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


@contextmanager
def _job_limits(job: dict[str, Any], size: int) -> Iterator[None]:
    """In the worker: its address space may grow by the job's memory limit (plus 16 times the
    job's size); an alarm ends the process should its parent be gone and a render never end."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    now = _address_space()
    if now is not None:
        limit = now + job["memory_limit"] + 16 * size
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_REAL, job["time_limit"] * len(job["prefixes"]) + 30)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _worker_main() -> None:
    """The worker process: renders the jobs read from stdin until it closes (see _Worker)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the alarm of _job_limits ends the process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but replies on the reply pipe

    def send(reply: dict[str, Any]) -> None:
        out.write(_frame(json.dumps(reply).encode()))
        out.flush()

    send({"ready": os.getpid()})
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)  # stderr was for start-up errors; a full pipe must never block a render
    os.close(null)
    while True:
        head = inp.read(8)
        if len(head) < 8:
            return
        data = inp.read(int.from_bytes(head, "little"))
        job = pickle.loads(data)
        with _job_limits(job, len(data)):
            try:
                template = _compile(job["source"])
            except _Failure as e:
                send({"error": str(e), "limit": e.limit})
                continue
            except MemoryError:
                send({"error": "needs more memory to compile than its memory_limit", "limit": True})
                continue
            if not job["prefixes"]:
                send({"compiled": True})
            for reply in _render_job(template, job):
                send(reply)


# ----------------------------------------------------------------------------- templates


def _plain(
    name: str, messages: Sequence[Mapping[str, Any]], what: str = "message"
) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            expected = "with 'role' and 'content'" if what == "message" else "(a JSON schema)"
            raise ChatTemplateError(
                f"chat template {name}: {what} {i} is a {type(m).__name__}; expected a "
                f"mapping {expected}"
            )
        out.append(dict(m))
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template, the bos/eos strings it is rendered with, and the limits of a
    render (see the module doc): ``time_limit`` seconds, ``max_output_chars`` characters
    (plus 4 times the messages' characters), ``memory_limit`` bytes (plus 16 times the
    messages' size). The built-in templates render in this process, without time limit."""

    name: str
    source: str
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    time_limit: float = 2.0
    max_output_chars: int = 1 << 20
    memory_limit: int = 256 << 20

    def __post_init__(self) -> None:
        for field, value in (
            ("time_limit", self.time_limit),
            ("max_output_chars", self.max_output_chars),
            ("memory_limit", self.memory_limit),
        ):
            number = (float, int) if field == "time_limit" else (int,)
            if type(value) not in number or not value > 0:
                raise ChatTemplateError(
                    f"chat template {self.name}: {field} must be a positive "
                    f"{'number' if field == 'time_limit' else 'integer'}, got {value!r}"
                )
        # the built-ins compile and render here; any other template only parses here, and
        # compiles in a worker (which checks it now: errors come at load, not at first use)
        local = None
        try:
            tree = _parse(self.source)
            if self.source in _TRUSTED:
                local = _compile(self.source)
        except _Failure as e:
            raise ChatTemplateError(f"chat template {self.name}: {e}") from None
        object.__setattr__(self, "_local", local)
        # a walk of the syntax tree (jinja2.meta would compile it: see _compile)
        names = tree.find_all(jinja2.nodes.Name)
        object.__setattr__(self, "_tools", any(n.name == "tools" for n in names))
        if local is None:
            self._render([], [])

    @property
    def takes_tools(self) -> bool:
        """Whether the template reads the ``tools`` variable (renders functions to call)."""
        return bool(self._tools)  # type: ignore[attr-defined]

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> RenderedChat:
        """The template's text for ``messages`` (and ``tools``, the functions the model may
        call, as transformers passes them): a :class:`RenderedChat`, the ``str`` that knows
        which bos/eos strings the template wrote. A ``raise_exception`` in the template (e.g.
        roles that do not alternate), any other error in it or a limit it runs over is a
        ChatTemplateError (ChatTemplateLimitError for the limits)."""
        return self._render(messages, [(len(messages), add_generation_prompt)], tools)[0]

    def _render(
        self,
        messages: Sequence[Mapping[str, Any]],
        prefixes: list[tuple[int, bool]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[RenderedChat]:
        """``messages[:n]`` rendered for each ``(n, add_generation_prompt)`` of ``prefixes``
        (one trip to the worker for all)."""
        job = {
            "source": self.source,
            "bos": self.bos_token,
            "eos": self.eos_token,
            "messages": _plain(self.name, messages),
            "tools": None if tools is None else _plain(self.name, tools, "tool"),
            "prefixes": prefixes,
            "time_limit": self.time_limit,
            "max_output_chars": self.max_output_chars,
            "memory_limit": self.memory_limit,
        }
        local: jinja2.Template | None = self._local  # type: ignore[attr-defined]
        try:
            if local is not None:
                replies = list(_render_job(local, job))
            else:
                replies = _POOL.run(job, self.time_limit)
        except _Failure as e:
            replies = [{"error": str(e), "limit": e.limit}]
        out = []
        for r in replies:
            if "error" in r:
                cls = ChatTemplateLimitError if r["limit"] else ChatTemplateError
                raise cls(f"chat template {self.name}: {r['error']}")
            if "text" in r:
                out.append(RenderedChat(r["text"], r["specials"]))
        return out


def load_template(
    name_or_path: str | Path, bos_token: str = "<s>", eos_token: str = "</s>"
) -> ChatTemplate:
    """A built-in template by name (``alpaca``, ``hermes``, ``llama2``) or a Jinja file by
    path."""
    key = str(name_or_path)
    if key in BUILTIN_TEMPLATES:
        return ChatTemplate(key, BUILTIN_TEMPLATES[key], bos_token, eos_token)
    path = Path(key)
    if path.suffix in (".jinja", ".j2", ".jinja2", ".txt") or path.exists():
        if not path.is_file():
            raise ChatTemplateError(f"chat template file {path} not found")
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"chat template file {path}: {_one_line(e)}") from None
        return ChatTemplate(str(path), source, bos_token, eos_token)
    raise ChatTemplateError(
        f"unknown chat template {key!r}: expected one of the built-ins "
        f"{sorted(BUILTIN_TEMPLATES)} or the path of a .jinja file"
    )


# ----------------------------------------------------------------------------- tokens


class _Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


def _cuts(text: str, bos_token: str, eos_token: str) -> Sequence[Span]:
    """Where ``encode_text`` cuts ``text``: a :class:`RenderedChat` at the specials the
    template wrote, a plain ``str`` at every ``bos_token``/``eos_token``."""
    if isinstance(text, RenderedChat):
        return text.specials
    return _find_specials(text, bos_token, eos_token)


def _encode_cut(
    tokenizer: _Tokenizer, text: str, cuts: Sequence[Span], limit: int | None = None
) -> tuple[list[int], list[int]]:
    """The ids of ``text`` cut at ``cuts`` (see ``encode_text``), and for each cut encoded the
    number of ids up to its end; with ``limit``, the pieces after the one that reaches
    ``limit`` ids are not encoded."""
    ids: list[int] = []
    ends: list[int] = []
    pos = 0
    for start, end, kind in cuts:
        if limit is not None and len(ids) >= limit:
            return ids, ends
        if start > pos:
            ids += tokenizer.encode(text[pos:start], bos=False, eos=False)
        ids.append(tokenizer.bos_id if kind == "bos" else tokenizer.eos_id)
        ends.append(len(ids))
        pos = end
    if pos < len(text) and (limit is None or len(ids) < limit):
        ids += tokenizer.encode(text[pos:], bos=False, eos=False)
    return ids, ends


def encode_text(
    tokenizer: _Tokenizer, text: str, bos_token: str = "<s>", eos_token: str = "</s>"
) -> list[int]:
    """Ids of a rendered template: its specials become the bos/eos ids, each text piece between
    them is encoded by SentencePiece on its own (dummy prefix included). A
    :class:`RenderedChat` is cut only where the template wrote bos/eos (message text is never
    a special token; ``bos_token``/``eos_token`` are not used), a plain ``str`` at every
    ``bos_token``/``eos_token``."""
    return _encode_cut(tokenizer, text, _cuts(text, bos_token, eos_token))[0]


class _PrefixIds:
    """The ids of a rendered conversation, and how many of them a text that starts it encodes
    to: ``encode_text`` of that text is the conversation's ids up to its last cut (when its
    cuts are the conversation's first ones) and its last piece encoded, so only that piece is
    encoded again (a turn, for templates that end turns with a special). With ``limit`` the
    conversation is encoded up to the piece that reaches ``limit`` ids, and a text is
    checked against those ids as far as they go."""

    def __init__(
        self,
        tokenizer: _Tokenizer,
        text: str,
        bos_token: str,
        eos_token: str,
        limit: int | None = None,
    ) -> None:
        self.tokenizer, self.bos_token, self.eos_token = tokenizer, bos_token, eos_token
        self.limit = limit
        self.cuts = tuple(_cuts(text, bos_token, eos_token))
        self.ids, self.ends = _encode_cut(tokenizer, text, self.cuts, limit)

    def _starts(self, at: int, ids: list[int]) -> bool:
        """Whether ``ids`` are the conversation's from ``at`` on, as far as those go."""
        n = max(0, min(len(ids), len(self.ids) - at))
        return self.ids[at : at + n] == ids[:n]

    def length(self, prefix: str) -> int | None:
        """``len(encode_text(prefix))`` when those ids start ``self.ids`` (``prefix`` starts
        the conversation's text), else None; ``len(self.ids)`` for a prefix whose cuts go on
        past the ids encoded (``limit``)."""
        cuts = tuple(_cuts(prefix, self.bos_token, self.eos_token))
        n, known = len(cuts), len(self.ends)
        if n > known and known < len(self.cuts):  # past the cuts encoded
            return len(self.ids) if cuts[:known] == self.cuts[:known] else None
        if cuts != self.cuts[:n] or (n < len(self.cuts) and self.cuts[n][0] < len(prefix)):
            ids = _encode_cut(self.tokenizer, prefix, cuts, self.limit)[0]  # cut elsewhere
            return len(ids) if self._starts(0, ids) else None
        pos, start = (cuts[-1][1], self.ends[n - 1]) if n else (0, 0)
        tail = self.tokenizer.encode(prefix[pos:], bos=False, eos=False) if prefix[pos:] else []
        return start + len(tail) if self._starts(start, tail) else None


def _as_template(template: ChatTemplate | str | Path) -> ChatTemplate:
    return template if isinstance(template, ChatTemplate) else load_template(template)


_FIRST_TURNS = 32  # answers rendered with the whole conversation; later batches double


def _turn_renders(
    tpl: ChatTemplate, messages: Sequence[Mapping[str, Any]], turns: list[int]
) -> tuple[RenderedChat, Iterator[tuple[int, RenderedChat, RenderedChat]]]:
    """The whole conversation rendered, and for each assistant message k (lazily, in order)
    ``(k, prompt, conversation up to answer k)``. Each batch of answers is one render job
    (one trip to a worker), the first with the whole conversation, the later ones with the
    messages up to their last answer; the batches double, so a caller that stops early
    renders few prefixes, and one that reads all makes few trips."""

    def prefixes(batch: list[int]) -> list[tuple[int, bool]]:
        return [p for k in batch for p in ((k, True), (k + 1, False))]

    first = turns[:_FIRST_TURNS]
    full, *renders = tpl._render(messages, [(len(messages), False), *prefixes(first)])

    def answers() -> Iterator[tuple[int, RenderedChat, RenderedChat]]:
        batch, done = first, 0
        out = renders
        while batch:
            yield from zip(batch, out[::2], out[1::2])
            done += len(batch)
            batch = turns[done : done + 2 * len(batch)]  # (the messages up to its last answer)
            out = tpl._render(messages[: batch[-1] + 1], prefixes(batch)) if batch else []

    return full, answers()


def tokenize_conversation(
    template: ChatTemplate | str | Path,
    tokenizer: _Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    train_on_prompt: bool = False,
    max_tokens: int | None = None,
) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a conversation: ``labels[i]`` is ``ids[i]`` where the model is
    trained (every assistant turn, its closing eos included) and -100 elsewhere; the caller
    shifts (inputs ``ids[:-1]``, targets ``labels[1:]``). ``train_on_prompt`` trains on every
    token. ``max_tokens``: only the first ``max_tokens`` ids and labels are returned (exactly
    those of the whole), and the answers that start after them are not looked for, so a
    conversation of many turns costs the turns that fit, not the square of all its turns. See
    the module docstring for how turns are found and why."""
    tpl = _as_template(template)
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}: expected at least 1")
    turns = [
        k for k, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "assistant"
    ]
    full_text, answers = _turn_renders(tpl, messages, turns)
    whole = _PrefixIds(tokenizer, full_text, tpl.bos_token, tpl.eos_token, max_tokens)
    if not turns:
        raise ChatTemplateError("the conversation has no assistant message to train on")
    ids = whole.ids if max_tokens is None else whole.ids[:max_tokens]
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    for k, prompt_text, turn_text in answers:
        if not turn_text.startswith(prompt_text) or len(turn_text) == len(prompt_text):
            raise ChatTemplateError(
                f"chat template {tpl.name}: rendering assistant message {k} adds nothing after "
                "the generation prompt (or changes the text before it); the template must "
                "render each assistant message after what add_generation_prompt=True renders"
            )
        if not full_text.startswith(turn_text):
            raise ChatTemplateError(
                f"chat template {tpl.name}: the conversation up to assistant message {k} is "
                "not a prefix of the whole conversation's text (the template renders earlier "
                "turns differently when later ones follow)"
            )
        start = whole.length(prompt_text)
        if start is not None and start >= len(ids):  # this answer and the later ones lie past
            break  # max_tokens
        end = whole.length(turn_text)
        if start is None or end is None:
            raise ChatTemplateError(
                f"chat template {tpl.name}: around assistant message {k} the tokenizer merges "
                "characters across the prompt/answer boundary, so the answer's tokens differ "
                "from what the model would generate after the generation prompt; end the "
                "generation prompt (and each answer) with whitespace, a newline or eos_token"
            )
        if end <= start:
            raise ChatTemplateError(
                f"chat template {tpl.name}: assistant message {k} renders no tokens"
            )
        labels[start:end] = ids[start:end]
    return ids, labels
