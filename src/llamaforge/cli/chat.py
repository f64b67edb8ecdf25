"""``llamaforge chat``: an interactive conversation with a checkpoint in the terminal
(the conversation itself: llamaforge.inference.chat)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from llamaforge.cli.loading import add_load_args, load_checkpoint

HELP = "/reset clears the history (the system message stays), /exit or Ctrl-D leaves"
# a message of several lines: each line but the last ends with a backslash (llama.cpp), or
# the lines go between two lines of three double quotes (Ollama)
CONTINUE, BLOCK = "\\", '"""'
MULTILINE = (
    f"end a line with {CONTINUE} to continue the message on the next line, or put it between "
    f"two {BLOCK} lines (blank lines and all)"
)


def add_template_args(p: argparse.ArgumentParser) -> None:
    """``--template`` and ``--system``, shared with ``generate --chat``."""
    p.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="chat template: alpaca, llama2, hermes or a .jinja file (default: the checkpoint's "
        "chat_template.jinja)",
    )
    p.add_argument("--system", metavar="TEXT", help="system message")


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``chat`` command."""
    c = subparsers.add_parser(
        "chat",
        help="chat with a checkpoint in the terminal",
        description="Chat with a checkpoint: each line you type is a user message, the "
        "reply is streamed as it is generated and the conversation is kept (the oldest turns "
        f"are dropped when it outgrows the context). A message of several lines: {MULTILINE}. "
        f"{HELP}. "
        "Reads lines from stdin, the same way, when it is not a terminal.",
    )
    add_load_args(c)
    add_template_args(c)
    c.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="per reply (default 256, or half the model's context when that is less)",
    )
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default 0.9)")
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(func=_chat)


def _read_line(interactive: bool, prompt: str = ">>> ") -> str | None:
    """The next input line (None at EOF); with a terminal, after ``prompt``."""
    if interactive:
        try:
            return input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def read_message(read: Callable[[str], str | None]) -> str | None:
    """The next message from ``read(prompt)`` (a line, None at EOF): one line; lines joined
    while each ends with a backslash; or the lines between an opening line that starts with
    three double quotes and a closing one that ends with them (text beside the quotes is
    part of the message). None at EOF before a message; EOF inside one ends it."""
    line = read(">>> ")
    if line is None:
        return None
    if line.lstrip().startswith(BLOCK):
        first = line.lstrip()[len(BLOCK) :]
        if first.rstrip().endswith(BLOCK):  # """one line"""
            return first.rstrip()[: -len(BLOCK)]
        lines = [first] if first.strip() else []
        while (line := read("... ")) is not None:
            if line.rstrip().endswith(BLOCK):
                last = line.rstrip()[: -len(BLOCK)]
                lines += [last] if last.strip() else []
                break
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line is not None and line.endswith(CONTINUE):
        lines.append(line[: -len(CONTINUE)])
        line = read("... ")
    return "\n".join([*lines, line] if line is not None else lines)


def _chat(a: argparse.Namespace) -> int:
    from llamaforge.chat_templates import ChatTemplateError
    from llamaforge.inference.chat import MAX_NEW_TOKENS, ChatError, ChatSession, resolve_template

    model, tok, _, _ = load_checkpoint(a)
    template = resolve_template(a.template, tok, a.ckpt)
    session = ChatSession(
        model,
        tok,
        template,
        system=a.system,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
    )
    context = model.args.max_seq_len
    if a.max_new_tokens is None and session.max_new_tokens < MAX_NEW_TOKENS:
        print(
            f"replies of up to {session.max_new_tokens} tokens, half of the model's context of "
            f"{context} (--max-new-tokens N to change)",
            file=sys.stderr,
        )
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"chatting with {a.ckpt} (template {template.name}); {MULTILINE}; {HELP}",
            file=sys.stderr,
        )

    def stream(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    while (message := read_message(lambda prompt: _read_line(interactive, prompt))) is not None:
        text = message.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and not any(c.isspace() for c in text):
            print(f"unknown command {text}: {HELP}", file=sys.stderr)
            continue
        try:
            session.send(text, on_text=stream)
        except (ChatError, ChatTemplateError) as e:  # a message too long: say so, go on
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
