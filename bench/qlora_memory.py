"""Peak host memory (RSS) of one QLoRA training step at LLaMA-7B's shape on the CPU, against
the same step on a bf16 base, each in its own process, with the arithmetic's prediction.

The step: random weights, micro-batch 1 of ``--seq`` tokens, adapters (rank 8, alpha 16) on
every linear layer of the blocks (wq wk wv wo w1 w2 w3), activation checkpointing ``full``
(every block recomputed), bf16 throughout, summed next-token loss, backward, AdamW step.
The base is built on the meta device and materialised one layer at a time, so the bf16
model never exists next to the quantised one. NF4 weights: one random bf16 matrix per
distinct shape is quantised by torchao (quantising all 224 matrices of 7B takes ~25 min on
two cores), and every layer gets its own copy of that storage; the bytes are what they would
be, the values repeat. The peak is the process's VmHWM from just before the step to its
end (reset through /proc/self/clear_refs); the build's own peak is reported beside it.

The prediction adds: the weights as stored (NF4: 0.5 byte a weight + 1 byte per 64 for the
int8 scales + 2 bytes per 16384; int8: 1 byte + 4 per row; bf16: 2 bytes), the adapters
with their gradients and AdamW's two moments (bf16: 8 bytes a parameter), the activations
of ``llamaforge.training.flops.activation_memory`` (``full``, bf16), the transient of
dequantising the largest weight (11008 × 4096) — torchao's NF4 dequantisation peaks at 15
bytes a weight (int64 indices of both nibbles, the dequantised halves, the expanded
scales, the stacked result; measured), int8's at 4 (the bf16 cast and the product) — and
the runtime measured after the imports.

    python bench/qlora_memory.py                     # nf4 and bf16, 32 layers each
    python bench/qlora_memory.py --layers 4 8 --variants bf16   # then scale per layer

``--layers`` with two or more values measures each and extrapolates linearly to
``--full-layers`` (32): for a base that does not fit the machine next to other work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llamaforge.device import cpu_model

VARIANTS = ("nf4", "int8", "bf16")
RANK = 8
GIB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@torch.no_grad()
def build(variant: str, n_layers: int, seq: int) -> torch.nn.Module:
    """LLaMA-7B's shape with ``n_layers`` blocks and LoRA on every block linear, the base
    stored as ``variant``, materialised module by module with random weights."""
    from llamaforge.finetune.lora import LoraConfig, QuantLinear, apply_lora, init_lora_
    from llamaforge.model import build_model
    from llamaforge.presets import get_preset

    args = get_preset("7B", n_layers=n_layers, max_seq_len=seq)
    model = build_model(args, device="meta", dtype=torch.bfloat16, init=False)
    quantize = "none" if variant == "bf16" else variant
    cfg = LoraConfig(targets="all", rank=RANK, alpha=2 * RANK, dropout=0.0, quantize=quantize)
    apply_lora(model, cfg)
    templates: dict[tuple[int, int], torch.Tensor] = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        module.to_empty(device="cpu", recurse=False)
        if isinstance(module, QuantLinear) and variant == "nf4":
            shape = (module.out_features, module.in_features)
            if shape not in templates:
                w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
                module.load_state_dict({"weight": w}, strict=False)
                templates[shape] = module.weight.detach()
            tpl = templates[shape]
            module.load_state_dict({"weight": torch.empty_like(tpl).copy_(tpl)}, strict=False)
        elif isinstance(module, QuantLinear) and variant == "int8":
            w = torch.randn(module.weight.shape) * 0.02
            module.load_state_dict({"weight": w}, strict=False)
        elif ".lora_" not in name:  # the adapters: init_lora_ below
            for p in module.parameters(recurse=False):
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
    init_lora_(model, seed=0)
    return model


def child(variant: str, n_layers: int, seq: int) -> dict[str, Any]:
    from llamaforge.parallel import apply_activation_checkpointing
    from llamaforge.training.optim import build_optimizer, cross_entropy

    runtime = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    model = build(variant, n_layers, seq)
    apply_activation_checkpointing(model, "full")
    model.train()
    opt = build_optimizer(model, 2e-4, weight_decay=0.0)
    build_s = time.perf_counter() - t0
    build_peak = _status_kib("VmHWM") * 1024
    before = _status_kib("VmRSS") * 1024
    resettable = _reset_peak()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, model.args.vocab_size, (1, seq), generator=g) for _ in range(2))
    t0 = time.perf_counter()
    loss, n = cross_entropy(model(x), y)
    (loss / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    return {
        "variant": variant,
        "layers": n_layers,
        "runtime": runtime,
        "after_build": before,
        "build_peak": build_peak,
        "step_peak": _status_kib("VmHWM") * 1024,
        "peak_is_step_only": resettable,
        "build_s": build_s,
        "step_s": step_s,
        "loss": (loss / n).item(),
    }


def predicted(variant: str, n_layers: int, seq: int, runtime: int) -> float:
    """Bytes the arithmetic expects the step's peak to be (see the module's notes)."""
    from llamaforge.presets import get_preset
    from llamaforge.training.flops import activation_memory

    args = get_preset("7B", n_layers=n_layers, max_seq_len=seq)
    d, h, v = args.dim, args.ffn_hidden_dim, args.vocab_size
    linears = [(d, d)] * 4 + [(h, d), (d, h), (h, d)]  # wq wk wv wo, w1 w2 w3 (MHA)
    per_layer = sum(o * i for o, i in linears)
    rows = sum(o for o, _ in linears)
    per_weight = {"nf4": 0.5 + 1 / 64 + 2 / 16384, "int8": 1.0, "bf16": 2.0}[variant]
    base = n_layers * (per_layer * per_weight + (4 * rows if variant == "int8" else 0))
    other = 2 * (2 * v * d + (2 * n_layers + 1) * d)  # embedding, output, norms: bf16
    adapters = n_layers * sum(RANK * (o + i) for o, i in linears) * 8
    activations = activation_memory(args, seq, mode="full", act_bytes=2)
    transient = h * d * {"nf4": 15, "int8": 4, "bf16": 0}[variant]
    return runtime + base + other + adapters + activations + transient


def measure(variant: str, n_layers: int, seq: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--layers", str(n_layers)]
    cmd += ["--seq", str(seq)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} ({n_layers} layers) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["nf4", "bf16"], choices=VARIANTS)
    p.add_argument("--layers", nargs="+", type=int, default=[32])
    p.add_argument("--full-layers", type=int, default=32, help="the shape reported (7B: 32)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the measurements here")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.layers[0], a.seq)))
        return
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}", flush=True)
    print(
        "| base | blocks measured | peak RSS of the step (GiB) | predicted (GiB) | RSS after "
        "build (GiB) | build peak (GiB) | step time (s) |\n|---|---|---:|---:|---:|---:|---:|",
        flush=True,
    )
    results = []
    for variant in a.variants:
        runs = [measure(variant, n, a.seq) for n in sorted(a.layers)]
        results += runs
        for r in runs:
            pred = predicted(variant, r["layers"], a.seq, r["runtime"])
            print(
                f"| {variant} | {r['layers']} | {r['step_peak'] / GIB:.2f} | {pred / GIB:.2f} | "
                f"{r['after_build'] / GIB:.2f} | {r['build_peak'] / GIB:.2f} | "
                f"{r['step_s']:.0f} |",
                flush=True,
            )
        if len(runs) >= 2 and runs[-1]["layers"] != a.full_layers:
            (lo, hi) = runs[0], runs[-1]
            slope = (hi["step_peak"] - lo["step_peak"]) / (hi["layers"] - lo["layers"])
            est = hi["step_peak"] + slope * (a.full_layers - hi["layers"])
            pred = predicted(variant, a.full_layers, a.seq, hi["runtime"])
            print(
                f"| {variant} | {a.full_layers} (from {lo['layers']} and {hi['layers']}: "
                f"{slope / GIB:.3f} GiB a block) | {est / GIB:.2f} | {pred / GIB:.2f} | | | |",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
