"""Hostile chat templates: every one is a one-line ChatTemplateError (at load or at render),
never a traceback, a hang or a crash; a render runs in a worker process that is killed at its
time limit, so nothing keeps running; a server answers such a request with a 400 and serves on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llamaforge.chat_templates import (
    ChatTemplate,
    ChatTemplateError,
    ChatTemplateLimitError,
    load_template,
)

from .conftest import REPO
from .test_serve_engine import l2c_ckpt  # noqa: F401  (fixture)

HI = [{"role": "user", "content": "hi"}]
SLOW = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
# slow only for one message, as a request could make it
BOOM = (
    "{% for m in messages %}{% if m['content'] == 'boom' %}" + SLOW + "{% endif %}"
    "{{ bos_token + m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
LINUX = Path("/proc/self/statm").exists()

# (template, what the error says, whether it is a limit)
AT_RENDER = {
    "nested_loops": (SLOW, r"takes longer than 1 s to render \(its time_limit\)", True),
    "lipsum": ("{{ lipsum(n=10000000) }}", r"takes longer than|needs more memory", True),
    "huge_string": ("{{ 'a' * 4000000000 }}", r"'\*' would build a str of 4000000000", True),
    "huge_list": ("{{ (range(100000)|list) * 100 }}", r"would build a list", True),
    "huge_power": ("{{ 2 ** 99999999 }}", r"'\*\*' would compute an integer over", True),
    "tojson_indent": ("{{ messages|tojson(indent=400000000) }}", r"indent must be", False),
    "tojson_float": ("{{ messages|tojson(indent=4e8) }}", r"indent must be", False),
    "format_width": ("{{ '%0999999999d' % 1 }}", r"needs more memory than its memory_limit", True),
    "str_format": ("{{ '{:999999999}'.format(1) }}", r"needs more memory", True),
    "center": ("{{ 'a'|center(999999999) }}", r"needs more memory", True),
    "doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
        r"needs more memory",
        True,
    ),
    "output": (
        "{% for i in range(100000) %}{{ 'x' * 50 }}{% endfor %}",
        r"renders more than",
        True,
    ),
    "macro_recursion": (
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        r"line 1: recurses too deeply",
        False,
    ),
    "loop_recursion": (
        "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
        r"recurses too deeply",
        False,
    ),
    "division": ("\n{{ 1 / 0 }}", r"line 2: ZeroDivisionError: division by zero", False),
    "range": ("{{ range(10 ** 9)|list }}", r"OverflowError: Range too big", False),
    "undefined": ("{{ foo.bar }}", r"'foo' is undefined", False),
    "unsafe": ("{{ messages.__class__.__mro__ }}", r"unsafe", False),
    "own_error": ("{{ raise_exception('no\\nway') }}", r"chat template own_error: no way$", False),
    "deep_message": ("{{ messages|tojson }}", r"recurs|nested|depth", False),
}
AT_LOAD = {
    "include": ("{% include 'other.jinja' %}", r"line 1: \{% include %\} is not allowed"),
    "import": ("{% import 'other.jinja' as o %}", r"\{% import %\} is not allowed"),
    "from_import": ("\n{% from 'o.jinja' import m %}", r"line 2: \{% from \.\.\. import %\}"),
    "extends": ("{% extends 'base.jinja' %}", r"\{% extends %\} is not allowed"),
    "syntax": ("{% if %}", r"invalid Jinja at line 1"),
    "unknown_filter": ("{{ messages|nope }}", r"invalid Jinja at line 1: No filter named 'nope'"),
    "deep_parens": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", r"nested too deeply"),
    "deep_blocks": (
        "{% for m in messages %}" * 30 + "x" + "{% endfor %}" * 30,
        r"cannot be compiled \(SyntaxError: too many statically nested blocks\)",
    ),
}


def one_line(e: BaseException, name: str) -> str:
    text = str(e)
    assert text.startswith(f"chat template {name}: ") and "\n" not in text, text
    # nothing chained: printed, it is this line and nothing else
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    return text


def deep_message() -> list[dict]:
    msg: dict = {"role": "user", "content": "x"}
    inner = msg
    for _ in range(5000):
        inner["more"] = {}
        inner = inner["more"]
    return [msg]


@pytest.mark.parametrize("name", sorted(AT_RENDER))
def test_hostile_render_is_one_line(name):
    source, says, limit = AT_RENDER[name]
    if "memory" in says and not LINUX:
        pytest.skip("the memory limit is Linux's (RLIMIT_AS against /proc/self/statm)")
    tpl = ChatTemplate(name, source, time_limit=1.0)
    messages = deep_message() if name == "deep_message" else HI
    with pytest.raises(ChatTemplateError) as info:
        tpl.render(messages)
    assert re.search(says, one_line(info.value, name)), str(info.value)
    assert isinstance(info.value, ChatTemplateLimitError) == limit


@pytest.mark.parametrize("name", sorted(AT_LOAD))
def test_hostile_template_is_refused_at_load(name, tmp_path):
    source, says = AT_LOAD[name]
    path = tmp_path / f"{name}.jinja"
    path.write_text(source)
    with pytest.raises(ChatTemplateError) as info:
        load_template(path)
    assert re.search(says, one_line(info.value, str(path))), str(info.value)


def _children() -> dict[int, str]:
    """This process's children and their states (R running, S sleeping, Z zombie, ...)."""
    kids = [
        int(pid)
        for task in Path(f"/proc/{os.getpid()}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    return {pid: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] for pid in kids}


def test_a_slow_message_fails_alone_and_nothing_keeps_running():
    """One message makes the template loop: that render fails at the time limit while
    renders in other threads succeed; no thread or process is left running it, and the next
    render gets a fresh worker."""
    tpl = ChatTemplate("boom", BOOM, time_limit=1.0)
    tpl.render(HI)  # a worker is up
    threads = threading.active_count()

    def go(content: str) -> str:
        try:
            return tpl.render([{"role": "user", "content": content}], True)
        except ChatTemplateLimitError as e:
            return one_line(e, "boom")

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(go, ["boom", "a", "boom", "b", "c", "boom"]))
    for content, text in zip(["boom", "a", "boom", "b", "c", "boom"], out):
        if content == "boom":
            assert "takes longer than 1 s to render" in text
        else:
            assert text == f"<s>user: {content}\nassistant:"
    assert threading.active_count() == threads
    kids = _children()  # the pool's idle workers wait; the killed ones are gone
    assert "R" not in kids.values(), kids
    assert tpl.render([{"role": "user", "content": "z"}]) == "<s>user: z\n"


def test_limits_are_settings_and_scale_with_the_messages():
    echo = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    big = [{"role": "user", "content": "word " * 400_000}]  # 2 MB: over 1 MiB, but all input
    assert len(ChatTemplate("echo", echo).render(big)) == 2_000_000
    tpl = ChatTemplate(
        "echo", echo + "{% for i in range(99) %}xx{% endfor %}", max_output_chars=100
    )
    # 100 + 4 times the 17 characters of "role", "user", "content" and "hi"
    with pytest.raises(ChatTemplateLimitError, match=r"renders more than 168 characters"):
        tpl.render([{"role": "user", "content": "hi"}])
    for field, value in (("time_limit", 0), ("max_output_chars", -1), ("memory_limit", "1G")):
        with pytest.raises(ChatTemplateError, match=rf"chat template t: {field} must be a pos"):
            ChatTemplate("t", echo, **{field: value})


def test_server_answers_400_and_serves_on(l2c_ckpt, tmp_path):  # noqa: F811
    """The real server with a template that loops on one message: that request is a 400
    naming the time limit, /health and other requests are answered, SIGTERM stops it."""
    import httpx

    from .test_serve import ServerProcess

    template = tmp_path / "boom.jinja"
    template.write_text(BOOM)
    server = ServerProcess("--ckpt", str(l2c_ckpt), "--template", str(template))
    try:
        url = f"{server.url}/v1/chat/completions"

        def chat(content: str) -> httpx.Response:
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
            return httpx.post(url, json=body, timeout=120)

        with ThreadPoolExecutor(2) as pool:
            hostile = pool.submit(chat, "boom")
            health = pool.submit(lambda: httpx.get(f"{server.url}/health", timeout=120))
            assert health.result().status_code == 200
            r = hostile.result()
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "takes longer than 2 s to render (its time_limit)" in message, message
        assert "\n" not in message
        assert chat("hello").status_code == 200
        server.proc.terminate()
        assert server.proc.wait(timeout=60) is not None
    finally:
        server.stop()


def test_generate_chat_reports_one_line(l2c_ckpt, tmp_path):  # noqa: F811
    template = tmp_path / "boom.jinja"
    template.write_text(BOOM)
    cmd = [sys.executable, "-m", "llamaforge", "generate", "--ckpt", str(l2c_ckpt), "--chat"]
    cmd += ["--template", str(template), "--prompt", "boom", "--max-new-tokens", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"chat template {template}: takes longer than 2 s to render" in lines[0]
