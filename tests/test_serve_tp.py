"""`llamaforge serve --tp 2` under torchrun on the CPU (two Gloo processes, 127.0.0.1),
driven by the real `openai` client: concurrent greedy completions and chat requests,
streamed and not, give the text (and the logprobs) of a one-process server and of
`generate_completions`; speculative decoding with a draft on rank 0 gives the same text;
Ctrl-C and SIGTERM to torchrun end both ranks, rank 1 printing nothing; and the refusals:
no torchrun, heads that do not split, --quantize."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import llamaforge
from llamaforge.cli.main import main
from llamaforge.inference.generate import generate_completions

from .conftest import REPO, tiny_model
from .test_serve import PROMPTS, SYSTEM, ServerProcess, chat_ckpt  # noqa: F401 (a fixture)
from .test_serve_engine import l2c_ckpt, loaded  # noqa: F401  (fixtures)

MAX_TOKENS = 24


class TorchrunServer(ServerProcess):
    """``torchrun --standalone --nproc_per_node 2 -m llamaforge serve --tp 2 --port 0 …``;
    its port read from the first line rank 0 prints, its ranks' process ids from torchrun's
    children."""

    def __init__(self, *args: str, timeout: float = 180):  # noqa: D107
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", "2", "-m", "llamaforge", "serve", "--tp", "2"]
        env = {"OMP_NUM_THREADS": "1"}
        super().__init__(*args, env=env, timeout=timeout, launcher=launcher)
        pid = self.proc.pid
        self.ranks = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert len(self.ranks) == 2, self.ranks

    def end(self, sig: signal.Signals, timeout: float = 60) -> str:
        """Send ``sig`` to torchrun; once it has exited, check that both ranks have ended
        too; the rest of its stdout."""
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"torchrun still runs {timeout} s after {sig.name}") from None
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{r}").exists() for r in self.ranks):
            assert time.monotonic() < deadline, f"a rank outlived torchrun: {self.ranks}"
            time.sleep(0.1)
        assert self.proc.stdout is not None
        return self.proc.stdout.read()


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def requests(c: openai.OpenAI) -> list[tuple[str, Any]]:
    """Greedy requests sent at once: completions (one with logprobs, one streamed) and
    chat, streamed and not; each answer's (text, finish reason) and logprobs if any."""

    def complete(prompt: str, **kw: Any) -> tuple[str, Any]:
        r = c.completions.create(
            model="l2c-chat", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kw
        )
        lp = r.choices[0].logprobs
        return (r.choices[0].text, r.choices[0].finish_reason), lp and lp.token_logprobs

    def complete_streamed(prompt: str) -> tuple[str, Any]:
        s = c.completions.create(
            model="l2c-chat", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        chunks = [ch.choices[0] for ch in s if ch.choices]
        return ("".join(ch.text for ch in chunks), chunks[-1].finish_reason), None

    def chat(content: str, stream: bool) -> tuple[str, Any]:
        msgs = [SYSTEM, {"role": "user", "content": content}]
        kw: dict[str, Any] = dict(
            model="l2c-chat", messages=msgs, max_tokens=MAX_TOKENS, temperature=0
        )
        if not stream:
            r = c.chat.completions.create(**kw)
            return (r.choices[0].message.content, r.choices[0].finish_reason), None
        parts = [ch.choices[0] for ch in c.chat.completions.create(**kw, stream=True)]
        text = "".join(p.delta.content or "" for p in parts)
        return (text, parts[-1].finish_reason), None

    jobs = [lambda p=p: complete(p) for p in PROMPTS[1:]]
    jobs += [
        lambda: complete(PROMPTS[0], logprobs=2),
        lambda: complete_streamed(PROMPTS[0]),
        lambda: chat("Tell me a story.", stream=False),
        lambda: chat("Tell me a story.", stream=True),
        lambda: chat("Who is the king?", stream=True),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: job(), jobs))


@pytest.mark.slow
def test_tp2_serves_the_text_of_one_process(chat_ckpt, loaded):  # noqa: F811
    model, tok = loaded
    refs = [generate_completions(model, tok, [p], max_new_tokens=MAX_TOKENS, temperature=0.0)[0]
            for p in PROMPTS]  # fmt: skip
    one = ServerProcess("--ckpt", str(chat_ckpt), "--max-batch", "4")
    try:
        want = requests(client(one))
    finally:
        one.stop()
    two = TorchrunServer("--ckpt", str(chat_ckpt), "--max-batch", "4", "--block-size", "8")
    try:
        assert "split over 2 processes" in two.banner
        got = requests(client(two))
        again = requests(client(two))  # the prompts' blocks now come from the prefix cache
        metrics = httpx.get(f"{two.url}/metrics", timeout=30).text
    finally:
        rest = two.end(signal.SIGINT)
    assert [g[0] for g in got] == [w[0] for w in want] == [g[0] for g in again]
    # the completions' text is also generate's
    texts = [g[0][0] for g in got]
    assert texts[:2] == [r.text for r in refs[1:]] and texts[2] == texts[3] == refs[0].text
    # logprobs: the same up to float rounding (the split layers add in another order)
    lp_one, lp_two = want[2][1], got[2][1]
    assert len(lp_two) == len(lp_one) == MAX_TOKENS
    assert all(abs(a - b) < 1e-4 for a, b in zip(lp_one, lp_two))
    hits = re.search(r"^llamaforge_prefix_cache_hit_ratio (\S+)", metrics, re.M)
    assert hits and float(hits.group(1)) > 0, metrics[-2000:]
    # only rank 0 printed: its banner, nothing more on stdout
    assert rest == "" and two.banner.startswith("llamaforge serve:")
    assert "llamaforge serve: stopped" in "".join(two.stderr)


@pytest.mark.slow
def test_tp2_speculates_with_a_draft_on_rank_0_and_ends_on_sigterm(chat_ckpt, loaded):  # noqa: F811
    model, tok = loaded
    refs = [generate_completions(model, tok, [p], max_new_tokens=MAX_TOKENS, temperature=0.0)[0]
            for p in PROMPTS]  # fmt: skip
    two = TorchrunServer("--ckpt", str(chat_ckpt), "--draft", str(chat_ckpt), "--draft-k", "3")
    try:
        c = client(two)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(lambda p: c.completions.create(
                model="l2c-chat", prompt=p, max_tokens=MAX_TOKENS, temperature=0
            ).choices[0].text, PROMPTS))  # fmt: skip
    finally:
        two.end(signal.SIGTERM)
    assert got == [r.text for r in refs]
    err = "".join(two.stderr)
    m = re.search(r"speculative decoding: (\d+)/(\d+) drafted tokens accepted", err)
    assert m and int(m.group(2)) > 0 and int(m.group(1)) > 0, err[-2000:]


@pytest.mark.slow
def test_tp2_ranks_end_when_torchrun_is_killed(chat_ckpt):  # noqa: F811
    """torchrun killed without its clean-up (SIGKILL, the OOM killer): neither rank outlives
    it (they would keep the port and their memory for ever): rank 0 stops as on SIGTERM,
    the worker is killed."""
    two = TorchrunServer("--ckpt", str(chat_ckpt))
    two.proc.kill()
    two.proc.wait(30)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{r}").exists() and _alive(r) for r in two.ranks):
        assert time.monotonic() < deadline, f"ranks outlived torchrun: {two.ranks}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_tp_refusals(chat_ckpt, capsys):  # noqa: F811
    ckpt = str(chat_ckpt)
    assert main(["serve", "--ckpt", ckpt, "--tp", "2", "--port", "0"]) == 2
    assert "torchrun --nproc_per_node 2 -m llamaforge" in capsys.readouterr().err
    assert main(["serve", "--ckpt", ckpt, "--tp", "0"]) == 2
    assert "--tp 0: must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--ckpt", ckpt, "--tp", "2", "--quantize", "int8"]) == 2
    assert "--quantize int8: int8 weights do not split" in capsys.readouterr().err
    assert main(["serve", "--ckpt", ckpt, "--tp", "2", "--lora-dir", ckpt]) == 2
    assert "--lora/--lora-dir: LoRA adapters are served on one process" in capsys.readouterr().err
    assert main(["serve", "--ckpt", ckpt, "--tp", "2", "--compile"]) == 2
    assert "--compile: the compiled decode step runs on one process" in capsys.readouterr().err
    assert main(["serve", "--ckpt", ckpt, "--compile", "--lora-dir", ckpt]) == 2
    assert "--compile with --lora/--lora-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_tp2_refuses_a_model_whose_heads_do_not_split(loaded, tmp_path):  # noqa: F811
    _, tok = loaded
    ckpt = llamaforge.save(tiny_model(tok.vocab_size, n_kv_heads=1), tok, tmp_path / "one-kv")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, "--nproc_per_node", "2", "-m", "llamaforge", "serve", "--tp", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--ckpt", str(ckpt), "--port", "0"], env=env, text=True,
                          capture_output=True, timeout=180)  # fmt: skip
    assert proc.returncode != 0 and proc.stdout == ""
    assert "n_kv_heads=1 is not divisible by 2" in proc.stderr, proc.stderr[-3000:]
