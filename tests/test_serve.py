"""`llamaforge serve` as a real process on 127.0.0.1, driven by the real `openai` client (sync,
async, streaming), raw HTTP (httpx) and lm-eval's ``local-completions``: text equal to
`generate_completions` at temperature 0 alone and in a busy batch, streams that add up to
the non-streamed text, exact usage, OpenAI's error shapes and exception classes, API keys,
429s, cancellation on disconnect, and a server that keeps serving after every bad request."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

import llamaforge
from llamaforge.chat_templates import ALPACA
from llamaforge.cli.main import main
from llamaforge.inference.generate import generate_completions

from .conftest import REPO
from .test_serve_engine import _one_thread, l2c_ckpt, loaded  # noqa: F401  (fixtures)

SYSTEM = {"role": "system", "content": "Tell stories."}  # Alpaca's preamble: 101 tokens
PROMPTS = ["Once upon a time", "The little dog", "In a land far away, there lived a king"]


class ServerProcess:
    """``python -m llamaforge serve ... --port 0`` on 127.0.0.1; its port read from the first
    line it prints; stopped by `stop`."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 180,
        open_files: int | None = None,
        launcher: Sequence[str] = (sys.executable, "-m", "llamaforge", "serve"),
    ):
        """``open_files``: the server's open-file limit (soft and hard); ``launcher``: the
        command before ``--port 0`` and ``args`` (torchrun's, for ``--tp``)."""
        cmd = [*launcher, "--port", "0", *args]
        # one CPU thread: the test models are tiny (see test_serve_engine._one_thread)
        full_env = {
            **os.environ,
            "PYTHONPATH": str(REPO / "src"),
            "LLAMAFORGE_THREADS": "1",
            **(env or {}),
        }

        def limit_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            preexec_fn=limit_files,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))
        reader.start()
        reader.join(timeout)
        self.banner = line[0] if line else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)", self.banner)
        if not m:
            self.stop()
            raise RuntimeError(f"server did not start: {line} {''.join(self.stderr)[-3000:]}")
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server never became healthy")

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def chat_ckpt(loaded, tmp_path_factory):  # noqa: F811
    model, tok = loaded
    return llamaforge.save(model, tok, tmp_path_factory.mktemp("chat") / "l2c-chat",
                           chat_template=ALPACA)  # fmt: skip


@pytest.fixture(scope="module")
def server(chat_ckpt):
    srv = ServerProcess("--ckpt", str(chat_ckpt), "--max-batch", "4", "--max-body-bytes", "65536")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def assert_still_serves(client) -> None:
    r = client.completions.create(model="l2c-chat", prompt="Once", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def idle(server, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(f"{server.url}/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"server still busy: {h}")


# ------------------------------------------------------------------------ plain endpoints


def test_models_health_tokenize_metrics(server, loaded):  # noqa: F811
    _, tok = loaded
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "l2c-chat"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Once upon a time"}).json()
    assert r["tokens"] == tok.encode("Once upon a time") and r["count"] == len(r["tokens"])
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "</s>", "add_special_tokens": False})
    assert r.json()["tokens"] == [tok.eos_id]
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": tok.encode("a dog")}).json()
    assert r["prompt"] == "a dog"
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and "### Response" in info["chat_template"]
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "llamaforge_requests_total",
        "llamaforge_generated_tokens_total",
        "llamaforge_tokens_per_second",
        "llamaforge_queue_depth",
        "llamaforge_kv_cache_usage_ratio",
        "llamaforge_request_latency_seconds_bucket",
        "llamaforge_time_to_first_token_seconds_bucket",
    ):
        assert name in metrics.text
    assert 'llamaforge_requests_total{endpoint="detokenize",status="400"} 1.0' in metrics.text


# ---------------------------------------------------------------------- correctness


def test_greedy_equals_generate_alone_and_in_a_busy_batch(server, client, loaded):  # noqa: F811
    model, tok = loaded
    refs = [
        generate_completions(model, tok, [p], max_new_tokens=30, temperature=0.0)[0]
        for p in PROMPTS
    ]

    def greedy(p: str):
        return client.completions.create(model="l2c-chat", prompt=p, max_tokens=30, temperature=0)

    for p, ref in zip(PROMPTS, refs):  # alone
        r = greedy(p)
        assert r.choices[0].text == ref.text
        assert r.usage.prompt_tokens == len(tok.encode(p))
        assert r.usage.completion_tokens == len(ref.tokens) + (ref.finish_reason == "eos")

    def noisy(i: int) -> str:  # sampled, streamed requests keeping the batch busy
        s = client.completions.create(
            model="l2c-chat", prompt="Lily and", max_tokens=50, temperature=1.0, seed=i,
            stream=True,
        )  # fmt: skip
        return "".join(c.choices[0].text for c in s)

    with ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(noisy, i) for i in range(5)]
        time.sleep(0.3)
        mine = [pool.submit(greedy, p) for p in PROMPTS]
        assert [f.result().choices[0].text for f in mine] == [r.text for r in refs]
        assert all(isinstance(f.result(), str) for f in busy)
    idle(server)


def test_stream_equals_non_stream_with_exact_usage(server, client):
    kwargs = dict(model="l2c-chat", prompt="The little dog", max_tokens=40, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    # chat: the same through the template, streamed and not
    msgs = [SYSTEM, {"role": "user", "content": "Tell me a story."}]
    chat = client.chat.completions.create(
        model="l2c-chat", messages=msgs, max_completion_tokens=30, temperature=0, seed=1
    )
    stream = client.chat.completions.create(
        model="l2c-chat", messages=msgs, max_completion_tokens=30, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content and chat.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert chunks[-1].usage == chat.usage and chunks[-1].choices == []
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == chat.choices[0].finish_reason and not any(reasons[:-1])


def test_raw_sse_format(server):
    body = {"prompt": "Once", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    ids = {json.loads(e[6:])["id"] for e in events[:-2]}
    assert len(ids) == 1


def test_chat_logprobs_and_completion_echo_logprobs(server, client, loaded):  # noqa: F811
    _, tok = loaded
    r = client.chat.completions.create(
        model="l2c-chat", messages=[SYSTEM, {"role": "user", "content": "Hi"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == item.logprob
        assert isinstance(item.bytes, list)
    ids = tok.encode("Once upon a time")
    r = client.completions.create(
        model="l2c-chat", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:]) and r.usage.completion_tokens == 0
    assert r.choices[0].text == tok.decode(ids)


def test_async_client(server):
    async def go() -> list[str]:
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        rs = await asyncio.gather(
            *(
                c.completions.create(model="l2c-chat", prompt=p, max_tokens=10, temperature=0)
                for p in PROMPTS
            )
        )
        s = await c.chat.completions.create(
            model="l2c-chat", messages=[SYSTEM, {"role": "user", "content": "Go"}], max_tokens=8,
            stream=True,
        )  # fmt: skip
        parts = [ch.choices[0].delta.content or "" async for ch in s if ch.choices]
        await c.close()
        return [r.choices[0].text for r in rs] + ["".join(parts)]

    out = asyncio.run(go())
    assert len(out) == 4 and all(isinstance(t, str) for t in out)


# --------------------------------------------------------------------------- errors


def test_errors_are_openai_errors_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens > context
        client.completions.create(model="l2c-chat", prompt="Once " * 20, max_tokens=120)
    assert "context" in e.value.message and e.value.code == "context_length_exceeded"
    assert_still_serves(client)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="l2c-chat", prompt="x", temperature=-1)
    assert e.value.param == "temperature"
    assert_still_serves(client)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="l2c-chat", messages=[{"role": "wizard", "content": "x"}]
        )
    assert e.value.param == "messages.0.role"
    with pytest.raises(openai.BadRequestError):  # roles that do not alternate
        client.chat.completions.create(
            model="l2c-chat",
            messages=[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
        )
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model="l2c-chat", prompt="x", stream_options={"include_usage": True}
        )
    assert "stream_options" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    assert_still_serves(client)
    raw = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"prompt": "x" * 70_000}).encode(), 413),
        (json.dumps({"prompt": []}).encode(), 400),
        (json.dumps({"prompt": [[1, 2], "a"]}).encode(), 400),
        (json.dumps({"prompt": [1, 10**7], "max_tokens": 1}).encode(), 400),
    ]
    for body, status in raw:
        r = httpx.post(
            f"{server.url}/v1/completions",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == status, (body[:40], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]

    def chunks():  # no Content-Length: the limit is counted while reading
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"w" * 4096
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/completions", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(f"{server.url}/v1/nothing", json={})
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.APIStatusError) as e:  # oversize through the client
        client.completions.create(model="l2c-chat", prompt="y" * 70_000)
    assert e.value.status_code == 413
    assert_still_serves(client)


def test_disconnect_cancels_and_frees_the_cache(server):
    body = {"prompt": "Once upon a time", "max_tokens": 100, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith("data: ")
    h = idle(server, timeout=30)
    assert h["running"] == 0
    m = httpx.get(f"{server.url}/metrics").text
    assert re.search(r"^llamaforge_kv_cache_usage_ratio 0\.0$", m, re.M), m


# ---------------------------------------------------------------- key, 429, no template


@pytest.fixture(scope="module")
def keyed(l2c_ckpt):  # noqa: F811
    srv = ServerProcess(
        "--ckpt", str(l2c_ckpt), "--api-key", "sekret", "--max-batch", "1", "--max-queue", "1",
        "--model-name", "tiny",
    )  # fmt: skip
    yield srv
    srv.stop()


def test_api_key_queue_limit_and_no_template(keyed):
    url = f"{keyed.url}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    r = httpx.post(f"{url}/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{keyed.url}/health").status_code == 200  # liveness needs no key
    c = openai.OpenAI(base_url=url, api_key="sekret", max_retries=0, timeout=120)
    assert [m.id for m in c.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "no_chat_template" and "chat template" in e.value.message

    def long_request(i: int):
        try:
            c.completions.create(model="tiny", prompt="Once", max_tokens=100, temperature=1)
            return 200
        except openai.RateLimitError as err:
            assert err.response.headers["retry-after"] == "1"
            return 429

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(long_request, range(4)))
    assert 429 in statuses and 200 in statuses
    r = c.completions.create(model="tiny", prompt="Once", max_tokens=3)
    assert r.usage.completion_tokens >= 1


# ------------------------------------------------------------------------------ CLI


def test_cli_refusals(l2c_ckpt, capsys):  # noqa: F811
    assert main(["serve", "--ckpt", str(l2c_ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch 0" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(l2c_ckpt), "--header-timeout", "0"]) == 2
    assert "--header-timeout 0.0: must be > 0 seconds" in capsys.readouterr().err
    assert main(["serve", "--ckpt", str(l2c_ckpt), "--max-connections", str(10**9)]) == 2
    assert "the open-file limit (ulimit -n) is" in capsys.readouterr().err
    code = "import sys; from llamaforge.cli.main import main; main(['serve', '--help'])\n"
    code += "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "--max-batch" in r.stdout, r.stderr


# --------------------------------------------------------------------------- lm-eval


@pytest.mark.slow
def test_lm_eval_local_completions_matches_our_backend(server, chat_ckpt, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity", reason="lm_eval[api] is needed for local-completions")
    import lm_eval.models.openai_completions  # noqa: F401, F811  (registers it)
    from lm_eval.tasks import TaskManager

    import llamaforge.eval.harness  # noqa: F401  (registers "llamaforge")

    from .test_eval_engine import mc_rows, write_jsonl
    from .test_eval_lmeval import TASK_YAML

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_jsonl(tmp_path / "test.jsonl", mc_rows())
    (tmp_path / "tasks").mkdir()
    name = "llamaforge_serve_mc"
    yaml = TASK_YAML.format(name=name, test=tmp_path / "test.jsonl")
    (tmp_path / "tasks" / f"{name}.yaml").write_text(yaml)

    def run(model: str, model_args: str) -> tuple[float, list[int]]:
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=[name],
            task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
            log_samples=True,
            bootstrap_iters=0,
        )
        docs = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        return out["results"][name]["acc,none"], [d["acc"] for d in docs]

    ours = run("llamaforge", f"ckpt={chat_ckpt},device=cpu,progress=false")
    served = run(
        "local-completions",
        f"base_url={server.url}/v1/completions,model=l2c-chat,tokenizer_backend=remote,"
        "tokenized_requests=True,num_concurrent=4,max_retries=1,max_length=128",
    )
    print(f"\nlm-eval acc: llamaforge backend {ours[0]}, local-completions {served[0]}")
    assert served == ours


# ------------------------------------------------------------- errors mid-stream


def test_model_failure_mid_stream_is_an_openai_error_event(l2c_ckpt):  # noqa: F811
    """A model whose logits turn NaN (a broken checkpoint): the streamed request gets its
    role chunk, then an error event and [DONE]; non-streamed it is a 500; the server (the
    real app in-process, its real engine thread) serves the next request."""
    import torch

    from llamaforge.chat_templates import load_template
    from llamaforge.serve.app import Server, create_app
    from llamaforge.serve.engine import Engine

    model, tok = llamaforge.load(l2c_ckpt)
    engine = Engine(model, tok, max_batch=2)
    srv = Server(engine, tok, model_name="m", template=load_template("llama2"))
    app = create_app(srv)
    engine.start()

    async def go() -> tuple[str, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            streamed = (await c.post("/v1/chat/completions", json=body)).text
            plain = await c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3})
            with torch.no_grad():
                model.output.weight[5] = 0.0
            good = await c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3})
        return streamed, plain, good

    with torch.no_grad():
        model.output.weight[5] = float("nan")
    try:
        streamed, plain, good = asyncio.run(go())
    finally:
        engine.stop()
    events = [e for e in streamed.split("\n\n") if e]
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    err = json.loads(events[-2][6:])["error"]
    assert "NaN" in err["message"] and err["type"] == "server_error"
    assert events[-1] == "data: [DONE]"
    assert plain.status_code == 500 and plain.json()["error"]["code"] == "engine_error"
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
