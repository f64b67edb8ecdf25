"""Peak host memory and time of loading a checkpoint converted to int8 (``--quantize int8``)
or to bf16 (``--dtype bfloat16``): converted as it is read (`native.load`'s ``quantize`` and
``dtype``, what the commands do) against loaded whole, then converted (``quantize_int8`` on
the loaded model, ``model.to(torch.bfloat16)``). The checkpoint: random fp32 weights of a
preset (110M by default), written tensor by tensor. Prints a markdown table.

Each load runs in its own process; memory is its peak RSS (VmHWM) less its RSS just
before loading (the interpreter, torch and llamaforge), with glibc's malloc as it comes
(its adaptive mmap threshold can keep freed blocks, by chance, from one run to the next:
``--runs N`` reports the largest of N).

    python bench/load_memory.py                      # 110M
    python bench/load_memory.py --preset 1B --runs 3 --dir /scratch/load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llamaforge.checkpoint.native import expected_shapes, save_state, weight_files
from llamaforge.presets import get_preset
from llamaforge.units import human_bytes

# one load in a process of its own: argv = checkpoint, way (as-read | after), to (int8 | bf16)
LOAD = """
import json, sys, time
import torch
from llamaforge.checkpoint.native import expected_shapes, load, read_params
from llamaforge.inference.quantize import quantize_int8

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

ckpt, way, to = sys.argv[1:4]
expected_shapes(read_params(ckpt)[0])  # the meta model's one-time imports
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak so far (imports) is forgotten
t0 = time.perf_counter()
if way == "as-read":
    model, _ = load(ckpt, quantize="int8" if to == "int8" else None,
                    dtype="bfloat16" if to == "bf16" else None)
else:
    model, _ = load(ckpt)
    model = quantize_int8(model) if to == "int8" else model.to(torch.bfloat16)
seconds = time.perf_counter() - t0
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"own": status("VmHWM:") - before, "held": held, "seconds": seconds}))
"""


def write_checkpoint(out: Path, preset: str) -> Path:
    """Random fp32 weights (std 0.02) of ``preset``, written tensor by tensor."""
    args = get_preset(preset)
    g = torch.Generator().manual_seed(0)
    tensors = (
        (name, torch.randn(shape, generator=g) * 0.02)
        for name, shape in expected_shapes(args).items()
    )
    return save_state(tensors, args, None, out)


def measure(ckpt: Path, way: str, to: str, runs: int) -> dict[str, float]:
    """The largest peak over ``runs`` loads (each in a fresh process), and their best time."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    results = []
    for _ in range(runs):
        proc = subprocess.run(
            [sys.executable, "-c", LOAD, str(ckpt), way, to],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "own": max(r["own"] for r in results),
        "held": results[0]["held"],
        "seconds": min(r["seconds"] for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="110M")
    p.add_argument("--runs", type=int, default=1, help="loads per row (the largest peak)")
    p.add_argument("--dir", type=Path, help="working directory (default: a temporary one)")
    a = p.parse_args()

    work = a.dir or Path(tempfile.mkdtemp(prefix="load-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        t0 = time.perf_counter()
        ckpt = write_checkpoint(work / "ckpt", a.preset)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        size = sum((ckpt / f).stat().st_size for f in weight_files(ckpt))
        for to in ("int8", "bf16"):
            for way in ("after", "as-read"):
                rows.append((to, way, measure(ckpt, way, to, a.runs)))
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print(
        "| preset | fp32 checkpoint | to | converted | model held | peak RSS over start "
        "| peak − model | load time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for to, way, r in rows:
        how = "as read" if way == "as-read" else "after loading whole"
        print(
            f"| {a.preset} | {human_bytes(size)} | {to} | {how} | {human_bytes(r['held'])} | "
            f"{human_bytes(r['own'])} | {human_bytes(r['own'] - r['held'])} | "
            f"{r['seconds']:.2f} s |"
        )


if __name__ == "__main__":
    main()
