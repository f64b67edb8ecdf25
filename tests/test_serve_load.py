"""Load and faults: 64 concurrent streaming clients against a real server for 60 s
(LLAMAFORGE_SERVE_LOAD_SECONDS to change), with clients that disconnect mid-stream,
malformed and oversize bodies mixed in. Every well-formed stream must end with [DONE] and
no request may fail; the server's resident memory after the run is within 5 % of what it was
after a warm-up; p50/p99 latency and aggregate tokens/s are printed. Loopback only."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import pytest

from .test_serve import ServerProcess, idle
from .test_serve_engine import l2c_ckpt  # noqa: F401  (module fixture)

CLIENTS = 64
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom", "In a land far away", "One day"]


async def stream_once(client: httpx.AsyncClient, url: str, rng: random.Random) -> tuple[int, int]:
    """One streamed completion read to the end: (tokens, 1 if it ended with [DONE])."""
    body = {
        "prompt": rng.choice(PROMPTS),
        "max_tokens": rng.randint(8, 48),
        "temperature": rng.choice([0.0, 0.8, 1.0]),
        "seed": rng.randint(0, 1000),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens, done = 0, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise AssertionError(f"status {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                done = 1
                continue
            data = json.loads(line[6:])
            assert "error" not in data, data
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return tokens, done


async def load(url: str, seconds: float, clients: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    stats = {"latencies": [], "tokens": 0, "streams": 0, "done": 0, "errors": [], "faults": 0}
    end = time.monotonic() + seconds

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                tokens, done = await stream_once(client, url, rng)
            except Exception as e:  # counted, reported below
                stats["errors"].append(f"client {i}: {e!r}"[:300])
                continue
            stats["latencies"].append(time.monotonic() - t0)
            stats["tokens"] += tokens
            stats["streams"] += 1
            stats["done"] += done

    async def saboteur(client: httpx.AsyncClient) -> None:
        rng = random.Random(-1)
        while time.monotonic() < end:
            kind = rng.choice(["disconnect", "malformed", "oversize", "invalid"])
            if kind == "disconnect":
                body = {"prompt": "Once upon a time", "max_tokens": 60, "stream": True}
                async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        break  # drop the connection after the first line
            else:
                content = {
                    "malformed": b'{"prompt": "x", ',
                    "oversize": json.dumps({"prompt": "z" * (2 << 20)}).encode(),
                    "invalid": json.dumps({"prompt": "x", "max_tokens": -5}).encode(),
                }[kind]
                r = await client.post(
                    f"{url}/v1/completions",
                    content=content,
                    headers={"content-type": "application/json"},
                )
                expected = 413 if kind == "oversize" else 400
                if r.status_code != expected or "error" not in r.json():
                    stats["errors"].append(f"{kind}: {r.status_code} {r.text[:200]}")
            stats["faults"] += 1
            await asyncio.sleep(0.05)

    # the saboteurs are other clients: connections of their own, as on a real server
    async with (
        httpx.AsyncClient(timeout=120, limits=limits) as client,
        httpx.AsyncClient(timeout=120) as rogue,
    ):
        await asyncio.gather(
            *(worker(i, client) for i in range(clients)), saboteur(rogue), saboteur(rogue)
        )
    return stats


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


@pytest.mark.slow
def test_64_streaming_clients_with_faults(l2c_ckpt):  # noqa: F811
    seconds = float(os.environ.get("LLAMAFORGE_SERVE_LOAD_SECONDS", "60"))
    srv = ServerProcess("--ckpt", str(l2c_ckpt), "--max-batch", "16", "--model-name", "tiny")
    try:
        asyncio.run(load(srv.url, min(seconds, 10.0), CLIENTS))  # warm-up: allocator, caches
        idle(srv)
        before = srv.rss_bytes()
        t0 = time.monotonic()
        stats = asyncio.run(load(srv.url, seconds, CLIENTS))
        wall = time.monotonic() - t0
        idle(srv)
        after = srv.rss_bytes()
    finally:
        srv.stop()
    lat = stats["latencies"]
    print(
        f"\n{CLIENTS} streaming clients, {wall:.0f} s: {stats['streams']} streams, "
        f"{stats['faults']} faults mixed in, {len(stats['errors'])} errors; latency p50 "
        f"{percentile(lat, 0.5):.2f} s p99 {percentile(lat, 0.99):.2f} s; "
        f"{stats['tokens'] / wall:.1f} tokens/s aggregate; RSS {before / 2**20:.1f} -> "
        f"{after / 2**20:.1f} MiB"
    )
    assert not stats["errors"], (stats["errors"][:5], "".join(srv.stderr)[-3000:])
    assert stats["streams"] > CLIENTS and stats["done"] == stats["streams"]
    assert abs(after - before) <= 0.05 * before, (before, after)
