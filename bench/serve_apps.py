"""The server's application features against plain serving, in-process through the engine
(its own thread, no HTTP), on random weights of the 15M preset's shape (vocab 32000, Meta's
tokenizer):

  lora        N concurrent greedy requests spread over 4 LoRA adapters (rank 8 on every
              block linear, served batched per row by `serve.adapters`) against the same
              requests on the base alone, no adapter code loaded (what a merged checkpoint
              costs)
  structured  8 seeded requests (temperature 1) under a JSON schema (xgrammar masks)
              against the same requests unconstrained; and the schema's compile time

Each pair runs in turn, best of --repeats. Prints markdown rows.

    python bench/serve_apps.py --threads 2 --clients 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

import llamaforge
from llamaforge.checkpoint.native import read_params, save
from llamaforge.finetune.lora import LoraConfig, apply_lora, lora_modules, save_adapter
from llamaforge.model import Transformer, build_model
from llamaforge.presets import get_preset
from llamaforge.serve.adapters import AdapterRegistry
from llamaforge.serve.engine import Engine, SamplingParams
from llamaforge.serve.grammar import GrammarCompiler, GrammarSpec
from llamaforge.tokenizer import Tokenizer

PROMPTS = ["Once upon a time there was", "The quick brown fox", "In the beginning", "Lily and"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}},
        "kind": {"enum": ["a", "b", "c"]},
    },
    "required": ["name", "age", "tags", "kind"],
    "additionalProperties": False,
}


def tokenizer() -> Tokenizer:
    root = Path(os.environ.get("LLAMAFORGE_SHARED_DATA", Path(__file__).parents[2] / "shared/data"))
    return Tokenizer(root / "tokenizer/llama/tokenizer.model")


def make_adapters(base: Path, n: int) -> list[Path]:
    """``n`` PEFT-format adapters of ``base`` with random non-zero A and B."""
    out = []
    for k in range(n):
        with torch.device("meta"):
            m = Transformer(read_params(base)[0])
        cfg = LoraConfig(rank=8, targets="all")
        apply_lora(m, cfg)
        g = torch.Generator().manual_seed(k)
        for _, mod in lora_modules(m):
            for lin in (mod.lora_A, mod.lora_B):
                lin.weight = nn.Parameter(torch.randn(lin.weight.shape, generator=g) * 0.05)
        save_adapter(m, base.parent / f"adapter{k}", cfg, base=base)
        out.append(base.parent / f"adapter{k}")
    return out


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams, str | None]]) -> float:
    """Generated tokens/s of ``jobs`` submitted at once to a running ``engine``."""
    done, lock, count = threading.Event(), threading.Lock(), [0, 0]

    def emit(out) -> None:
        if out.finished:
            with lock:
                count[0] += 1
                count[1] += out.completion_tokens
                if count[0] == len(jobs):
                    done.set()

    t0 = time.perf_counter()
    for prompt, params, adapter in jobs:
        engine.submit(prompt, params, emit, adapter=adapter)
    done.wait()
    return count[1] / (time.perf_counter() - t0)


def lora_rows(tok: Tokenizer, base: Path, clients: list[int], repeats: int) -> list[str]:
    plain, _ = llamaforge.load(base)
    wrapped, _ = llamaforge.load(base)
    registry = AdapterRegistry(wrapped, base_dir=base)
    for k, path in enumerate(make_adapters(base, 4)):
        registry.load(f"a{k}", path, confined=False)
    rows = []
    for n in clients:
        greedy = SamplingParams(max_tokens=64, temperature=0.0)
        prompts = [tok.encode(f"{PROMPTS[i % 4]} {i}") for i in range(n)]
        best = {"base": 0.0, "adapters": 0.0}
        for _ in range(repeats):
            for name, model, reg in (("base", plain, None), ("adapters", wrapped, registry)):
                engine = Engine(model, tok, max_batch=n, adapters=reg)
                engine.start()
                jobs = [(p, greedy, f"a{i % 4}" if reg else None) for i, p in enumerate(prompts)]
                best[name] = max(best[name], run(engine, jobs))
                engine.stop()
        ratio = best["adapters"] / best["base"]
        rows.append(
            f"| lora | {n} | {best['adapters']:.0f} (4 adapters) | {best['base']:.0f} (base) | "
            f"{ratio:.2f}x |"
        )
    return rows


def structured_rows(tok: Tokenizer, base: Path, repeats: int) -> list[str]:
    model, _ = llamaforge.load(base)
    t = time.perf_counter()
    grammar = GrammarCompiler(tok, model.args.vocab_size).compile(
        GrammarSpec("json_schema", json.dumps(SCHEMA))
    )
    compile_s = time.perf_counter() - t
    prompt = tok.encode("Write a JSON record:")
    best = {"json": 0.0, "plain": 0.0}
    for _ in range(repeats):
        for name, g in (("plain", None), ("json", grammar)):
            engine = Engine(model, tok, max_batch=8)
            engine.start()
            jobs = [
                (prompt, SamplingParams(max_tokens=128, temperature=1.0, seed=i, grammar=g), None)
                for i in range(8)
            ]
            best[name] = max(best[name], run(engine, jobs))
            engine.stop()
    return [
        f"| structured | 8 | {best['json']:.0f} (JSON schema) | {best['plain']:.0f} "
        f"(unconstrained) | {best['json'] / best['plain']:.2f}x |",
        f"\nschema compile: {compile_s * 1000:.1f} ms",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["lora", "structured"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        torch.manual_seed(0)
        args = get_preset("15M", vocab_size=tok.vocab_size, max_seq_len=512)
        save(build_model(args).eval(), tok, base)
        rows = ["| what | requests | tok/s | against, tok/s | ratio |", "|---|---|---|---|---|"]
        if a.only in (None, "lora"):
            rows += lora_rows(tok, base, a.clients, a.repeats)
        if a.only in (None, "structured"):
            rows += structured_rows(tok, base, a.repeats)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
