"""Serving throughput: `llamaforge serve` against llama.cpp's server (llama-cpp-python) on
the same weights, CPU.

Each server is started on 127.0.0.1 in turn; for each client count (default 1, 8, 32)
that many clients send completions back to back for --seconds (the same prompts, greedy,
--max-tokens each). Prints aggregate generated tokens/s and p50/p99 request latency for both.
The GGUF for llama.cpp is written by `llamaforge convert --to gguf` (f32, as our server runs
fp32 on CPU). Both get --threads CPU threads.

    python bench/serve_throughput.py --ckpt CKPT                  # an existing checkpoint
    python bench/serve_throughput.py --preset 15M                 # random 15M weights
    python bench/serve_throughput.py --preset 15M --clients 1 8 32 --seconds 30 --threads 8
    python bench/serve_throughput.py --ckpt BIG --draft SMALL --draft-k 4 --only llamaforge

`--draft DIR` adds a row `llamaforge+draft`: the same server with speculative decoding
(`serve --draft DIR --draft-k N`), and its acceptance rate.

The baseline is llama.cpp's own C++ server with parallel slots and continuous batching
(`--llama-server PATH`: `llama-server --parallel N`, N = the largest client count, each slot
the model's context), or else llama-cpp-python's Python server (the `bench-serve` extra),
which answers one request at a time. `llama-server` is not on PyPI as a binary; build it from
the llama.cpp sources that llama-cpp-python's sdist vendors:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        && cmake --build build -j --target llama-server          # build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMAFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Question: What is the capital of France?\nAnswer:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def start_ours(
    ckpt: Path, threads: int, max_batch: int, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "LLAMAFORGE_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "llamaforge", "serve", "--ckpt", str(ckpt), "--port", "0"]
    cmd += ["--max-batch", str(max_batch), "--model-name", "bench", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"llamaforge serve did not start: {line!r}")
    url = f"http://127.0.0.1:{m.group(1)}"
    wait_ready(url, proc)
    return proc, url


def start_llama_cpp(gguf: Path, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads)]
    cmd += ["--n_threads_batch", str(threads), "--model_alias", "bench"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def start_llama_server(
    binary: Path, gguf: Path, threads: int, n_ctx: int, slots: int
) -> tuple[subprocess.Popen, str]:
    """llama.cpp's C++ server: ``slots`` parallel slots of ``n_ctx`` positions each, continuous
    batching (its default)."""
    port = free_port()
    cmd = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--parallel", str(slots), "--ctx-size", str(n_ctx * slots), "--threads", str(threads)]
    cmd += ["--threads-batch", str(threads), "--alias", "bench", "--cont-batching"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def drive(url: str, clients: int, seconds: float, max_tokens: int) -> dict[str, float]:
    """``clients`` clients sending completions back to back for ``seconds``."""
    latencies: list[float] = []
    tokens = 0
    errors = 0
    end = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        k = i
        while time.monotonic() < end:
            body = {
                "model": "bench",
                "prompt": PROMPTS[k % len(PROMPTS)],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            k += 1
            t0 = time.monotonic()
            r = await http.post(f"{url}/v1/completions", json=body)
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.monotonic() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    wall = time.monotonic() - t0
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "tokens_per_s": tokens / wall,
        "p50_s": pct(0.5),
        "p99_s": pct(0.99),
    }


def make_checkpoint(preset: str, out: Path) -> Path:
    tok = SHARED / "tokenizer" / "llama" / "tokenizer.model"
    if not tok.is_file():
        sys.exit(f"{tok} not found: set LLAMAFORGE_SHARED_DATA or pass --ckpt")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "llamaforge", "init", "--preset", preset, "--tokenizer", str(tok)]
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def to_gguf(ckpt: Path, out: Path, dtype: str = "f32") -> Path:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "llamaforge", "convert", "--from", "native", "--to", "gguf"]
    cmd += [str(ckpt), str(out), "--dtype", dtype, "--quiet"]
    subprocess.run(cmd, check=True, env=env)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, help="native checkpoint (default: --preset 15M)")
    src.add_argument("--preset", default="15M", help="random weights of this size")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=30.0, help="per client count and server")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's threads")
    p.add_argument(
        "--our-threads", type=int, help="llamaforge's torch threads (default: --threads)"
    )
    p.add_argument("--quantize", choices=["int8", "int8-bf16"], help="llamaforge serve --quantize")
    p.add_argument("--gguf-type", default="f32", help="llama.cpp's weights (f32, f16, q8_0)")
    p.add_argument("--only", choices=["llamaforge", "llama.cpp"], help="measure one server")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--llama-server", type=Path, help="llama.cpp's C++ llama-server binary (parallel slots)"
    )
    p.add_argument("--draft", type=Path, help="also measure `serve --draft DIR` (speculative)")
    p.add_argument("--draft-k", type=int, default=4, help="with --draft: tokens per step")
    a = p.parse_args()
    if a.llama_server is not None and not os.access(a.llama_server, os.X_OK):
        sys.exit(f"--llama-server {a.llama_server}: not an executable file")

    have_llama_cpp = a.llama_server is not None or importlib.util.find_spec("llama_cpp") is not None
    if not have_llama_cpp and a.only != "llamaforge":
        print(
            "llama_cpp not installed (pip install 'llama-cpp-python[server]', the bench-serve "
            "extra): measuring llamaforge only",
            file=sys.stderr,
        )
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.ckpt or make_checkpoint(a.preset, Path(tmp) / "ckpt")
        max_ctx = json.loads((ckpt / "params.json").read_text())["max_seq_len"]
        servers = []
        if a.only != "llama.cpp":
            ours = a.our_threads or a.threads
            quant = ("--quantize", a.quantize) if a.quantize else ()
            servers.append(("llamaforge", lambda: start_ours(ckpt, ours, max(a.clients), quant)))
            if a.draft is not None:
                spec = (*quant, "--draft", str(a.draft), "--draft-k", str(a.draft_k))
                servers.append(
                    (
                        "llamaforge+draft",
                        lambda: start_ours(ckpt, ours, max(a.clients), spec),
                    )
                )
        if have_llama_cpp and a.only != "llamaforge":
            gguf = to_gguf(ckpt, Path(tmp) / "model.gguf", a.gguf_type)
            if a.llama_server is not None:
                slots = max(a.clients)
                servers.append(
                    (
                        "llama.cpp",
                        lambda: start_llama_server(a.llama_server, gguf, a.threads, max_ctx, slots),
                    )
                )
            else:
                servers.append(("llama.cpp", lambda: start_llama_cpp(gguf, a.threads, max_ctx)))
        for name, start in servers:
            proc, url = start()
            try:
                asyncio.run(drive(url, 1, min(3.0, a.seconds), a.max_tokens))  # warm-up
                results[name] = []
                for c in a.clients:
                    r = asyncio.run(drive(url, c, a.seconds, a.max_tokens))
                    results[name].append(r)
                    print(
                        f"{name:>16}  {c:>3} clients  {r['tokens_per_s']:9.1f} tok/s  "
                        f"p50 {r['p50_s']:7.3f} s  p99 {r['p99_s']:7.3f} s  "
                        f"({r['requests']} requests, {r['errors']} errors)",
                        flush=True,
                    )
                if name == "llamaforge+draft":
                    rate = httpx.get(f"{url}/health").json()["speculative"]["acceptance_rate"]
                    print(f"{name:>16}  acceptance rate {rate or 0.0:.1%}", flush=True)
            finally:
                stop(proc)
    if "llamaforge" in results and "llama.cpp" in results:
        print("\nclients  llamaforge/llama.cpp tokens/s")
        for ours, theirs in zip(results["llamaforge"], results["llama.cpp"]):
            ratio = ours["tokens_per_s"] / max(theirs["tokens_per_s"], 1e-9)
            print(f"{int(ours['clients']):>7}  {ratio:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
