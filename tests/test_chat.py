"""Chatting with a model: ChatSession, llamaforge.chat, `llamaforge chat` and `generate --chat`,
on tiny random models (temperature 0) and real checkpoints written to disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import llamaforge
from llamaforge.chat_templates import (
    ALPACA,
    LLAMA2,
    ChatTemplateError,
    encode_text,
    load_template,
)
from llamaforge.checkpoint.native import CheckpointError, read_chat_template
from llamaforge.cli.main import main
from llamaforge.inference.chat import (
    ChatError,
    ChatSession,
    _Stream,
    default_max_new_tokens,
    stop_strings,
)

from .conftest import REPO, tiny_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, small_tokenizer):
    """A checkpoint with the llama2 template and one without a template."""
    root = tmp_path_factory.mktemp("chat")
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=256)
    with_tpl = llamaforge.save(model, small_tokenizer, root / "with-template", chat_template=LLAMA2)
    plain = llamaforge.save(model, small_tokenizer, root / "plain")
    return {"model": model, "with": with_tpl, "plain": plain}


# ----------------------------------------------------------------------------- the checkpoint


def test_checkpoint_keeps_the_template(tmp_path, small_tokenizer, ckpts):
    assert read_chat_template(ckpts["with"]) == LLAMA2
    assert (ckpts["with"] / "chat_template.jinja").read_text() == LLAMA2
    assert read_chat_template(ckpts["plain"]) is None
    model = tiny_model(small_tokenizer.vocab_size)
    with pytest.raises(CheckpointError, match="bad.*invalid Jinja"):
        llamaforge.save(model, small_tokenizer, tmp_path / "bad", chat_template="{% if %}")
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []
    out = llamaforge.checkpoint.native.save_state(
        model.state_dict().items(), model.args, None, tmp_path / "s", chat_template=ALPACA
    )
    assert read_chat_template(out) == ALPACA


def test_stop_strings_of_the_builtins():
    assert stop_strings(load_template("llama2")) == ["[INST]"]
    assert stop_strings(load_template("alpaca")) == ["### Instruction:"]


def test_stream_trims_leading_and_holds_back_trailing_whitespace():
    # the deltas come from TextFollower.delta, already free of stop-string prefixes
    out: list[str] = []
    s = _Stream(out.append)
    for delta in [" ", " \n", "Hi", " there\n", "\n"]:
        s(0, delta)
    assert out == ["Hi", " there"]
    s(0, "##x")  # more text after the whitespace: the held whitespace comes out with it
    assert "".join(out) == "Hi there\n\n##x"
    s(0, " \n")
    s.finish("Hi there\n\n##x")
    assert "".join(out) == "Hi there\n\n##x"


# ----------------------------------------------------------------------------- ChatSession


@pytest.mark.parametrize("name", ["llama2", "alpaca"])
def test_session_history_and_streaming(small_tokenizer, name):
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=256)
    session = ChatSession(
        model, small_tokenizer, name, system="Be brief.", max_new_tokens=10, temperature=0
    )
    streamed: list[str] = []
    first = session.send("hello", on_text=streamed.append)
    assert "".join(streamed) == first and first
    second = session.send("and then?")
    assert session.history == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": second},
    ]
    # the reply is what greedy generation gives for the rendered prompt
    tpl = session.template
    prompt = encode_text(
        small_tokenizer,
        tpl.render(session.history[:4], add_generation_prompt=True),
        tpl.bos_token,
        tpl.eos_token,
    )
    (c,) = llamaforge.generate_completions(
        model, small_tokenizer, [prompt], max_new_tokens=10, temperature=0, stop=session.stops
    )
    assert c.text.strip() == second
    session.reset()
    assert session.history == [{"role": "system", "content": "Be brief."}]
    assert session.send("hello") == first
    assert session.dropped_turns == 0


def test_session_drops_oldest_turns_to_fit(small_tokenizer):
    max_seq_len, new = 96, 8
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=max_seq_len)
    session = ChatSession(
        model, small_tokenizer, "llama2", system="Sys.", max_new_tokens=new, temperature=0
    )
    system = {"role": "system", "content": "Sys."}
    everything = [system]
    for k in range(8):
        before = list(session.history)
        user = {"role": "user", "content": f"question number {k}"}
        reply = session.send(user["content"])
        everything += [user, {"role": "assistant", "content": reply}]
        h = session.history
        assert h[0] == system and h[-2:] == everything[-2:]
        assert h[1:] == everything[len(everything) - len(h) + 1 :]  # the newest turns, in order
        assert len(session.encode([*h[:-1]])) + new <= max_seq_len
        kept = h[1:-2]
        dropped = before[1 : len(before) - len(kept)]
        if dropped:  # only as many as needed: one more turn would not have fit
            one_more = [system, *dropped[-2:], *kept, user]
            assert len(session.encode(one_more)) + new > max_seq_len
    assert session.dropped_turns > 0
    assert sum(m["role"] == "user" for m in session.history) == 8 - session.dropped_turns

    history = list(session.history)
    with pytest.raises(ChatError, match="too long.*context of 96"):
        session.send("word " * 200)
    assert session.history == history  # unchanged by the refused message
    with pytest.raises(ValueError, match="no room"):
        ChatSession(model, small_tokenizer, "llama2", max_new_tokens=96)


def test_llamaforge_chat_one_shot(small_tokenizer, ckpts):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "how are you?"},
    ]
    kw = {"max_new_tokens": 6, "temperature": 0}
    reply = llamaforge.chat(ckpts["with"], messages, device="cpu", **kw)
    session = ChatSession(ckpts["model"], small_tokenizer, "llama2", system="Be brief.", **kw)
    session.history = messages[:-1]
    assert reply == session.send("how are you?")
    same = llamaforge.chat(
        ckpts["model"], messages, tokenizer=small_tokenizer, template="llama2", **kw
    )
    assert same == reply
    assert llamaforge.chat(ckpts["plain"], "hello", template="llama2", device="cpu", **kw)
    with pytest.raises(ChatTemplateError, match=r"plain.*--template alpaca\|llama2\|hermes\|FILE"):
        llamaforge.chat(ckpts["plain"], "hello", device="cpu", **kw)
    with pytest.raises(ValueError, match="end with a user message"):
        llamaforge.chat(ckpts["with"], messages[:-1], device="cpu", **kw)
    # the conversation lives in llamaforge.inference.chat: llamaforge.chat is the function
    # whatever was imported before (no submodule of that name can replace it)
    assert llamaforge.chat is sys.modules["llamaforge.inference.chat"].chat


# ----------------------------------------------------------------------------- the CLI


def test_cli_chat_subprocess(small_tokenizer, ckpts):
    """`llamaforge chat` as a user runs it, with lines on stdin instead of a terminal."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = ["--ckpt", ckpts["with"], "--temperature", "0", "--max-new-tokens", "8"]
    proc = subprocess.run(
        [sys.executable, "-m", "llamaforge", "chat", *map(str, args), "--device", "cpu"],
        input="hello\n/reset\nhi\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    session = ChatSession(
        ckpts["model"], small_tokenizer, "llama2", max_new_tokens=8, temperature=0
    )
    first = session.send("hello")
    session.reset()
    second = session.send("hi")  # after /reset: as a fresh conversation
    assert proc.stdout == f"{first}\n{second}\n"
    assert "history cleared" in proc.stderr


def test_cli_chat_in_process_eof_and_system(capsys, monkeypatch, small_tokenizer, ckpts):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n/nope\nagain\n"))  # EOF ends it
    status = main(
        ["chat", "--ckpt", str(ckpts["plain"]), "--template", "alpaca", "--system", "Sys.",
         "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0, err
    session = ChatSession(
        ckpts["model"], small_tokenizer, "alpaca", system="Sys.", max_new_tokens=6, temperature=0
    )
    assert out == f"{session.send('hello')}\n{session.send('again')}\n"
    assert "unknown command /nope" in err


def test_generate_chat(capsys, small_tokenizer, ckpts):
    status = main(
        ["generate", "--ckpt", str(ckpts["with"]), "--chat", "--system", "Sys.",
         "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0, err
    session = ChatSession(
        ckpts["model"], small_tokenizer, "llama2", system="Sys.", max_new_tokens=8, temperature=0
    )
    assert out.strip() == session.send("hello")


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_missing_template_is_a_clear_error(capsys, monkeypatch, ckpts, command):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    extra = ["--chat", "--prompt", "hi"] if command == "generate" else []
    status = main([command, "--ckpt", str(ckpts["plain"]), *extra, "--device", "cpu"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert str(ckpts["plain"]) in err and "no chat template" in err
    assert "--template alpaca|llama2|hermes|FILE" in err and "Traceback" not in err


def test_generate_template_without_chat_is_refused(capsys, ckpts):
    status = main(["generate", "--ckpt", str(ckpts["with"]), "--prompt", "x", "--system", "s"])
    assert status == 2 and "need --chat" in capsys.readouterr().err


def test_the_default_reply_length_fits_the_model(small_tokenizer, ckpts):
    """256 tokens per reply, or half the context when that is less: a model of 256 positions
    (the quickstart's) chats with the defaults."""
    assert [default_max_new_tokens(n) for n in (2048, 512, 256, 96, 3)] == [256, 256, 128, 48, 1]
    small = tiny_model(small_tokenizer.vocab_size, max_seq_len=96)
    session = ChatSession(small, small_tokenizer, "llama2", temperature=0)
    assert session.max_new_tokens == 48
    # a message too long for 48 new tokens (but not for the context) gets what room is left
    # with the default; a length asked for is kept, so it is refused
    long = "word " * 20
    assert 48 < len(session.encode([{"role": "user", "content": long}])) < 90
    assert session.send(long) is not None
    with pytest.raises(ChatError, match="too long"):
        ChatSession(small, small_tokenizer, "llama2", max_new_tokens=48).send(long)
    assert ChatSession(ckpts["model"], small_tokenizer, "llama2").max_new_tokens == 128
    reply = llamaforge.chat(ckpts["with"], "hello", temperature=0, device="cpu")
    assert reply == ChatSession(ckpts["model"], small_tokenizer, "llama2", temperature=0).send(
        "hello"
    )


def test_read_message_continues_lines_and_reads_blocks():
    from llamaforge.cli.chat import read_message

    def messages(text: str) -> list[str]:
        lines = iter(text.split("\n"))

        def read(prompt: str) -> str | None:
            return next(lines, None)

        out = []
        while (m := read_message(read)) is not None:
            out.append(m)
        return out

    typed = (
        "one line\n"
        "What is the name of the function defined here?\\\n"
        "def parse(line, strict=True):\n"
        'a\\\nb\\\nc\n'
        '"""\nQuestion:\n\n    indented code\n"""\n'
        '"""first line\nlast line"""\n'
        '"""all on one line"""\n'
        "C:\\path\\ not continued\n"
        '"""\nunclosed at EOF'
    )
    assert messages(typed) == [
        "one line",
        "What is the name of the function defined here?\ndef parse(line, strict=True):",
        "a\nb\nc",
        "Question:\n\n    indented code",
        "first line\nlast line",
        "all on one line",
        "C:\\path\\ not continued",
        "unclosed at EOF",
    ]


def test_cli_chat_multiline_messages_and_default_length_from_a_pipe(small_tokenizer, ckpts):
    """`llamaforge chat --ckpt CKPT` with nothing else, on a model of 256 positions, given the
    demo's kind of question (a line ending with a backslash, then a `def` line) and a
    triple-quoted block with a blank line, piped: each is one message."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    first = "What is the name of the function defined here?\ndef parse(line, strict=True):"
    second = "Question:\n\ndef f(x):"
    typed = first.replace("\n", "\\\n") + '\n"""\n' + second + '\n"""\n'
    proc = subprocess.run(
        [sys.executable, "-m", "llamaforge", "chat", "--ckpt", str(ckpts["with"]),
         "--temperature", "0", "--device", "cpu"],
        input=typed, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "replies of up to 128 tokens, half of the model's context of 256" in proc.stderr
    session = ChatSession(ckpts["model"], small_tokenizer, "llama2", temperature=0)
    assert proc.stdout == f"{session.send(first)}\n{session.send(second)}\n"


def test_chat_help_documents_multiline_input(capsys):
    assert main(["chat", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "end a line with \\ to continue the message on the next line" in out
    assert 'between two """ lines' in out
