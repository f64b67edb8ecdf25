"""Chat templates: Jinja strings rendered like Hugging Face's ``apply_chat_template``.

A template sees ``messages`` (``[{"role": ..., "content": ...}]``), ``add_generation_prompt``,
``bos_token``, ``eos_token`` and a ``raise_exception(msg)`` callable, and is rendered in a
sandboxed environment set up as transformers sets up its own (``ImmutableSandboxedEnvironment``
with ``trim_blocks``, ``lstrip_blocks`` and the ``loopcontrols`` extension, a ``tojson`` that
does not escape HTML, ``strftime_now``), so a template exported with a checkpoint renders the
same text there. The ``{% generation %}`` tag of transformers is accepted and renders its body.

``tokenize_conversation`` turns a conversation into ``(ids, labels)`` for finetuning. Which
tokens are trained is found without markers in the template: for each assistant message k,
``render(messages[:k], add_generation_prompt=True)`` is the prompt inference would send, and
``render(messages[:k+1])`` the conversation with the answer; their difference is the answer.

Tokenization scheme (one, used for everything). A rendered text is cut at the template's
``bos_token``/``eos_token`` strings, which become the tokenizer's bos/eos ids (SentencePiece
never sees ``"<s>"`` as text); each text piece between them is encoded by SentencePiece on its
own, dummy prefix included: this is how Meta's Llama-2 chat code encodes each turn
(``encode(f"[INST] ... [/INST] answer ", bos=True, eos=True)``) and how HF's Llama tokenizers
treat special tokens. Boundaries are found in *tokens*, not characters: the prompt of turn k is
``encode(render(messages[:k], add_generation_prompt=True))`` — exactly the ids inference feeds
the model — and it must be a prefix of the ids of the whole conversation; the answer's tokens
are those between it and ``encode(render(messages[:k+1]))``, also a prefix. So the model is
trained on the very tokens it will have to produce after the generation prompt. When
SentencePiece would merge characters across a boundary (a generation prompt that ends inside
a word), the prefix check fails with an error instead of training on tokens inference never
sees; both built-in templates end their prompts at whitespace, a newline or a special token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
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

BUILTIN_TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "llama2": LLAMA2}


class ChatTemplateError(ValueError):
    """A template that cannot be loaded or rendered, or a conversation it refuses."""


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
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the bos/eos strings it is rendered with."""

    name: str
    source: str
    bos_token: str = "<s>"
    eos_token: str = "</s>"

    def __post_init__(self) -> None:
        try:
            template = _environment().from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"chat template {self.name}: invalid Jinja at line {e.lineno}: {e.message}"
            ) from None
        object.__setattr__(self, "_template", template)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """The template's text for ``messages``; a ``raise_exception`` in the template (e.g.
        roles that do not alternate) is a ChatTemplateError."""
        try:
            return str(
                self._template.render(  # type: ignore[attr-defined]
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                )
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.name}: {e}") from None


def load_template(
    name_or_path: str | Path, bos_token: str = "<s>", eos_token: str = "</s>"
) -> ChatTemplate:
    """A built-in template by name (``alpaca``, ``llama2``) or a Jinja file by path."""
    key = str(name_or_path)
    if key in BUILTIN_TEMPLATES:
        return ChatTemplate(key, BUILTIN_TEMPLATES[key], bos_token, eos_token)
    path = Path(key)
    if path.suffix in (".jinja", ".j2", ".jinja2", ".txt") or path.exists():
        if not path.is_file():
            raise ChatTemplateError(f"chat template file {path} not found")
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"), bos_token, eos_token)
    raise ChatTemplateError(
        f"unknown chat template {key!r}: expected one of the built-ins "
        f"{sorted(BUILTIN_TEMPLATES)} or the path of a .jinja file"
    )


class _Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


def encode_text(
    tokenizer: _Tokenizer, text: str, bos_token: str = "<s>", eos_token: str = "</s>"
) -> list[int]:
    """Ids of a rendered template: ``bos_token``/``eos_token`` become the bos/eos ids, each
    text piece between them is encoded by SentencePiece on its own (dummy prefix included)."""
    specials = {bos_token: tokenizer.bos_id, eos_token: tokenizer.eos_id}
    alternatives = sorted((s for s in specials if s), key=len, reverse=True)
    pattern = "(" + "|".join(map(re.escape, alternatives)) + ")"
    ids: list[int] = []
    for i, piece in enumerate(re.split(pattern, text)):
        if i % 2:
            ids.append(specials[piece])
        elif piece:
            ids += tokenizer.encode(piece, bos=False, eos=False)
    return ids


def _as_template(template: ChatTemplate | str | Path) -> ChatTemplate:
    return template if isinstance(template, ChatTemplate) else load_template(template)


def tokenize_conversation(
    template: ChatTemplate | str | Path,
    tokenizer: _Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    train_on_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a conversation: ``labels[i]`` is ``ids[i]`` where the model is
    trained (every assistant turn, its closing eos included) and -100 elsewhere; the caller
    shifts (inputs ``ids[:-1]``, targets ``labels[1:]``). ``train_on_prompt`` trains on every
    token. See the module docstring for how turns are found and why."""
    tpl = _as_template(template)

    def enc(text: str) -> list[int]:
        return encode_text(tokenizer, text, tpl.bos_token, tpl.eos_token)

    full_text = tpl.render(messages)
    ids = enc(full_text)
    turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise ChatTemplateError("the conversation has no assistant message to train on")
    labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
    for k in turns:
        prompt_text = tpl.render(messages[:k], add_generation_prompt=True)
        turn_text = tpl.render(messages[: k + 1])
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
        prompt_ids, turn_ids = enc(prompt_text), enc(turn_text)
        start, end = len(prompt_ids), len(turn_ids)
        if ids[:start] != prompt_ids or ids[:end] != turn_ids:
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
