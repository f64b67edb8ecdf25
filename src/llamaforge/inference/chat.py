"""Chatting with a model: a conversation rendered with its chat template, replies generated.

    session = ChatSession(model, tokenizer, "llama2", system="Answer briefly.")
    session.send("Hello!")            # the reply; session.history holds the conversation
    llamaforge.chat("ckpt/", [{"role": "user", "content": "Hello!"}])   # one-shot

Each turn renders the whole history plus the new user message with
``add_generation_prompt=True`` and encodes it as ``chat_templates.encode_text`` does (the
tokens a finetuned model was trained on). Generation stops at eos, or at the text the
template closes an assistant turn with or opens the next user turn with (``stop_strings``).
When the prompt plus ``max_new_tokens`` would not fit the model's context, the oldest
user/assistant turns are dropped from the history (the system message stays) until it does.
``max_new_tokens`` defaults to 256, or half the context when that is less
(`default_max_new_tokens`), so a prompt always has room.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaforge.chat_templates import ChatTemplate, ChatTemplateError, encode_text, load_template

if TYPE_CHECKING:
    from llamaforge.model import Transformer
    from llamaforge.tokenizer import Tokenizer

__all__ = [
    "ChatError",
    "ChatSession",
    "chat",
    "default_max_new_tokens",
    "next_command",
    "resolve_template",
    "stop_strings",
]

Message = dict[str, str]

# tokens per reply when none is asked for, on a model whose context is at least twice that
MAX_NEW_TOKENS = 256


def default_max_new_tokens(max_seq_len: int) -> int:
    """Tokens per reply when none is asked for: `MAX_NEW_TOKENS`, or half of a context of
    ``max_seq_len`` tokens when that is less (the other half is the prompt's)."""
    return max(1, min(MAX_NEW_TOKENS, max_seq_len // 2))


def next_command(ckpt: str | os.PathLike, prompt: str = "The") -> str:
    """The command line that talks to the native checkpoint ``ckpt`` with its defaults:
    ``llamaforge chat --ckpt CKPT`` when it has a chat template (a finetuned model), else
    ``llamaforge generate --ckpt CKPT --prompt PROMPT``."""
    from llamaforge.checkpoint.native import read_chat_template

    if read_chat_template(ckpt) is not None:
        return shlex.join(["llamaforge", "chat", "--ckpt", os.fspath(ckpt)])
    return shlex.join(["llamaforge", "generate", "--ckpt", os.fspath(ckpt), "--prompt", prompt])


class ChatError(ValueError):
    """A message that cannot be answered, e.g. one too long for the model's context."""


def _specials(tokenizer: Tokenizer) -> tuple[str, str]:
    return tokenizer.id_to_piece(tokenizer.bos_id), tokenizer.id_to_piece(tokenizer.eos_id)


def resolve_template(
    template: ChatTemplate | str | os.PathLike | None,
    tokenizer: Tokenizer,
    ckpt_dir: str | os.PathLike | None = None,
) -> ChatTemplate:
    """The chat template to use: ``template`` (a ChatTemplate, a built-in name or a .jinja
    path) if given, else the checkpoint's ``chat_template.jinja``. bos/eos are rendered as
    the tokenizer's own pieces. Neither → a ChatTemplateError naming the checkpoint."""
    bos, eos = _specials(tokenizer)
    if isinstance(template, ChatTemplate):
        return template
    if template is not None:
        return load_template(os.fspath(template), bos_token=bos, eos_token=eos)
    if ckpt_dir is not None:
        from llamaforge.checkpoint.native import CHAT_TEMPLATE_FILE, read_chat_template

        source = read_chat_template(ckpt_dir)
        if source is not None:
            return ChatTemplate(str(Path(ckpt_dir) / CHAT_TEMPLATE_FILE), source, bos, eos)
    where = f"checkpoint {ckpt_dir}" if ckpt_dir is not None else "this model"
    raise ChatTemplateError(
        f"{where} has no chat template ({'no chat_template.jinja' if ckpt_dir else 'none given'}); "
        "pass --template alpaca|llama2|hermes|FILE (template= in Python), or finetune a checkpoint "
        "that saves one"
    )


def stop_strings(template: ChatTemplate) -> list[str]:
    """Text (other than eos) that ends a reply: what the template writes after an assistant
    message, and the start of the next user turn, each stripped of bos/eos and whitespace
    (llama2: ``[INST]``; alpaca: ``### Instruction:``). Empty if the template cannot tell."""
    user, answer, nxt = "\x02U1\x03", "\x02A1\x03", "\x02U2\x03"
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    try:
        one = template.render(msgs)
        two = template.render([*msgs, {"role": "user", "content": nxt}])
    except ChatTemplateError:
        return []

    def clean(text: str) -> str:
        for special in (template.bos_token, template.eos_token):
            if special:
                text = text.replace(special, "")
        return text.strip()

    stops = []
    if answer in one:
        stops.append(clean(one.split(answer, 1)[1]))
    if two.startswith(one) and nxt in two:
        stops.append(clean(two[len(one) :].split(nxt, 1)[0]))
    return [s for s in dict.fromkeys(stops) if s]


class _Stream:
    """Forwards streamed text without its leading whitespace and holding back trailing
    whitespace, so what is streamed is exactly the reply ``send`` returns (stripped). The
    deltas it gets are already safe (`TextFollower.delta`: no incomplete character, no tail
    that may become a stop string)."""

    def __init__(self, on_text: Callable[[str], None]) -> None:
        self.on_text = on_text
        self.started, self.held, self.emitted = False, "", 0

    def __call__(self, _row: int, delta: str) -> None:
        if not self.started:
            delta = delta.lstrip()
            self.started = bool(delta)
        text = self.held + delta
        body = text.rstrip()
        self.held = text[len(body) :]
        self._emit(body)

    def finish(self, final: str) -> None:
        """Hand out what ``final`` (the reply) has beyond what was streamed."""
        if len(final) > self.emitted:
            self._emit(final[self.emitted :])

    def _emit(self, text: str) -> None:
        if text:
            self.on_text(text)
            self.emitted += len(text)


class ChatSession:
    """A conversation with ``model``: ``send`` a user message, get the reply; ``history`` is
    the conversation so far (the system message first, if any), ``reset`` clears it.
    ``max_new_tokens`` None: `default_max_new_tokens` of the model's context, or what is left
    of it after a message too long for that (the oldest turns are dropped first)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        template: ChatTemplate | str | os.PathLike,
        *,
        system: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> None:
        # the default length gives way to a long message (what is left of the context)
        self.flexible = max_new_tokens is None
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(model.args.max_seq_len)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if max_new_tokens >= model.args.max_seq_len:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {model.args.max_seq_len} tokens"
            )
        self.model, self.tokenizer = model, tokenizer
        self.template = resolve_template(template, tokenizer)
        self.system = system
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed = seed
        self.stops = stop_strings(self.template)
        self.dropped_turns = 0  # user/assistant turns dropped to fit the context
        self.history: list[Message] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system message stays."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def encode(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of ``messages`` rendered with the generation prompt."""
        tpl = self.template
        text = tpl.render(messages, add_generation_prompt=True)
        return encode_text(self.tokenizer, text, tpl.bos_token, tpl.eos_token)

    def _fit(self, user: Message) -> tuple[list[int], list[Message]]:
        """The prompt's ids and the history it was rendered from: the oldest turns dropped
        until the prompt leaves room for ``max_new_tokens`` in the context."""
        budget = self.model.args.max_seq_len - self.max_new_tokens
        history = list(self.history)
        head = 1 if history and history[0]["role"] == "system" else 0
        while True:
            ids = self.encode([*history, user])
            if len(ids) <= budget:
                return ids, history
            turns = history[head:]
            if not turns and self.flexible and len(ids) < self.model.args.max_seq_len:
                return ids, history  # the reply stops at the end of the context
            if not turns:
                raise ChatError(
                    f"the message is too long: with the template ({self.template.name}) "
                    f"{'and the system message ' if head else ''}it is {len(ids)} tokens, and "
                    f"{self.max_new_tokens} new tokens must fit in the model's context of "
                    f"{self.model.args.max_seq_len}; shorten it or lower max_new_tokens"
                )
            # drop the oldest turn: a user message and the replies up to the next user message
            end = 1
            while end < len(turns) and turns[end]["role"] != "user":
                end += 1
            del history[head : head + end]

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Send a user message; returns the reply (also appended to ``history``).
        ``on_text(delta)`` receives the reply as it is generated."""
        from llamaforge.inference.generate import generate_completions

        user = {"role": "user", "content": text}
        ids, history = self._fit(user)
        users = [sum(m["role"] == "user" for m in h) for h in (self.history, history)]
        self.dropped_turns += users[0] - users[1]
        stream = _Stream(on_text) if on_text is not None else None
        (completion,) = generate_completions(
            self.model,
            self.tokenizer,
            [ids],
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stops,
            seed=self.seed,
            on_text=stream,
        )
        reply = completion.text.strip()
        if stream is not None:
            stream.finish(reply)
        self.history = [*history, user, {"role": "assistant", "content": reply}]
        return reply


def chat(
    ckpt_or_model: str | os.PathLike | Transformer,
    messages: str | Sequence[Mapping[str, str]],
    *,
    tokenizer: Tokenizer | None = None,
    template: ChatTemplate | str | os.PathLike | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    device: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """One reply to ``messages`` (a conversation ending with a user message, or a single user
    message as a string) from a checkpoint directory (loaded on ``device``, its own
    tokenizer and chat template unless given) or a model with ``tokenizer`` and ``template``.
    Oldest turns are dropped if the conversation does not fit the context."""
    from llamaforge.model import Transformer

    ckpt_dir = None
    if isinstance(ckpt_or_model, Transformer):
        model = ckpt_or_model
        if tokenizer is None:
            raise ValueError("chat(model, ...) needs tokenizer= (a checkpoint brings its own)")
    else:
        from llamaforge.checkpoint.native import load
        from llamaforge.device import resolve_device

        ckpt_dir = Path(ckpt_or_model)
        model, tok = load(ckpt_dir, device=resolve_device(device or "auto"))
        tokenizer = tokenizer or tok
        if tokenizer is None:
            raise ValueError(f"{ckpt_dir}: no tokenizer.model in the checkpoint; pass tokenizer=")
    tpl = resolve_template(template, tokenizer, ckpt_dir)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    msgs = [dict(m) for m in messages]
    if not msgs or msgs[-1].get("role") != "user":
        raise ValueError("chat(): messages must end with a user message")
    system = msgs[0]["content"] if msgs[0].get("role") == "system" else None
    session = ChatSession(
        model,
        tokenizer,
        tpl,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    session.history = msgs[:-1]
    return session.send(msgs[-1]["content"], on_text=on_text)
