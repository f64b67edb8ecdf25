"""Packed finetuning without a dense mask: the packed loader's rows with the dense
block-diagonal (rows, 1, S, S) mask against the same rows with document ids, which the model
turns into a flex_attention BlockMask (``model.document_mask``), in one run.

Training step (``Trainer.train_step`` as ``llamaforge finetune`` runs it with packing: the
loss on the answers only, AdamW, clip 1.0), full finetuning:

* ``dense``: the rows as the loader used to give them, the dense mask (SDPA; on CUDA with
  grouped-query heads the keys and values are copied per query head);
* ``documents``: the rows as the loader gives them now, document ids; the model chooses —
  flex_attention on CUDA, the dense mask built per micro-batch on the CPU, where torch's
  flex_attention has no backward (the table names the path taken);
* ``dense-compile``, ``documents-compile``: the same with per-block ``torch.compile``.

Forward only (no gradients, as validation runs; the mask built in each call): ``dense-eval``
and ``flex-eval`` (eager flex_attention on the CPU), and ``-compile`` versions of both, the
blocks compiled (flex_attention compiled inside them). On the CPU these are the numbers that
``document_mask`` chooses the dense mask by.

Variants run in interleaved rounds so that machine noise hits them alike; the median step of
each is reported with real tokens/s (non-padding positions), as a markdown table whose rows
name the device (the CPU's model name, from /proc/cpuinfo). Data: the shared ShareGPT and
self-instruct examples (needs ../shared/data or LLAMAFORGE_SHARED_DATA).

    python bench/packed_attention.py                                # CPU, 15M preset, fp32
    python bench/packed_attention.py --device cuda --dtype bf16 --preset 1B --max-len 2048 \\
        --rows 8 --n-kv-heads 4 --variants dense documents dense-compile documents-compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from finetune_throughput import SHARED, instruct_examples, ours  # noqa: E402

from llamaforge.device import cpu_model  # noqa: E402
from llamaforge.finetune.data import PackedLoader  # noqa: E402
from llamaforge.model import build_model, document_mask  # noqa: E402
from llamaforge.presets import get_preset  # noqa: E402
from llamaforge.tokenizer import Tokenizer  # noqa: E402
from llamaforge.training.optim import cross_entropy  # noqa: E402

TRAIN = ("dense", "documents", "dense-compile", "documents-compile")
EVAL = ("dense-eval", "flex-eval", "dense-eval-compile", "flex-eval-compile")
VARIANTS = TRAIN + EVAL
Batch = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def with_dense_mask(batch: Batch) -> Batch:
    """The rows as the loader gave them before: the dense mask in place of document ids."""
    x, y, extras = batch
    mask = document_mask(extras["documents"], flex=False)
    return x, y, {"positions": extras["positions"], "mask": mask}  # type: ignore[dict-item]


def train_step(variant: str, a: argparse.Namespace, device: torch.device, vocab: int):
    """A step function over a packed batch through the real trainer."""
    overrides = [f"model.n_kv_heads={a.n_kv_heads}"] if a.n_kv_heads else []
    overrides += ["compile=true"] if variant.endswith("-compile") else []
    overrides += [f"activation_checkpointing={a.ac}"]
    ns = argparse.Namespace(preset=a.preset, batch=a.rows, max_len=a.max_len, rank=8,
                            dtype=a.dtype)  # fmt: skip
    step, _, _ = ours("ours-packed", ns, device, vocab, tuple(overrides))
    dense = variant.startswith("dense")
    return lambda batch: step(with_dense_mask(batch) if dense else batch)


def eval_step(variant: str, a: argparse.Namespace, device: torch.device, vocab: int):
    """A forward function (no gradients) over a packed batch: the loss on the answers."""
    args = get_preset(a.preset, vocab_size=vocab, max_seq_len=a.max_len)
    if a.n_kv_heads:
        args.n_kv_heads = a.n_kv_heads
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else None
    model = build_model(args, device=device, dtype=dtype)
    if variant.endswith("-compile"):
        for block in model.layers:
            block.compile()
    flex = variant.startswith("flex")

    @torch.no_grad()
    def step(batch: Batch) -> None:
        x, y, extras = batch
        mask = document_mask(extras["documents"], flex=flex)
        keep = y != -100
        cross_entropy(model(x, mask=mask, positions=extras["positions"], only=keep), y[keep])

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="15M")
    p.add_argument("--n-kv-heads", type=int, default=0, help="grouped-query heads (0: MHA)")
    p.add_argument("--max-len", type=int, default=512, help="positions of a packed row")
    p.add_argument("--rows", type=int, default=4, help="packed rows per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast")
    p.add_argument("--ac", default="none", help="activation checkpointing of the train steps")
    p.add_argument("--variants", nargs="+", default=["dense", "documents", *EVAL],
                   choices=VARIANTS)  # fmt: skip
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--note", default="", help="appended to each row (e.g. 'under load')")
    a = p.parse_args()
    device = torch.device(a.device)

    tok = Tokenizer(SHARED / "tokenizer/llama/tokenizer.model")
    loader = PackedLoader(instruct_examples(tok, a.max_len), a.rows, a.max_len, device=device)
    batches = [next(loader) for _ in range(8)]
    steps: dict[str, Callable[[Batch], None]] = {}
    failed: dict[str, str] = {}  # a variant that does not run is a row saying why
    for v in a.variants:
        t0 = time.perf_counter()
        try:
            steps[v] = (train_step if v in TRAIN else eval_step)(v, a, device, tok.vocab_size)
            for b in batches[:2]:  # warm-up (compilation, AdamW's states)
                steps[v](b)
        except Exception as e:  # (Inductor's CPU flex_attention lowering, out of memory)
            steps.pop(v, None)
            failed[v] = f"fails: {type(e).__name__}: {str(e).strip().splitlines()[0][:150]}"
        print(f"# {v}: warm-up {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {v: [] for v in steps}
    toks: dict[str, list[int]] = {v: [] for v in steps}
    for r in range(a.rounds):
        for v in steps:
            for s in range(a.steps):
                b = batches[(r * a.steps + s) % len(batches)]
                t0 = time.perf_counter()
                steps[v](b)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[v].append(time.perf_counter() - t0)
                toks[v].append(int((b[0] != 0).sum()))  # padding is id 0 (<unk>)

    name = device_label(device)
    shape = f"{a.preset}" + (f" GQA {a.n_kv_heads}" if a.n_kv_heads else "")
    print(f"# packed rows: {a.rows} x {a.max_len}, {a.dtype}, activation checkpointing {a.ac}, "
          f"torch {torch.__version__}")  # fmt: skip
    print("| device | model | variant | step (median) | real tokens/s | vs dense | note |")
    print("|---|---|---|---|---|---|---|")
    # the path that document ids take on this device (document_mask's choice)
    path = "flex_attention" if device.type == "cuda" else "dense mask: no CPU flex backward"
    for v in a.variants:
        if v in failed:
            print(f"| {name} | {shape} | {v} | {failed[v]} | | | {a.note} |")
            continue
        med = statistics.median(times[v])
        ref = ("dense" if v in TRAIN else "dense-eval") + ("-compile" if "compile" in v else "")
        ratio = f"{statistics.median(times[ref]) / med:.2f}x" if ref in times else ""
        tps = sum(toks[v]) / sum(times[v])
        label = f"{v} ({path})" if v.startswith("documents") else v
        print(f"| {name} | {shape} | {label} | {med * 1e3:.1f} ms | {tps:,.0f} | {ratio} "
              f"| {a.note} |")  # fmt: skip


if __name__ == "__main__":
    main()
