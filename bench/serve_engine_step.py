"""The serving engine's decode step in-process (no HTTP): eager against compiled.

A preset's random weights (the 15M preset with Meta's 32000-piece vocabulary unless
--preset/--vocab say otherwise) serve N concurrent greedy requests through `Engine.step()`;
once every request decodes, --steps steps are timed (no prefill in them). Prints markdown
rows: milliseconds per step and generated tokens/s for each variant and row count, how long
its first pass took (the compiled variants' compilations) and how many graphs Dynamo
compiled. Each variant first runs the whole workload once untimed, so that the compiled ones
have every shape they meet compiled before the timed passes (the same requests again).

Variants (--variants): eager (`ModelRunner`), compiled (`CompiledRunner` as `serve
--compile` runs it: torch.compile on the CPU, CUDA graphs on a GPU, block tables padded to
an eighth of the longest times a power of two: up to four widths per batch bucket), and
compiled-full (every table padded to the longest a request can hold: one graph per batch
bucket, but attention over the whole context at every step). --quantize int8 / int8-bf16
runs every variant on int8 weights. The timed passes of the variants alternate (--repeat
rounds, medians printed), so that a machine busy with other work slows them alike.

    python bench/serve_engine_step.py                                 # 15M, 1 8 32 rows
    python bench/serve_engine_step.py --rows 8 --steps 32 --variants eager compiled
    python bench/serve_engine_step.py --preset 110M --device cuda --rows 1 8 32 128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from llamaforge.model import build_model
from llamaforge.presets import get_preset
from llamaforge.serve.engine import Engine, SamplingParams
from llamaforge.serve.runner import CompiledRunner
from llamaforge.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMAFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))
VARIANTS = ["eager", "compiled", "compiled-full"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="15M", help="random weights of this size (default 15M)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (default Meta's 32000)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32], help="concurrent requests")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument(
        "--max-seq-len", type=int, help="the engine's context (default: the model's, as serve)"
    )
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--quantize", choices=["int8", "int8-bf16"], help="int8 weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--repeat", type=int, default=5, help="timed passes per variant (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args()


def make_model(a: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_preset(a.preset, vocab_size=a.vocab)).eval()
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    model = model.to(device=a.device, dtype=getattr(torch, dtype))
    if a.quantize:
        from llamaforge.inference.quantize import quantize_int8

        quantize_int8(model, cpu_bf16_compute=a.quantize == "int8-bf16")
    return model


def prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` different prompts of ``length`` tokens cut from a real text (no two share their
    first block, so the prefix cache gives nothing)."""
    text = (SHARED / "pretrain" / "stories" / "tinystories" / "tinystories_val.txt").read_text()
    ids = tok.encode(text[: 8 * (n + 1) * length], bos=False)
    while len(ids) < (n + 1) * length:
        ids = ids + ids
    return [[tok.bos_id] + ids[i * length + i : (i + 1) * length + i - 1] for i in range(n)]


def run(engine: Engine, jobs: list[list[int]], steps: int) -> tuple[float, int]:
    """Submit ``jobs``, step until every one decodes, then time ``steps`` steps; (seconds,
    tokens generated in them). Every request is then cancelled and the engine drained."""
    done: list[bool] = [False] * len(jobs)
    ids = []
    for i, prompt in enumerate(jobs):
        params = SamplingParams(max_tokens=steps + 8, temperature=0.0)
        ids.append(engine.submit(prompt, params, lambda o, i=i: done.__setitem__(i, o.finished)))
    while len(engine.scheduler.running) < len(jobs):
        engine._drain()
        engine.step()
    before = engine.stats.generated_tokens
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    seconds = time.perf_counter() - t0
    made = engine.stats.generated_tokens - before
    for i in ids:
        engine.cancel(i)
    while engine.scheduler.busy:
        engine._drain()
        engine.step()
    return seconds, made


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = Tokenizer(SHARED / "tokenizer" / "llama" / "tokenizer.model")
    model = make_model(a)
    args = model.args
    print(
        f"# serve engine step: preset {a.preset} (dim {args.dim}, {args.n_layers} layers, vocab "
        f"{args.vocab_size}), {a.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}, prompt "
        f"{a.prompt_len} tokens, {a.steps} steps timed, context "
        f"{a.max_seq_len or args.max_seq_len}{', ' + a.quantize if a.quantize else ''}"
    )
    print("\n| variant | rows | ms/step | tokens/s | first pass s | graphs |")
    print("|---|---:|---:|---:|---:|---:|")
    max_seq_len = a.max_seq_len or args.max_seq_len
    for rows in a.rows:
        jobs = prompts(tok, rows, a.prompt_len)
        engines, first, graphs = {}, {}, {}
        for variant in a.variants:
            engines[variant] = engine = make_engine(model, tok, variant, rows, max_seq_len)
            compiled = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            run(engine, jobs, a.steps)  # compiles what the timed passes meet
            first[variant] = time.perf_counter() - t0
            graphs[variant] = counters["stats"]["unique_graphs"] - compiled
        times: dict[str, list[float]] = {v: [] for v in a.variants}
        made: dict[str, int] = {}
        for _ in range(a.repeat):  # interleaved: a busy machine slows each variant alike
            for variant in a.variants:
                seconds, made[variant] = run(engines[variant], jobs, a.steps)
                times[variant].append(seconds)
        for variant in a.variants:
            seconds = statistics.median(times[variant])
            print(
                f"| {variant} | {rows} | {1000 * seconds / a.steps:.2f} | "
                f"{made[variant] / seconds:.0f} | {first[variant]:.1f} | {graphs[variant]} |",
                flush=True,
            )


def make_engine(model, tok: Tokenizer, variant: str, rows: int, max_seq_len: int) -> Engine:
    engine = Engine(
        model,
        tok,
        max_batch=rows,
        max_seq_len=max_seq_len,
        prefill_chunk=rows * max_seq_len,  # every prompt in one step: one batch size
        compile=variant != "eager",
        prefix_cache=False,
    )
    if variant == "compiled-full":  # every block table padded to the longest
        runner = engine.runner
        assert isinstance(runner, CompiledRunner)
        widest = runner.max_blocks
        engine.runner = CompiledRunner(
            model, engine.cache, max_batch=rows, max_blocks=widest, min_blocks=widest
        )
    return engine


if __name__ == "__main__":
    with torch.inference_mode():
        main()
