"""Peak host memory of ``llamaforge lora merge`` against the checkpoint it merges: a base of
random weights (the 1B preset by default) saved as a native checkpoint in bf16 in several
shards, a random rank-16 adapter on every linear layer and the output layer, and the merge
run by the command line in its own process. Prints a markdown row.

Memory is the merging process's peak RSS (VmHWM, read by the process itself at the end) and
that peak less its RSS just before merging (the interpreter, torch and the modules the merge
loads). Not ru_maxrss: Linux carries into a process the maximum RSS of the process it was
exec'd from (here a fork of this script, which held a shard while writing the base). The
target (issue 20): the merge's own memory ≤ 1.5 × the largest shard + the adapter.

    python bench/merge_memory.py                          # 1B, bf16, 512 MiB shards
    python bench/merge_memory.py --preset 7B --max-shard-mib 5120 --dir /scratch/merge
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
from torch import nn

from llamaforge.checkpoint.native import expected_shapes, save_state, weight_files
from llamaforge.finetune.lora import LoraConfig, apply_lora, lora_modules, save_adapter
from llamaforge.model import Transformer
from llamaforge.presets import get_preset
from llamaforge.units import human_bytes

# the merge's own process: the command line's entry point, its peak RSS printed at the end
MERGE = """
import json, sys
from llamaforge.checkpoint.native import expected_shapes, read_params
from llamaforge.cli.main import main
import llamaforge.finetune.merge  # noqa: F401  (what `lora merge` imports)

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

expected_shapes(read_params(sys.argv[3])[0])  # the meta model's one-time imports (sympy)
before = status("VmRSS:")
code = main(sys.argv[1:])
print(json.dumps({"code": code, "before": before, "peak": status("VmHWM:")}), file=sys.stderr)
"""


def write_base(out: Path, preset: str, dtype: torch.dtype, max_shard: int) -> Path:
    """Random weights (std 0.02) in ``dtype``, written tensor by tensor."""
    args = get_preset(preset)
    g = torch.Generator().manual_seed(0)
    tensors = (
        (name, (torch.randn(shape, generator=g) * 0.02).to(dtype))
        for name, shape in expected_shapes(args).items()
    )
    return save_state(tensors, args, None, out, max_shard_size=max_shard)


def write_adapter(base: Path, out: Path, cfg: LoraConfig) -> Path:
    """A random adapter for ``base``; the base's weights are never materialised."""
    from llamaforge.checkpoint.native import read_params

    with torch.device("meta"):
        model = Transformer(read_params(base)[0])
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    for _, m in lora_modules(model):
        for lin in (m.lora_A, m.lora_B):
            lin.weight = nn.Parameter(torch.randn(lin.weight.shape, generator=g) * 0.02)
    return save_adapter(model, out, cfg, base=base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="1B")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-mib", type=int, default=512, help="shard size of the base")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["all", "output"])
    p.add_argument("--dir", type=Path, help="working directory (default: a temporary one)")
    a = p.parse_args()

    work = a.dir or Path(tempfile.mkdtemp(prefix="merge-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base = write_base(work / "base", a.preset, getattr(torch, a.dtype), a.max_shard_mib << 20)
        cfg = LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=a.targets)
        adapter = write_adapter(base, work / "adapter", cfg)
        print(f"base and adapter written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        sizes = [(base / f).stat().st_size for f in weight_files(base)]
        adapter_bytes = sum(f.stat().st_size for f in adapter.iterdir())
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        argv = ["lora", "merge", str(base), str(adapter), str(work / "merged")]
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", MERGE, *argv], env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(proc.stderr.strip().splitlines()[-1])
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    own, shard = r["peak"] - r["before"], max(sizes)
    target = 1.5 * shard + adapter_bytes
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print(
        "| preset | dtype | checkpoint | shards (largest) | adapter | peak RSS | before merging "
        "| merge's own | own / (largest shard + adapter) | target ≤ 1.5 × shard + adapter | wall |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {a.preset} | {a.dtype} | {human_bytes(sum(sizes))} | {len(sizes)} "
        f"({human_bytes(shard)}) | {human_bytes(adapter_bytes)} (rank {a.rank}, "
        f"{' '.join(a.targets)}) | {human_bytes(r['peak'])} | {human_bytes(r['before'])} | "
        f"{human_bytes(own)} | {own / (shard + adapter_bytes):.2f} | "
        f"{'met' if own <= target else 'MISSED'} ({human_bytes(target)}) | {wall:.0f} s |"
    )


if __name__ == "__main__":
    main()
