"""Serving throughput: `llamaforge serve` against llama.cpp's server on the same weights.

Each server is started on 127.0.0.1 in turn (a row); for each workload and client count
(default 1, 8, 32) that many clients send streaming completions back to back for --seconds
(greedy, --max-tokens each). Per cell: aggregate generated tokens/s, p50/p99 time to first
token, p50/p99 per-token latency (the gaps between a stream's text chunks: one token each,
except with speculative decoding, whose chunks hold the tokens of a step), request p99
and errors; for our rows also the KV-cache bytes held per token in use, read from /metrics
about once a second. Prints markdown tables ready for BENCHMARKS.md, with the ratios against
llama.cpp measured in the same run, the machine and the date.

Workloads (--workloads):
  short          today's 4 short prompts in turn (about 10 tokens each)
  mixed          prompts of 16 to 512 tokens in turn (real text: the shared TinyStories
                 sample, else a standard-library source file)
  shared-prefix  every prompt is the same --prefix-tokens prefix (512) then a short distinct
                 suffix, as with a long system prompt

Rows (--rows):
  llamaforge                  `llamaforge serve` (--quantize, --device, --dtype as given)
  llamaforge-no-prefix-cache  the same with `--no-prefix-cache`, shared-prefix workload only
                              (skipped with a message when `serve` has no such flag)
  llamaforge+draft            the same with `--draft DIR --draft-k N` (speculative), and its
                              acceptance rate
  llama.cpp                   llama.cpp's C++ server (`--llama-server PATH`: `llama-server
                              --parallel N --cont-batching`, N = the largest client count,
                              each slot --ctx positions, its own prompt cache on), or else
                              llama-cpp-python's Python server (one request at a time)

Weights: --preset writes random weights (`llamaforge init`, max_seq_len=--ctx) with Meta's
tokenizer; --ckpt uses a checkpoint. llama.cpp gets a GGUF written by `llamaforge convert`:
f32 for --gguf-type f32 (our fp32 peer); for q8_0 (the peer of --quantize int8 or int8-bf16)
the f32 GGUF is quantised by llama.cpp's own `llama-quantize` (found beside --llama-server,
or --llama-quantize PATH; else `llamaforge convert --dtype q8_0`, said on stderr).

    python bench/serve_throughput.py --preset 15M --threads 2 --llama-server PATH/llama-server \\
        --workloads short mixed                                               # fp32 / f32
    python bench/serve_throughput.py --preset 15M --threads 2 --llama-server PATH/llama-server \\
        --workloads short mixed --quantize int8-bf16 --gguf-type q8_0         # int8 / q8_0
    python bench/serve_throughput.py --preset 15M --threads 2 --llama-server PATH/llama-server \\
        --workloads shared-prefix               # with and without our prefix cache, llama.cpp
    python bench/serve_throughput.py --preset 1B --device cuda --dtype bfloat16 \\
        --rows llamaforge --workloads short --clients 1 8 32 128 --ctx 256

On a GPU (--device cuda) the tables add the memory-bandwidth bound: clients x the card's
measured copy bandwidth / the bytes of weights one decode step reads (every weight but the
embedding table), i.e. the tokens/s no decoder of these weights can pass at that batch.

`llama-server` is not on PyPI as a binary; build it from the llama.cpp sources that
llama-cpp-python's sdist vendors:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        && cmake --build build -j --target llama-server llama-quantize    # build/bin/
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from llamaforge.tokenizer import Tokenizer  # noqa: E402

SHARED = Path(os.environ.get("LLAMAFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "def fibonacci(n):",
    "Question: What is the capital of France?\nAnswer:",
]
WORKLOADS = ("short", "mixed", "shared-prefix")
ROWS = ("llamaforge", "llamaforge-no-prefix-cache", "llamaforge+draft", "llama.cpp")
MIXED_LENGTHS = (16, 512, 32, 256, 64, 128, 24, 384)  # tokens, in turn
SUFFIX_LENGTHS = (8, 12, 16, 20, 24)
METRICS_EVERY = 1.0  # seconds between /metrics scrapes


# ---------------------------------------------------------------- prompts


def source_text() -> str:
    """Real English for the prompts: the shared TinyStories sample, else a stdlib source."""
    stories = SHARED / "pretrain" / "stories" / "tinystories" / "tinystories_val.txt"
    if stories.is_file():
        return stories.read_text(encoding="utf-8")[:300_000]
    return Path(os.__file__).read_text(encoding="utf-8")  # always on the machine


def cut(tok: Tokenizer, ids: list[int], n: int) -> str:
    """Text of about ``n`` tokens from ``ids``: the longest decoded prefix that encodes back to
    exactly ``n`` tokens when one exists near ``n``, else ``ids[:n]`` decoded."""
    for m in (n, n - 1, n + 1, n - 2, n + 2, n - 3, n + 3):
        text = tok.decode(ids[:m])
        if len(tok.encode(text, bos=False)) == n:
            return text
    return tok.decode(ids[:n])


def build_prompts(workload: str, tok: Tokenizer, prefix_tokens: int) -> list[str]:
    """The prompts a workload's clients send in turn."""
    if workload == "short":
        return list(PROMPTS)
    ids = tok.encode(source_text(), bos=False)
    if workload == "mixed":
        step = max(MIXED_LENGTHS) + 64
        return [cut(tok, ids[i * step :], n) for i, n in enumerate(MIXED_LENGTHS)]
    if workload == "shared-prefix":
        prefix = cut(tok, ids, prefix_tokens)
        base = prefix_tokens + 256
        out = []
        for i in range(64):
            n = SUFFIX_LENGTHS[i % len(SUFFIX_LENGTHS)]
            out.append(f"{prefix}\n\n{cut(tok, ids[base + 40 * i :], n)}")
        return out
    raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")


def prompt_lengths(prompts: list[str], tok: Tokenizer) -> str:
    n = sorted(len(tok.encode(p)) for p in prompts)
    return f"{n[0]}" if n[0] == n[-1] else f"{n[0]}-{n[-1]} (mean {sum(n) / len(n):.0f})"


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def our_env(threads: int | None = None) -> dict[str, str]:
    path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    if threads is not None:
        env["LLAMAFORGE_THREADS"] = str(threads)
    return env


def start_ours(
    ckpt: Path, threads: int, max_batch: int, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "llamaforge", "serve", "--ckpt", str(ckpt), "--port", "0"]
    cmd += ["--max-batch", str(max_batch), "--model-name", "bench", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=our_env(threads))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"llamaforge serve did not start: {line!r}")
    url = f"http://127.0.0.1:{m.group(1)}"
    wait_ready(url, proc, "/v1/models")
    return proc, url


def serve_flags() -> str:
    """`llamaforge serve --help`, to see which flags this version has."""
    cmd = [sys.executable, "-m", "llamaforge", "serve", "--help"]
    return subprocess.run(cmd, capture_output=True, text=True, env=our_env()).stdout


def start_llama_cpp(gguf: Path, threads: int, n_ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads)]
    cmd += ["--n_threads_batch", str(threads), "--model_alias", "bench"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "/v1/models")
    return proc, url


def start_llama_server(
    binary: Path, gguf: Path, threads: int, n_ctx: int, slots: int
) -> tuple[subprocess.Popen, str]:
    """llama.cpp's C++ server: ``slots`` parallel slots of ``n_ctx`` positions each, continuous
    batching and prompt caching (its defaults)."""
    port = free_port()
    cmd = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--parallel", str(slots), "--ctx-size", str(n_ctx * slots), "--threads", str(threads)]
    cmd += ["--threads-batch", str(threads), "--alias", "bench", "--cont-batching"]
    log = gguf.with_suffix(".log").open("w")  # its output, shown if it fails
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, "/health")
    except RuntimeError as e:
        stop(proc)
        tail = gguf.with_suffix(".log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"llama-server: {e}; its output ends:\n{tail}") from None
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- /metrics: KV bytes per token


@dataclass
class KvProbe:
    """What to read from our /metrics: explicit names (--kv-bytes-metric, --kv-tokens-metric)
    or, by default, ``llamaforge_kv_cache_bytes_per_token`` and ``llamaforge_kv_cache_tokens``
    (the paged engine's), else the first KV metric whose name says bytes held or tokens in use
    (tokens: ``usage_ratio x positions`` at worst); without a bytes metric, the whole cache
    (``llamaforge_kv_cache_positions`` x ``bytes_per_position``) counts as held, which is what
    today's slot cache allocates at start."""

    bytes_per_position: int
    bytes_metric: str | None = None
    tokens_metric: str | None = None
    names_seen: set[str] = field(default_factory=set)

    def read(self, m: dict[str, float]) -> tuple[float, float, str] | None:
        """(bytes held, tokens in use, where the bytes came from) of one scrape; None when no
        token is in use."""
        self.names_seen.update(k for k in m if "kv" in k)
        tokens = self._tokens(m)
        if not tokens:
            return None
        name = self.bytes_metric or _find(m, r"kv\w*bytes_per_token|kv\w*per_token_bytes")
        if name in m and "per_token" in name:
            return m[name] * tokens, tokens, name
        name = self.bytes_metric or _find(
            m, r"kv\w*(used|held|in_use)\w*bytes|kv\w*bytes\w*(used|held|in_use)"
        )
        if name in m:
            return m[name], tokens, name
        positions = m.get("llamaforge_kv_cache_positions")
        if positions:
            return positions * self.bytes_per_position, tokens, "whole cache (positions x bytes)"
        return None

    def _tokens(self, m: dict[str, float]) -> float | None:
        pattern = (
            r"kv\w*(tokens|positions)_?(used|in_use|held)"
            r"|kv\w*(used|in_use|held)_?(tokens|positions)"
        )
        name = self.tokens_metric or _find(m, r"^llamaforge_kv_cache_tokens$|" + pattern)
        if name in m:
            return m[name]
        ratio, positions = (
            m.get("llamaforge_kv_cache_usage_ratio"),
            m.get("llamaforge_kv_cache_positions"),
        )
        return ratio * positions if ratio is not None and positions is not None else None


def _find(m: dict[str, float], pattern: str) -> str:
    return next((k for k in sorted(m) if re.search(pattern, k)), "")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition: each metric's value, summed over its label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        try:
            out[head.split("{", 1)[0]] = out.get(head.split("{", 1)[0], 0.0) + float(value)
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------- clients


@dataclass
class Cell:
    """One row x workload x client count."""

    row: str
    workload: str
    clients: int
    wall: float = 0.0
    tokens: int = 0
    errors: int = 0
    first_error: str = ""
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    kv: list[tuple[float, float, str]] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what[:200]

    def summary(self) -> dict[str, float | int | str | None]:
        held = sum(b for b, _, _ in self.kv)
        used = sum(t for _, t, _ in self.kv)
        return {
            "row": self.row,
            "workload": self.workload,
            "clients": self.clients,
            "requests": len(self.latency),
            "errors": self.errors,
            "first_error": self.first_error,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.wall if self.wall else 0.0,
            "ttft_p50_s": pct(self.ttft, 0.5),
            "ttft_p99_s": pct(self.ttft, 0.99),
            "token_p50_s": pct(self.gaps, 0.5),
            "token_p99_s": pct(self.gaps, 0.99),
            "request_p50_s": pct(self.latency, 0.5),
            "request_p99_s": pct(self.latency, 0.99),
            "kv_tokens_in_use": used / len(self.kv) if self.kv else None,
            "kv_bytes_per_token": held / used if used else None,
            "kv_source": self.kv[0][2] if self.kv else None,
        }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def one_request(http: httpx.AsyncClient, url: str, body: dict, cell: Cell) -> None:
    """A streaming completion: time to its first text, the gaps between its text chunks, and
    its token count (the usage chunk's, else the text chunks')."""
    t0 = time.monotonic()
    times: list[float] = []
    usage = None
    done = False
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            cell.error(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                cell.error(f"stream error: {chunk['error']}")
                return
            if any(c.get("text") for c in chunk.get("choices") or []):
                times.append(time.monotonic())
            usage = chunk.get("usage") or usage
    if not done:
        cell.error("stream ended without [DONE]")
        return
    cell.latency.append(time.monotonic() - t0)
    cell.tokens += usage["completion_tokens"] if usage else len(times)
    if times:
        cell.ttft.append(times[0] - t0)
        cell.gaps.extend(b - a for a, b in zip(times, times[1:]))


async def scrape(http: httpx.AsyncClient, url: str, probe: KvProbe, cell: Cell, end: float) -> None:
    while time.monotonic() < end:
        try:
            r = await http.get(f"{url}/metrics")
            got = probe.read(parse_metrics(r.text)) if r.status_code == 200 else None
            if got is not None:
                cell.kv.append(got)
        except httpx.HTTPError:
            pass
        await asyncio.sleep(METRICS_EVERY)


async def drive(
    url: str, cell: Cell, seconds: float, max_tokens: int, prompts: list[str], probe: KvProbe | None
) -> Cell:
    """``cell.clients`` clients sending streaming completions back to back for ``seconds``."""
    end = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = i
        while time.monotonic() < end:
            body = {
                "model": "bench",
                "prompt": prompts[k % len(prompts)],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            k += 1
            try:
                await one_request(http, url, body, cell)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
                cell.error(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.1)  # a server gone: no busy loop

    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=cell.clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        tasks = [client(i, http) for i in range(cell.clients)]
        if probe is not None:
            tasks.append(scrape(http, url, probe, cell, end))
        await asyncio.gather(*tasks)
    cell.wall = time.monotonic() - t0
    return cell


# ---------------------------------------------------------------- weights


def make_checkpoint(preset: str, out: Path, ctx: int, dtype: str | None) -> Path:
    tok = SHARED / "tokenizer" / "llama" / "tokenizer.model"
    if not tok.is_file():
        sys.exit(f"{tok} not found: set LLAMAFORGE_SHARED_DATA or pass --ckpt")
    cmd = [sys.executable, "-m", "llamaforge", "init", "--preset", preset, "--tokenizer", str(tok)]
    cmd += ["--out", str(out), f"max_seq_len={ctx}", *(["--dtype", dtype] if dtype else [])]
    subprocess.run(cmd, check=True, env=our_env(), stdout=subprocess.DEVNULL)
    return out


def to_gguf(ckpt: Path, out: Path, dtype: str = "f32") -> Path:
    cmd = [sys.executable, "-m", "llamaforge", "convert", "--from", "native", "--to", "gguf"]
    cmd += [str(ckpt), str(out), "--dtype", dtype, "--quiet"]
    subprocess.run(cmd, check=True, env=our_env(), stdout=subprocess.DEVNULL)
    return out


def llama_gguf(ckpt: Path, tmp: Path, gguf_type: str, quantize: Path | None, threads: int) -> Path:
    """The GGUF llama.cpp serves: f32/f16 from `llamaforge convert`; any other type quantised
    from the f32 GGUF by llama.cpp's `llama-quantize` when there is one."""
    if gguf_type in ("f32", "f16"):
        return to_gguf(ckpt, tmp / f"model-{gguf_type}.gguf", gguf_type)
    if quantize is None:
        print(f"no llama-quantize: {gguf_type} written by `llamaforge convert`", file=sys.stderr)
        return to_gguf(ckpt, tmp / f"model-{gguf_type}.gguf", gguf_type)
    f32 = to_gguf(ckpt, tmp / "model-f32.gguf", "f32")
    out = tmp / f"model-{gguf_type}.gguf"
    cmd = [str(quantize), str(f32), str(out), gguf_type.upper(), str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    f32.unlink()
    return out


def bytes_per_position(params: dict, dtype: str | None) -> int:
    """KV-cache bytes one position takes: keys and values of every layer."""
    kv_heads = params.get("n_kv_heads") or params["n_heads"]
    head_dim = params["dim"] // params["n_heads"]
    stored = dtype or params.get("llamaforge", {}).get("dtype", "float32")
    elem = 2 if stored in ("bfloat16", "float16", "bf16", "fp16", "f16") else 4
    return 2 * params["n_layers"] * kv_heads * head_dim * elem


def tensors(ckpt: Path) -> list[tuple[str, int, int, str]]:
    """(name, elements, dimensions, safetensors dtype) of every weight, from the headers."""
    out = []
    for f in sorted(ckpt.glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name != "__metadata__":
                numel = 1
                for d in t["shape"]:
                    numel *= d
                out.append((name, numel, len(t["shape"]), t["dtype"]))
    return out


def decode_weight_bytes(ckpt: Path, dtype: str | None, quantize: str | None) -> int:
    """Bytes of weights one decode step reads: every tensor but the embedding table (whose
    rows are gathered), at the served width (1 byte for int8 linear layers)."""
    total = 0
    for name, numel, dims, stored in tensors(ckpt):
        if "tok_embeddings" in name:
            continue
        width = {"F32": 4, "BF16": 2, "F16": 2}.get(stored, 4)
        if dtype in ("bfloat16", "float16"):
            width = 2
        if quantize and dims == 2:
            width = 1
        total += numel * width
    return total


BANDWIDTH_PROBE = """
import time, torch
x = torch.empty(2**29, dtype=torch.bfloat16, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize()
print(2 * x.numel() * 2 * 20 / (time.perf_counter() - t), torch.cuda.get_device_name(0))
"""


def gpu_bandwidth(device: str) -> tuple[float, str]:
    """(bytes/s of a device-to-device copy, read + written, the card's name), in a process of
    its own so that this one holds no CUDA memory."""
    env = {**os.environ}
    if ":" in device:
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    out = subprocess.run(
        [sys.executable, "-c", BANDWIDTH_PROBE], capture_output=True, text=True, env=env, check=True
    )
    bw, name = out.stdout.strip().split(" ", 1)
    return float(bw), name


# ---------------------------------------------------------------- report


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"Model name:\s*(.+)", out)
        cpu = name.group(1).strip() if name else platform.processor()
    except OSError:
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} CPUs"


def versions(llama_server: Path | None) -> str:
    import torch

    out = f"torch {torch.__version__}, Python {platform.python_version()}"
    if llama_server is not None:
        r = subprocess.run(
            [str(llama_server), "--version"], capture_output=True, text=True, timeout=60
        )
        ver = re.search(r"version:\s*(.+)", r.stdout + r.stderr)
        out += f", llama-server {ver.group(1).strip() if ver else '(version unknown)'}"
    return out


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def workload_table(cells: list[dict], workload: str, bound: dict[int, float] | None) -> list[str]:
    """One workload's markdown table, tokens/s against llama.cpp's at the same client count."""
    peer = {c["clients"]: c["tokens_per_s"] for c in cells if c["row"] == "llama.cpp"}
    head = "| clients | server | tok/s | vs llama.cpp | TTFT p50 | TTFT p99 | token p50 | "
    head += "token p99 | request p99 | requests | errors |"
    lines = [head + (" bound tok/s |" if bound else ""), "|---" * (11 + bool(bound)) + "|"]
    for c in sorted(cells, key=lambda c: (c["clients"], ROWS.index(c["row"]))):
        ratio = (
            fmt_ratio(c["tokens_per_s"], peer.get(c["clients"])) if c["row"] != "llama.cpp" else ""
        )
        line = (
            f"| {c['clients']} | {c['row']} | {c['tokens_per_s']:.0f} | {ratio} | "
            f"{fmt_s(c['ttft_p50_s'])} | {fmt_s(c['ttft_p99_s'])} | {fmt_s(c['token_p50_s'])} | "
            f"{fmt_s(c['token_p99_s'])} | {fmt_s(c['request_p99_s'])} | {c['requests']} | "
            f"{c['errors']} |"
        )
        lines.append(line + (f" {bound[c['clients']]:.0f} |" if bound else ""))
    return lines


def prefix_table(cells: list[dict]) -> list[str]:
    """Our server with prefix caching against without, on the shared-prefix workload."""
    off = {c["clients"]: c for c in cells if c["row"] == "llamaforge-no-prefix-cache"}
    on = {c["clients"]: c for c in cells if c["row"] == "llamaforge"}
    if not off or not on:
        return []
    lines = [
        "| clients | prefix cache tok/s | no prefix cache tok/s | speed-up | TTFT p50 with | "
        "TTFT p50 without |",
        "|---|---|---|---|---|---|",
    ]
    for n in sorted(set(on) & set(off)):
        a, b = on[n], off[n]
        lines.append(
            f"| {n} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
            f"{fmt_ratio(a['tokens_per_s'], b['tokens_per_s'])} | {fmt_s(a['ttft_p50_s'])} | "
            f"{fmt_s(b['ttft_p50_s'])} |"
        )
    return lines


def kv_table(cells: list[dict], slot_bytes: float) -> list[str]:
    """KV bytes held per token in use, ours, against what today's slot cache (every slot's
    --ctx positions allocated at start) would hold for the same tokens."""
    rows = [c for c in cells if c["row"].startswith("llamaforge") and c["kv_bytes_per_token"]]
    if not rows:
        return []
    lines = [
        "| workload | server | clients | tokens in use (mean) | KV bytes / token in use | "
        "slot cache bytes / token | read from |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        used = c["kv_tokens_in_use"]
        lines.append(
            f"| {c['workload']} | {c['row']} | {c['clients']} | {used:.0f} | "
            f"{c['kv_bytes_per_token']:,.0f} | {slot_bytes / used:,.0f} | {c['kv_source']} |"
        )
    return lines


# ---------------------------------------------------------------- main


@dataclass
class Row:
    name: str
    start: Callable[[], tuple[subprocess.Popen, str]]
    workloads: list[str]
    ours: bool


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, help="native checkpoint (default: --preset 15M)")
    src.add_argument("--preset", default="15M", help="random weights of this size")
    ctx_help = "positions per request: init's max_seq_len, serve's --max-seq-len, each llama.cpp"
    p.add_argument("--ctx", type=int, help=ctx_help + " slot (default 1024; --ckpt: its own)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    rows_help = "servers to measure (default: all but llamaforge+draft, which --draft adds)"
    p.add_argument("--rows", nargs="+", choices=ROWS, help=rows_help)
    p.add_argument("--only", choices=["llamaforge", "llama.cpp"], help="keep one server's rows")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--seconds", type=float, default=30.0, help="per cell (row x workload x clients)"
    )
    warm_help = "seconds per row and workload, the largest client count, before measuring"
    p.add_argument("--warmup", type=float, default=3.0, help=warm_help)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prefix-tokens", type=int, default=512, help="shared-prefix workload")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp's threads")
    p.add_argument(
        "--our-threads", type=int, help="llamaforge's torch threads (default: --threads)"
    )
    p.add_argument("--device", help="llamaforge serve --device (default: its own)")
    p.add_argument("--dtype", help="init --dtype and serve --dtype (e.g. bfloat16)")
    p.add_argument("--quantize", choices=["int8", "int8-bf16"], help="llamaforge serve --quantize")
    p.add_argument("--gguf-type", default="f32", help="llama.cpp's weights (f32, f16, q8_0)")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for every `llamaforge serve` row (repeatable: --serve-arg=--compile)",
    )
    p.add_argument("--llama-server", type=Path, help="llama.cpp's C++ llama-server binary")
    p.add_argument("--llama-quantize", type=Path, help="default: beside --llama-server")
    p.add_argument("--draft", type=Path, help="also measure `serve --draft DIR` (speculative)")
    p.add_argument("--draft-k", type=int, default=4, help="with --draft: tokens per step")
    p.add_argument("--kv-bytes-metric", help="our /metrics gauge of KV bytes held (default: found)")
    p.add_argument("--kv-tokens-metric", help="our /metrics gauge of KV tokens in use")
    p.add_argument("--json", type=Path, help="also write every cell here")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    a = p.parse_args()
    for flag in ("llama_server", "llama_quantize"):
        path = getattr(a, flag)
        if path is not None and not os.access(path, os.X_OK):
            p.error(f"--{flag.replace('_', '-')} {path}: not an executable file")
    if a.llama_quantize is None and a.llama_server is not None:
        beside = a.llama_server.parent / "llama-quantize"
        a.llama_quantize = beside if os.access(beside, os.X_OK) else None
    if min(a.clients) < 1 or a.seconds <= 0 or a.max_tokens < 1 or a.prefix_tokens < 1:
        p.error("--clients, --seconds, --max-tokens and --prefix-tokens must be positive")
    return a


def choose_rows(a: argparse.Namespace) -> list[str]:
    rows = list(a.rows or [r for r in ROWS if r != "llamaforge+draft"])
    if a.draft is not None and "llamaforge+draft" not in rows:
        rows.append("llamaforge+draft")
    if a.draft is None and "llamaforge+draft" in rows:
        sys.exit("--rows llamaforge+draft needs --draft DIR")
    if a.only:
        rows = [r for r in rows if r.startswith(a.only)]
    if "shared-prefix" not in a.workloads and "llamaforge-no-prefix-cache" in rows:
        rows.remove("llamaforge-no-prefix-cache")
    if "llamaforge-no-prefix-cache" in rows and "--no-prefix-cache" not in serve_flags():
        print(
            "llamaforge serve has no --no-prefix-cache (an engine without prefix caching): "
            "row llamaforge-no-prefix-cache skipped",
            file=sys.stderr,
        )
        rows.remove("llamaforge-no-prefix-cache")
    have_llama_cpp = a.llama_server is not None or importlib.util.find_spec("llama_cpp")
    if "llama.cpp" in rows and not have_llama_cpp:
        print(
            "no --llama-server and llama_cpp not installed (pip install "
            "'llama-cpp-python[server]', the bench-serve extra): row llama.cpp skipped",
            file=sys.stderr,
        )
        rows.remove("llama.cpp")
    return rows


def build_rows(
    a: argparse.Namespace, names: list[str], ckpt: Path, ctx: int, tmp: Path
) -> list[Row]:
    slots = max(a.clients)
    ours = a.our_threads or a.threads
    base: tuple[str, ...] = ("--max-seq-len", str(ctx))
    for flag in ("quantize", "device", "dtype"):
        if getattr(a, flag):
            base += (f"--{flag}", getattr(a, flag))
    base += tuple(a.serve_arg)
    extra = {
        "llamaforge": base,
        "llamaforge-no-prefix-cache": (*base, "--no-prefix-cache"),
        "llamaforge+draft": (*base, "--draft", str(a.draft), "--draft-k", str(a.draft_k)),
    }
    rows = []
    for name in names:
        if name in extra:
            flags = extra[name]
            start = partial(start_ours, ckpt, ours, slots, flags)
            only = ["shared-prefix"] if name == "llamaforge-no-prefix-cache" else a.workloads
            rows.append(Row(name, start, list(only), True))
            continue
        gguf = llama_gguf(ckpt, tmp, a.gguf_type, a.llama_quantize, a.threads)
        if a.llama_server is not None:
            start = partial(start_llama_server, a.llama_server, gguf, a.threads, ctx, slots)
        else:
            start = partial(start_llama_cpp, gguf, a.threads, ctx)
        rows.append(Row(name, start, list(a.workloads), False))
    return rows


def measure(
    a: argparse.Namespace, row: Row, prompts: dict[str, list[str]], probe: KvProbe
) -> list[dict]:
    """Every cell of one row: the server started once, a short warm-up per workload."""
    cells = []
    proc, url = row.start()
    try:
        for w in row.workloads:
            if a.warmup > 0:
                warm = Cell(row.name, w, max(a.clients))
                asyncio.run(drive(url, warm, a.warmup, a.max_tokens, prompts[w], None))
            for n in a.clients:
                cell = Cell(row.name, w, n)
                asyncio.run(
                    drive(
                        url, cell, a.seconds, a.max_tokens, prompts[w], probe if row.ours else None
                    )
                )
                s = cell.summary()
                cells.append(s)
                print(
                    f"{row.name:>26} {w:>13} {n:>4} clients {s['tokens_per_s']:8.1f} tok/s  "
                    f"TTFT p50 {fmt_s(s['ttft_p50_s'])}  token p50 {fmt_s(s['token_p50_s'])}  "
                    f"({s['requests']} requests, {s['errors']} errors)"
                    + (f"  first error: {s['first_error']}" if s["errors"] else ""),
                    flush=True,
                )
        if row.name == "llamaforge+draft":
            rate = httpx.get(f"{url}/health").json()["speculative"]["acceptance_rate"]
            print(f"{row.name:>26} acceptance rate {rate or 0.0:.1%}", flush=True)
    finally:
        stop(proc)
    return cells


def estimate_minutes(a: argparse.Namespace, names: list[str]) -> float:
    """Rough wall time: each cell's seconds plus its last requests, warm-ups, starts."""
    workloads = [1 if n == "llamaforge-no-prefix-cache" else len(a.workloads) for n in names]
    cells = sum(workloads) * len(a.clients)
    return (cells * (a.seconds + 3) + sum(workloads) * (a.warmup + 3) + 20 * len(names)) / 60


def report(a: argparse.Namespace, cells: list[dict], info: dict[str, str], extra: dict) -> str:
    """The markdown: how it was run, one table per workload, prefix caching, KV memory."""
    out = [
        f"Machine: {info['machine']}; {info['versions']}; {info['date']}.",
        f"Weights: {info['weights']}; {info['precision']}.",
        f"Command: `{info['command']}`",
        "",
    ]
    if "gpu" in extra:
        out += [f"GPU: {extra['gpu']}; {extra['bound_note']}", ""]
    for w in a.workloads:
        mine = [c for c in cells if c["workload"] == w]
        if not mine:
            continue
        out += [f"### {w}: prompts of {info['lengths'][w]} tokens, {a.max_tokens} new", ""]
        out += workload_table(mine, w, extra.get("bound")) + [""]
        if w == "shared-prefix" and prefix_table(mine):
            out += ["Prefix caching (ours):", ""] + prefix_table(mine) + [""]
    kv = kv_table(cells, extra["slot_bytes"])
    if kv:
        out += ["### KV cache: bytes held per token in use (ours)", ""] + kv + [""]
        out += [f"/metrics KV names seen: {', '.join(sorted(extra['kv_names'])) or 'none'}", ""]
    return "\n".join(out)


def main() -> None:
    a = parse_args()
    names = choose_rows(a)
    if not names:
        sys.exit("nothing to measure")
    cells: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = a.ckpt or make_checkpoint(a.preset, tmp / "ckpt", a.ctx or 1024, a.dtype)
        params = json.loads((ckpt / "params.json").read_text())
        ctx = a.ctx or params["max_seq_len"]
        tok = Tokenizer(ckpt / "tokenizer.model")
        prompts = {w: build_prompts(w, tok, a.prefix_tokens) for w in a.workloads}
        lengths = {w: prompt_lengths(p, tok) for w, p in prompts.items()}
        longest = max(len(tok.encode(p)) for ps in prompts.values() for p in ps)
        if longest + a.max_tokens > ctx:
            sys.exit(f"a prompt of {longest} tokens + --max-tokens {a.max_tokens} > --ctx {ctx}")
        bpp = bytes_per_position(params, a.dtype)
        extra: dict = {"slot_bytes": max(a.clients) * ctx * bpp}
        if a.device and a.device.startswith("cuda"):
            bw, gpu = gpu_bandwidth(a.device)
            w = decode_weight_bytes(ckpt, a.dtype, a.quantize)
            extra["gpu"] = f"{gpu}, copy bandwidth {bw / 1e9:.0f} GB/s measured"
            extra["bound_note"] = (
                f"bound tok/s = clients x {bw / 1e9:.0f} GB/s / {w / 1e9:.2f} GB of weights read "
                "per decode step (embedding table excluded, KV reads ignored)"
            )
            extra["bound"] = {n: n * bw / w for n in a.clients}
            print(extra["gpu"] + "; " + extra["bound_note"], flush=True)
        probe = KvProbe(bpp, a.kv_bytes_metric, a.kv_tokens_metric)
        n_params = sum(numel for _, numel, _, _ in tensors(ckpt))
        print(f"about {estimate_minutes(a, names):.1f} min of measurement", file=sys.stderr)
        for row in build_rows(a, names, ckpt, ctx, tmp):
            try:
                cells += measure(a, row, prompts, probe)
            except RuntimeError as e:  # a server that would not start: the others still run
                print(f"row {row.name} failed: {e}", file=sys.stderr)
        extra["kv_names"] = probe.names_seen
    info = {
        "machine": machine(),
        "versions": versions(a.llama_server if "llama.cpp" in names else None),
        "date": datetime.date.today().isoformat(),
        "weights": f"{a.ckpt or 'random ' + a.preset} ({n_params / 1e6:.1f}M parameters with "
        f"the embedding), {ctx} positions per request",
        "precision": (
            f"ours {a.quantize or a.dtype or 'as stored'}"
            + (f", llama.cpp {a.gguf_type}" if "llama.cpp" in names else "")
            + f", {a.our_threads or a.threads} / {a.threads} threads (ours / llama.cpp)"
        ),
        "command": " ".join(["python", *sys.argv]),
        "lengths": lengths,
    }
    text = report(a, cells, info, extra)
    print("\n" + text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    if a.json:
        a.json.write_text(json.dumps({"info": info, "cells": cells}, indent=2) + "\n")


if __name__ == "__main__":
    main()
