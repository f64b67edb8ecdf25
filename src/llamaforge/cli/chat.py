"""``llamaforge chat``: an interactive conversation with a checkpoint in the terminal
(the conversation itself: chat.py)."""

from __future__ import annotations

import argparse
import sys

from llamaforge.cli.loading import add_load_args, load_checkpoint

HELP = "/reset clears the history (the system message stays), /exit or Ctrl-D leaves"


def add_template_args(p: argparse.ArgumentParser) -> None:
    """``--template`` and ``--system``, shared with ``generate --chat``."""
    p.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="chat template: alpaca, llama2 or a .jinja file (default: the checkpoint's "
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
        f"are dropped when it outgrows the context). {HELP}. Reads lines from stdin when it "
        "is not a terminal.",
    )
    add_load_args(c)
    add_template_args(c)
    c.add_argument("--max-new-tokens", type=int, default=256, help="per reply (default 256)")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default 0.9)")
    c.add_argument("--seed", type=int, default=None)
    c.set_defaults(func=_chat)


def _read_line(interactive: bool) -> str | None:
    """The next input line (None at EOF); with a terminal, after a ``>>> `` prompt."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _chat(a: argparse.Namespace) -> int:
    from llamaforge.chat_templates import ChatTemplateError
    from llamaforge.inference.chat import ChatError, ChatSession, resolve_template

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
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {a.ckpt} (template {template.name}); {HELP}", file=sys.stderr)

    def stream(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    while True:
        line = _read_line(interactive)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
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
