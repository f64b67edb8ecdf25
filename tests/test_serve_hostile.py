"""Hostile clients against a real `llamaforge serve` on 127.0.0.1 (raw sockets, httpx, the
openai client). Every case gets a clear one-line error in OpenAI's shape or a documented safe
behaviour: no traceback in the server's log, no silent acceptance of a field the server does
not implement, no hang, nothing lost. Requests that break the engine fail alone; connections
that send nothing, half their headers or half their body are closed in bounded time; one over
--max-connections gets a 503; at a low open-file limit a flood of connections neither runs
the server out of descriptors nor floods its log; a slow chat template does not stall other
clients; and under a load of hostile and normal requests mixed, every normal request gets the
answer the server gives it alone."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from llamaforge.chat_templates import ALPACA

from .test_serve import ServerProcess, assert_still_serves, chat_ckpt, idle  # noqa: F401
from .test_serve_engine import _one_thread, l2c_ckpt, loaded  # noqa: F401  (fixtures)

USER = [{"role": "user", "content": "Tell me a story."}]
LIMITS = ("--header-timeout", "1", "--body-timeout", "1")


@pytest.fixture(scope="module")
def server(chat_ckpt):  # noqa: F811
    srv = ServerProcess(
        "--ckpt", str(chat_ckpt), "--max-batch", "2", "--max-queue", "8",
        "--max-body-bytes", "65536", "--max-connections", "24", *LIMITS,
    )  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def post(server: ServerProcess, path: str, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    """``r`` is OpenAI's error with ``status``, one line, naming ``param``."""
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and "\n" not in err["message"] and len(err["message"]) < 300, err
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_no_tracebacks(server: ServerProcess) -> None:
    log = "".join(server.stderr)
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]


def greedy(prompt: str, **kw: object) -> dict:
    return {"prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}


def chat(**kw: object) -> dict:
    return {"messages": USER, "max_tokens": 4, **kw}


# ------------------------------------------------------------------- request fields

COMPLETIONS = [  # (body, param): each a 400 naming param
    (greedy("x", seed=2**64), "seed"),
    (greedy("x", seed=-(2**63) - 1), "seed"),
    (greedy("x", seed="5"), "seed"),
    (greedy("x", seed="\ud800"), "seed"),  # a lone surrogate in the error message
    (greedy("x", max_tokens="5"), "max_tokens"),
    (greedy("x", max_tokens=5.0), "max_tokens"),
    (greedy("x", max_tokens=True), "max_tokens"),
    (greedy("x", max_tokens=10**30), "max_tokens"),
    (greedy("x", stream="yes"), "stream"),
    (greedy("x", echo=1), "echo"),
    (greedy("x", temperature="0.5"), "temperature"),
    (greedy("x", temperature=True), "temperature"),
    (greedy("x", top_p=0), "top_p"),
    (greedy("x", logprobs=6), "logprobs"),
    (greedy("x", n=0), "n"),
    (greedy("x", best_of=3), "best_of"),
    (greedy("x", suffix="the end"), "suffix"),
    (greedy("x", logit_bias={"50": 101}), "logit_bias.50"),
    (greedy("x", logit_bias={"x": 1}), "logit_bias"),
    (greedy("x", presence_penalty=2.5), "presence_penalty"),
    (greedy("x", frequency_penalty="0"), "frequency_penalty"),
    (greedy("x", stop=["a", "b", "c", "d", "e"]), "stop"),
    (greedy("x", stop=[1]), "stop"),
    (greedy("x", model=5), "model"),
    (greedy("x", user=5), "user"),
    (greedy("x", stream=True, stream_options={"include_usage": "yes"}), None),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": [[1], ["a"]]}, "prompt"),
    ({"prompt": [[1]] * 9}, "prompt"),  # more prompts than --max-queue 8
    ({"prompt": None}, "prompt"),
    ({}, "prompt"),
]
CHAT = [
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(tool_choice="required"), "tool_choice"),
    (chat(response_format={"type": "xml"}), "response_format.type"),
    (chat(logit_bias={"1": "5"}), "logit_bias.1"),
    (chat(logprobs="true"), "logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(modalities=["text", "audio"]), "modalities"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ({"messages": [{"role": "assistant", "tool_calls": "f"}]}, "messages.0.tool_calls"),
    ({"messages": []}, "messages"),
]
OTHERS = [
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "add_special_tokens"),
    ("/detokenize", {"tokens": [1, "2"]}, "tokens.1"),
    ("/detokenize", {"tokens": [2**70]}, "tokens"),
]
RAW = [  # bodies that are not JSON objects
    b"NaN",
    b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",  # beyond Python's int parsing
    b"[" * 30_000 + b"]" * 30_000,  # nested deeper than the parser's recursion
    b"\xff\xfe{}",
    b'{"prompt": "\\ud800"}',  # a lone surrogate: not UTF-8
]


def test_every_bad_field_is_a_400_naming_it_and_the_server_keeps_serving(server, client):
    for body, param in COMPLETIONS:
        assert_error(post(server, "/v1/completions", body), 400, param)
    for body, param in CHAT:
        assert_error(post(server, "/v1/chat/completions", body), 400, param)
    for path, body, param in OTHERS:
        assert_error(post(server, path, body), 400, param)
    for body in RAW:
        assert_error(post(server, "/v1/completions", body), 400)
    assert_error(post(server, "/v1/completions", greedy("x", model="\ud800")), 404, "model")
    # what changes nothing is accepted: a client's defaults
    ok = greedy("Once", n=1, logit_bias={}, presence_penalty=0, user="u", seed=2**63 - 1)
    assert post(server, "/v1/completions", ok).status_code == 200
    ok = chat(tools=[], tool_choice="none", response_format={"type": "text"}, temperature=1)
    assert post(server, "/v1/chat/completions", ok).status_code == 200
    assert_still_serves(client)
    assert_no_tracebacks(server)


def test_bad_seeds_beyond_the_batch_do_not_stop_the_server(server, client):
    """The issue's report: a seed outside 64 bits, more such requests than --max-batch
    slots; each is refused, and the next request gets its text."""
    want = client.completions.create(**greedy("Once upon a time"), model="l2c-chat").choices[0].text
    bodies = [greedy("Once upon a time", seed=s) for s in (2**64, 2**64 + 5, -(2**64), 2**100)]
    with ThreadPoolExecutor(4) as pool:
        for r in pool.map(lambda b: post(server, "/v1/completions", b), bodies):
            assert_error(r, 400, "seed")
    got = client.completions.create(**greedy("Once upon a time"), model="l2c-chat").choices[0].text
    assert got == want
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


# ------------------------------------------------------------------------ connections


def read_until_closed(sock: socket.socket, limit: float = 20.0) -> bytes:
    """Everything the server sends until it closes ``sock``; fails if it is still open
    after ``limit`` seconds (a hang guard, far above the timeouts under test)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open: {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return data


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def status_and_error(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def test_silent_and_half_sent_connections_are_closed(server):
    silent = connect(server)
    assert read_until_closed(silent) == b""  # nothing asked, nothing answered
    half_head = connect(server)
    half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    status, err = status_and_error(read_until_closed(half_head))
    assert status == 408 and err["code"] == "header_timeout"
    half_body = connect(server)
    half_body.sendall(
        b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt"'
    )
    status, err = status_and_error(read_until_closed(half_body))
    assert status == 408 and err["code"] == "body_timeout"
    # a kept-alive connection that starts its next request and stalls
    kept = connect(server)
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while b'"status"' not in first:
        first += kept.recv(65536)
    kept.sendall(b"G")
    status, err = status_and_error(read_until_closed(kept))
    assert status == 408 and err["code"] == "header_timeout"
    for s in (silent, half_head, half_body, kept):
        s.close()


def test_a_slow_drip_of_headers_is_cut_off(server):
    """Slowloris: a byte of the headers every 0.2 s keeps the connection busy but never
    completes a request; the header timeout counts from the start, not from the last byte."""
    sock = connect(server)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    stop = threading.Event()

    def drip() -> None:
        for byte in head:
            if stop.wait(0.2):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        status, err = status_and_error(read_until_closed(sock))
    finally:
        stop.set()
        t.join()
        sock.close()
    assert status == 408 and err["code"] == "header_timeout"


def test_connections_over_the_cap_get_a_503(server):
    """Kept-alive connections (each has had an answer and waits for its keep-alive timeout)
    fill --max-connections 24: the next one is answered 503 at once, by raw socket and
    through httpx; once they close, requests are served again."""
    held, refused = [], None
    for _ in range(40):
        s = connect(server)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"}" not in got:
            got += s.recv(65536)
        if got.startswith(b"HTTP/1.1 503"):
            refused = got + read_until_closed(s)
            break
        assert got.startswith(b"HTTP/1.1 200"), got
        held.append(s)
    try:
        assert refused is not None and len(held) <= 24, len(held)
        status, err = status_and_error(refused)
        assert status == 503 and err["code"] == "too_many_connections"
        r = httpx.get(f"{server.url}/v1/models", timeout=30)
        assert_error(r, 503)
        assert r.headers["retry-after"] == "1"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "still refused after every connection closed"
        time.sleep(0.1)


def test_oversize_headers_are_a_400(server):
    sock = connect(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n")
    status, err = status_and_error(read_until_closed(sock))
    assert status == 400 and "\n" not in err["message"]
    sock.close()


def test_a_flood_of_connections_at_a_low_open_file_limit(chat_ckpt):  # noqa: F811
    """With 256 open files the server takes at most 96 connections and a backlog that fits;
    600 connections opened at once are served, refused with a 503 or timed out, the log stays
    a few lines (no "Too many open files"), and the server answers again."""
    srv = ServerProcess("--ckpt", str(chat_ckpt), *LIMITS, open_files=256)

    def open_one(_: int) -> socket.socket | None:
        try:
            return socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        except OSError:
            return None

    try:
        assert "at most 96 connections" in srv.banner
        with ThreadPoolExecutor(32) as pool:
            socks = [s for s in pool.map(open_one, range(600)) if s is not None]
        assert len(socks) > 300  # the flood reached the server
        firsts = []
        for s in socks:
            s.settimeout(30)
            try:
                firsts.append(s.recv(12))
            except OSError:
                firsts.append(b"reset")
            s.close()
        assert firsts.count(b"HTTP/1.1 503") > 100  # over the cap: refused at once
        assert set(firsts) <= {b"HTTP/1.1 503", b"", b"reset"}  # else closed by the timeout
        assert post(srv, "/v1/completions", greedy("Once")).status_code == 200
        assert_no_tracebacks(srv)
        assert len(srv.stderr) < 20, "".join(srv.stderr)[-3000:]
    finally:
        srv.stop()


# ---------------------------------------------------------------- the chat template


SLOW = (
    "{% if 'SLOW' in messages[-1]['content'] %}{% for i in range(30000) %}"
    "{% for j in range(1000) %}{% endfor %}{% endfor %}{% endif %}"
)


def test_a_slow_chat_template_does_not_stall_other_clients(chat_ckpt, tmp_path):  # noqa: F811
    """A template that takes seconds for one conversation is rendered off the event loop:
    requests sent after it are answered while it is still rendering."""
    template = tmp_path / "slow.jinja"
    template.write_text(SLOW + ALPACA)
    srv = ServerProcess("--ckpt", str(chat_ckpt), "--template", str(template))
    try:
        done: list[str] = []

        def slow() -> None:
            body = {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 2}
            r = post(srv, "/v1/chat/completions", body)
            done.append(f"slow {r.status_code}")

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)  # the slow request is in (its render takes seconds)
        for _ in range(3):
            assert httpx.get(f"{srv.url}/health", timeout=60).status_code == 200
            assert post(srv, "/v1/chat/completions", chat()).status_code == 200
            done.append("fast")
        t.join(120)
        assert done[:3] == ["fast"] * 3 and done[3] in ("slow 200", "slow 400"), done
        assert_no_tracebacks(srv)
    finally:
        srv.stop()


# ------------------------------------------------------------------- a wedged engine


def test_health_is_503_while_the_engine_is_wedged(l2c_ckpt):  # noqa: F811
    """The real app and engine in-process: a consumer that blocks the engine's thread
    (as a stuck forward would) makes /health a 503 after --stall-timeout; it is 200 again once
    the engine moves."""
    import llamaforge
    from llamaforge.serve.app import Server, create_app
    from llamaforge.serve.engine import Engine, SamplingParams

    model, tok = llamaforge.load(l2c_ckpt)
    engine = Engine(model, tok, max_batch=2, stall_timeout=0.3)
    app = create_app(Server(engine, tok, model_name="m"))
    engine.start()
    release = threading.Event()

    async def health(c: httpx.AsyncClient) -> httpx.Response:
        return await c.get("/health")

    async def go() -> tuple[list[httpx.Response], httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            before = await health(c)
            engine.submit(tok.encode("Once"), SamplingParams(3, 0.0), lambda _: release.wait(30))
            wedged = await health(c)
            for _ in range(200):
                if wedged.status_code == 503:
                    break
                await asyncio.sleep(0.05)
                wedged = await health(c)
            release.set()
            after = await health(c)
            for _ in range(200):
                if after.status_code == 200:
                    break
                await asyncio.sleep(0.05)
                after = await health(c)
            return [before, wedged], after

    try:
        (before, wedged), after = asyncio.run(go())
    finally:
        release.set()
        engine.stop()
    assert before.status_code == 200
    assert wedged.status_code == 503 and "no progress" in wedged.json()["error"]
    assert after.status_code == 200


def test_repeated_log_lines_are_rate_limited():
    from llamaforge.serve.net import RateLimit

    now = [0.0]
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("llamaforge.test.ratelimit")
    logger.propagate = False
    logger.addHandler(Keep())
    logger.addFilter(RateLimit(burst=3, window=60.0, clock=lambda: now[0]))
    for i in range(1000):
        logger.warning("accept failed: %d", i)
    logger.warning("another message")
    assert records == [
        "accept failed: 0",
        "accept failed: 1",
        "accept failed: 2",
        "another message",
    ]
    now[0] = 61.0
    logger.warning("accept failed: %d", 1000)
    assert records[-1] == "accept failed: 1000 [and 997 more like it in 60 s, not logged]"


# ------------------------------------------------------------------ hostile under load

STORIES = ["Once upon a time", "The little dog", "Lily and Tom", "One day", "The sun", "A cat"]


def normal_requests() -> list[tuple[str, dict]]:
    """Greedy completions and chats, streamed and not: 24 requests."""
    jobs = []
    for p in STORIES:
        for stream in (False, True):
            jobs.append(("/v1/completions", {**greedy(p), "max_tokens": 12, "stream": stream}))
            msgs = [{"role": "user", "content": p}]
            body = {"messages": msgs, "max_tokens": 8, "temperature": 0, "stream": stream}
            jobs.append(("/v1/chat/completions", body))
    return jobs


async def answer(c: httpx.AsyncClient, path: str, body: dict) -> str:
    """The text of one request, from its SSE chunks when it streams."""
    chat = path.endswith("chat/completions")
    if not body.get("stream"):
        r = await c.post(path, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]
    text = ""
    async with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            if choices:
                text += (choices[0]["delta"].get("content") or "") if chat else choices[0]["text"]
    return text


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection, then read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return got


async def hostile(c: httpx.AsyncClient, port: int, kind: str) -> None:
    """One hostile request of ``kind``, checked against the answer it must get."""
    if kind in ("seed", "type", "unsupported", "oversize"):
        body = {
            "seed": greedy("Once", seed=2**64),
            "type": greedy("Once", max_tokens="5"),
            "unsupported": greedy("Once", logit_bias={"7": 1000}),
            "oversize": {"prompt": "z" * (2 << 20)},
        }[kind]
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == (413 if kind == "oversize" else 400), r.text
    elif kind == "disconnect":
        body = {"prompt": "Once upon a time", "max_tokens": 60, "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                break  # gone after the first line
    elif kind == "half_head":
        got = await raw_exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert got.startswith(b"HTTP/1.1 408"), got
    elif kind == "half_body":
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
        assert (await raw_exchange(port, head)).startswith(b"HTTP/1.1 408")
    else:  # silent
        assert await raw_exchange(port, b"") == b""


def test_hostile_requests_mixed_with_normal_ones(chat_ckpt):  # noqa: F811
    """24 greedy requests (completions and chats, streamed and not) all at once with 36
    hostile ones (bad seeds, wrong types, unsupported fields, oversize bodies, disconnects
    mid-stream, half-sent headers and bodies, silent connections): every normal request gets
    the text the server gives it alone, every hostile one its error, and the server ends idle
    with a clean log."""
    srv = ServerProcess(
        "--ckpt", str(chat_ckpt), "--max-batch", "4", "--max-connections", "128",
        "--header-timeout", "2", "--body-timeout", "2",
    )  # fmt: skip
    jobs = normal_requests()
    kinds = ["seed", "type", "unsupported", "oversize", "disconnect", "half_head", "half_body",
             "silent", "seed"] * 4  # fmt: skip

    async def run() -> tuple[list[str], list[str]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with (
            httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as c,
            httpx.AsyncClient(base_url=srv.url, timeout=120) as rogue,
        ):
            alone = [await answer(c, path, body) for path, body in jobs]
            tasks = [answer(c, path, body) for path, body in jobs]
            tasks += [hostile(rogue, srv.port, kind) for kind in kinds]
            together = await asyncio.gather(*tasks)
        return alone, list(together[: len(jobs)])

    try:
        alone, together = asyncio.run(run())
        assert all(alone) and together == alone
        h = idle(srv)
        assert h["status"] == "ok" and h["running"] == 0
        assert_no_tracebacks(srv)
    finally:
        srv.stop()
