"""Training-step throughput: llamaforge's pretraining step against HF transformers'
``LlamaForCausalLM`` on the same config, batch, dtype and optimizer, in one process.

A step is: forward, next-token cross-entropy, backward, clip 1.0, AdamW (0.9, 0.95, wd 0.1;
fused where the device has it), zero_grad. Ours is built exactly as ``llamaforge pretrain``
builds it (``distributed.parallelize``: activation checkpointing, per-block compile); HF
uses SDPA attention and its own ``labels=`` loss, eager and with ``model.compile()``.
The variants run in interleaved rounds so that machine noise hits all of them alike; the
median step time of each is reported with tokens/s, MFU (GPU) and peak memory (GPU).

    python bench/train_throughput.py                                  # CPU, 15M preset
    python bench/train_throughput.py --device cuda --preset 1B --seq-len 2048 \\
        --micro-batch 8 --variants ours-compile hf hf-compile
    python bench/train_throughput.py --device cuda --preset 7B --seq-len 2048 \\
        --micro-batch 1 --variants ours-selective-compile hf-gc    # memory
    python bench/train_throughput.py --variants ours-manual ours-selective ours-full ours \\
        --rounds 3                           # activation checkpointing modes, CPU 15M
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llamaforge.checkpoint.convert.hf import hf_config
from llamaforge.device import device_spec
from llamaforge.model import build_model
from llamaforge.parallel import DistInfo, parallelize
from llamaforge.presets import get_preset
from llamaforge.training.flops import flops_per_token
from llamaforge.training.optim import build_optimizer, cross_entropy
from llamaforge.units import human_bytes

VARIANTS = {
    # name: (implementation, activation checkpointing / HF gradient checkpointing, compile)
    "ours": ("ours", "none", False),
    "ours-compile": ("ours", "none", True),
    "ours-selective": ("ours", "selective", False),
    "ours-selective-compile": ("ours", "selective", True),
    "ours-full": ("ours", "full", False),
    "ours-full-compile": ("ours", "full", True),
    "ours-manual": ("ours", "manual", False),  # the hand-written block backward
    "ours-manual-compile": ("ours", "manual", True),
    "hf": ("hf", "none", False),
    "hf-compile": ("hf", "none", True),
    "hf-gc": ("hf", "full", False),  # HF's gradient_checkpointing_enable()
}


def build(variant: str, args, device: torch.device, dtype: torch.dtype):
    """(model, optimizer, step function) for one variant, fp32 master weights."""
    impl, ckpt, compiled = VARIANTS[variant]
    torch.manual_seed(0)
    amp = dtype if dtype != torch.float32 else None
    fused = device.type == "cuda"
    if impl == "ours":
        model = build_model(args, device=device)
        model = parallelize(
            model,
            DistInfo(device=device),
            activation_checkpointing=ckpt,
            compile=compiled,
        )
        opt = build_optimizer(model, 3e-4, fused=fused)

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss, n = cross_entropy(model(x), y)
            return loss / n

    else:
        import transformers

        cfg = transformers.LlamaConfig(**hf_config(args), attn_implementation="sdpa")
        cfg.use_cache = False
        model = transformers.LlamaForCausalLM(cfg).to(device)
        if ckpt == "full":
            model.gradient_checkpointing_enable()
        if compiled:
            model.compile()
        opt = torch.optim.AdamW(
            [
                {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
                {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=3e-4,
            betas=(0.9, 0.95),
            fused=fused,
        )

        def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(input_ids=x, labels=x).loss  # HF shifts the labels itself

    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, opt, step


class StepMemory(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode and still alive: on the CPU, where
    there is no allocator statistic, the step's own memory (activations, gradients,
    temporaries; the weights and optimizer states made before the step are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self._seen:
                    self._seen.add(key)
                    self.live += n
                    weakref.finalize(storage, self._free, key, n)
        self.peak = max(self.peak, self.live)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable, batch, device: torch.device, n: int) -> list[float]:
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step(*batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="15M")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on CUDA)")
    p.add_argument("--variants", nargs="+", default=["ours", "hf"], choices=sorted(VARIANTS))
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()

    device = torch.device(a.device)
    dtype_name = a.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    over = {"max_seq_len": max(a.seq_len, 1)}
    if a.vocab_size:
        over["vocab_size"] = a.vocab_size
    args = get_preset(a.preset, **over)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (a.micro_batch, a.seq_len + 1), generator=g)
    batch = (x[:, :-1].to(device), x[:, 1:].to(device))
    tokens = a.micro_batch * a.seq_len
    fpt = flops_per_token(args, a.seq_len)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = device_spec(name)
        peak = spec.peak_flops if spec else None
    else:
        name = (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
        peak = None

    times: dict[str, list[float]] = {v: [] for v in a.variants}
    memory: dict[str, int] = {}
    errors: dict[str, str] = {}
    if device.type == "cuda":  # one variant on the GPU at a time, for its memory figure
        for v in a.variants:
            torch.cuda.reset_peak_memory_stats(device)
            try:
                _, _, step = build(v, args, device, dtype)
                timed_steps(step, batch, device, a.warmup)
                times[v] = timed_steps(step, batch, device, a.rounds * a.steps)
                memory[v] = torch.cuda.max_memory_allocated(device)
            except torch.OutOfMemoryError as e:
                errors[v] = f"out of memory ({str(e).splitlines()[0][:60]})"
            except Exception as e:  # one variant failing (a compile error) keeps the others
                errors[v] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
            step = None
            gc.collect()
            torch.cuda.empty_cache()
    else:  # interleaved rounds: noise on a shared CPU hits every variant alike
        steps = {v: build(v, args, device, dtype)[2] for v in a.variants}
        for v in a.variants:
            timed_steps(steps[v], batch, device, a.warmup)
            if not VARIANTS[v][2]:  # (the dispatch mode does not see inside compiled code)
                with StepMemory() as tracker:
                    steps[v](*batch)
                memory[v] = tracker.peak
        for _ in range(a.rounds):
            for v in a.variants:
                times[v] += timed_steps(steps[v], batch, device, a.steps)

    import transformers

    print(
        f"# {a.preset} ({sum(p.numel() for p in build_model(args, 'meta').parameters()) / 1e6:.1f}M"
        f" params), seq {a.seq_len} x micro-batch {a.micro_batch}, {dtype_name}, {name}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    what = "peak memory" if device.type == "cuda" else "step memory (activations+grads)"
    print(f"| variant | step (median) | tokens/s | MFU | {what} |")
    print("|---|---|---|---|---|")
    results = {}
    for v in a.variants:
        if v in errors:
            print(f"| {v} | {errors[v]} | | | |")
            results[v] = {"error": errors[v]}
            continue
        med = statistics.median(times[v])
        tok_s = tokens / med
        mfu = fpt * tok_s / peak if peak else None
        mem = memory.get(v)
        results[v] = {"step_s": med, "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_bytes": mem}
        print(
            f"| {v} | {med * 1e3:.1f} ms | {tok_s:,.0f} | "
            f"{f'{mfu * 100:.1f} %' if mfu else 'n/a'} | "
            f"{human_bytes(mem) if mem else 'n/a'} |"
        )
    ours = [v for v in results if v.startswith("ours") and "tokens_per_s" in results[v]]
    hfs = [v for v in results if v.startswith("hf") and "tokens_per_s" in results[v]]
    for o in ours:
        for h in hfs:
            ratio = results[o]["tokens_per_s"] / results[h]["tokens_per_s"]
            print(f"{o} / {h}: {ratio:.2f}x")
    # the hand-written backward against torch's selective checkpointing (same tensors kept)
    for m in [v for v in results if "manual" in v and "step_s" in results[v]]:
        sel = m.replace("manual", "selective")
        if sel in results and "step_s" in results[sel]:
            speed = results[sel]["step_s"] / results[m]["step_s"]
            line = f"{m} / {sel}: {speed:.2f}x speed"
            if results[m]["peak_mem_bytes"] and results[sel]["peak_mem_bytes"]:
                mem = results[m]["peak_mem_bytes"] / results[sel]["peak_mem_bytes"]
                line += f", {mem:.2f}x memory"
            print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "args": vars(a), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
