"""Finetuning-step throughput and step memory: llamaforge's finetuning step
(``Trainer.train_step``, as ``llamaforge finetune`` runs it) full, LoRA and packed, against
HF transformers' ``LlamaForCausalLM`` full and with peft's LoRA — same model shape, the same
tokenized instruction batches, the same loss (summed next-token loss on the answers /
trained tokens), AdamW (0.9, 0.95, no decay), clip 1.0. Variants run in interleaved rounds
so machine noise hits them alike; the median step of each is reported with *real* tokens/s
(non-padding positions: packing puts more examples in the same rows) and, on the CPU, the
training memory: the weights and AdamW's states held between steps plus the step's own peak
(tensors created during the step: activations, gradients, temporaries).

Data: the shared ShareGPT conversations and self-instruct tasks rendered with the llama2
template and Meta's tokenizer (needs ../shared/data or LLAMAFORGE_SHARED_DATA).

    python bench/finetune_throughput.py                       # CPU, 15M preset shape
    python bench/finetune_throughput.py --device cuda --preset 7B --max-len 2048 \\
        --batch 4 --variants ours-lora hf-peft-lora
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import StepMemory  # noqa: E402

from llamaforge.checkpoint.convert.hf import hf_config  # noqa: E402
from llamaforge.config import load_config  # noqa: E402
from llamaforge.finetune.data import (  # noqa: E402
    InstructDataConfig,
    PackedLoader,
    PaddedLoader,
    build_dataset,
)
from llamaforge.finetune.lora import LoraConfig, apply_lora, init_lora_  # noqa: E402
from llamaforge.parallel import DistInfo  # noqa: E402
from llamaforge.tokenizer import Tokenizer  # noqa: E402
from llamaforge.training.optim import cross_entropy  # noqa: E402
from llamaforge.training.trainer import TrainConfig, Trainer, model_args  # noqa: E402
from llamaforge.units import human_bytes

VARIANTS = ("ours-full", "ours-lora", "ours-packed", "hf-full", "hf-peft-lora")
SHARED = Path(os.environ.get("LLAMAFORGE_SHARED_DATA", Path(__file__).parents[2] / "shared/data"))


def instruct_examples(tok: Tokenizer, max_len: int) -> list:
    """The shared ShareGPT conversations and self-instruct tasks, tokenized (llama2 template)."""
    data = InstructDataConfig(
        paths=[
            str(SHARED / "instruct/fastchat/dummy_conversation.json"),
            str(SHARED / "instruct/self-instruct/seed_tasks.jsonl"),
        ],
        template="llama2",
        max_len=max_len,
        val_fraction=0.0,
    )
    return build_dataset(data, tok).train


def ours(
    variant: str,
    a: argparse.Namespace,
    device: torch.device,
    vocab: int,
    overrides: tuple[str, ...] = (),
):
    """(step function, model, optimizer) through the real trainer; ``overrides``: more
    ``TrainConfig`` settings (``compile=true``, ``activation_checkpointing=manual``)."""
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"model.preset={a.preset}",
            f"batch_tokens={a.batch * a.max_len}",
            f"micro_batch={a.batch}",
            "optim.lr=2e-4",
            "optim.weight_decay=0.0",
            "optim.warmup_steps=0",
            f"device={device}",
            f"dtype={a.dtype}",
            "out=/tmp/llamaforge-bench-finetune",
            "compile=false",
            *overrides,
        ],
    )
    lora = LoraConfig(rank=a.rank, alpha=2 * a.rank, dropout=0.0)
    hooks = {}
    if variant == "ours-lora":
        hooks = {
            "prepare_model": lambda m: apply_lora(m, lora),
            "after_init": lambda m: init_lora_(m, 0),
        }
    t = Trainer(
        cfg,
        DistInfo(device=device),
        args=model_args(cfg, vocab, a.max_len),
        seq_len=a.max_len,
        loader=None,  # type: ignore[arg-type]
        all_targets_count=False,
        logits_where_trained=True,
        **hooks,
    ).build()

    def step(batch) -> None:
        x, y, *extras = batch
        t.train_step(x, y, 2e-4, extras[0] if extras else None)

    return step, t.model, t.optimizer


def hf(variant: str, a: argparse.Namespace, device: torch.device, vocab: int):
    import transformers

    from llamaforge.presets import get_preset

    args = get_preset(a.preset, vocab_size=vocab, max_seq_len=a.max_len)
    cfg = transformers.LlamaConfig(**hf_config(args), attn_implementation="sdpa")
    cfg.use_cache = False
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device)
    if variant == "hf-peft-lora":
        import peft

        pc = peft.LoraConfig(
            r=a.rank,
            lora_alpha=2 * a.rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, pc)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)

    amp = torch.bfloat16 if a.dtype == "bf16" else None

    def step(batch) -> None:
        x, y = batch[0], batch[1]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=x).logits
        loss, n = cross_entropy(logits, y)
        (loss / n.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, opt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="15M")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="examples per padded step")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (attention projections)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    a = p.parse_args()
    device = torch.device(a.device)

    tok = Tokenizer(SHARED / "tokenizer/llama/tokenizer.model")
    examples = instruct_examples(tok, a.max_len)
    padded = PaddedLoader(examples, a.batch, seed=0, device=device)
    batches = {"padded": [next(padded) for _ in range(8)]}
    # packed rows holding about as many real tokens as a padded step
    real = statistics.mean(int((b[0] != 0).sum()) for b in batches["padded"])
    rows = max(1, round(real / a.max_len))
    packed = PackedLoader(examples, rows, a.max_len, seed=0, device=device)
    batches["packed"] = [next(packed) for _ in range(8)]

    def real_tokens(batch) -> int:  # padding is id 0 (<unk>), which real text never has
        return int((batch[0] != 0).sum())

    builders = {"ours": ours, "hf": hf}
    steps, kinds, memory, held = {}, {}, {}, {}
    for v in a.variants:
        steps[v], model, opt = builders[v.split("-")[0]](v, a, device, tok.vocab_size)
        kinds[v] = "packed" if v == "ours-packed" else "padded"
        for b in batches[kinds[v]][:2]:  # warm-up (AdamW's states exist after it)
            steps[v](b)
        held[v] = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
            t.numel() * t.element_size()
            for s in opt.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        if device.type == "cpu":
            with StepMemory() as tracker:
                steps[v](batches[kinds[v]][0])
            memory[v] = held[v] + tracker.peak
        else:  # the other variants' models share the GPU: count this step's own peak
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            steps[v](batches[kinds[v]][0])
            torch.cuda.synchronize(device)
            memory[v] = held[v] + torch.cuda.max_memory_allocated(device) - before
    times: dict[str, list[float]] = {v: [] for v in a.variants}
    toks: dict[str, list[int]] = {v: [] for v in a.variants}
    for r in range(a.rounds):
        for v in a.variants:
            for s in range(a.steps):
                b = batches[kinds[v]][(r * a.steps + s) % 8]
                t0 = time.perf_counter()
                steps[v](b)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[v].append(time.perf_counter() - t0)
                toks[v].append(real_tokens(b))

    import peft
    import transformers

    name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    print(
        f"# {a.preset} shape, vocab {tok.vocab_size}, max_len {a.max_len}, {a.batch} examples "
        f"per padded step / {rows} packed rows of {a.max_len}, LoRA r={a.rank} on wq wk wv wo, "
        f"{a.dtype}, {name}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}"
    )
    print("| variant | step (median) | real tokens/s | training memory (held + step) |")
    print("|---|---|---|---|")
    tps = {}
    for v in a.variants:
        med = statistics.median(times[v])
        tps[v] = sum(toks[v]) / sum(times[v])
        mem = (
            f"{human_bytes(memory[v])} ({human_bytes(held[v])} + "
            f"{human_bytes(memory[v] - held[v])})"
            if v in memory
            else "n/a"
        )
        print(f"| {v} | {med * 1e3:.0f} ms | {tps[v]:,.0f} | {mem} |")
    pairs = [("ours-full", "hf-full"), ("ours-lora", "hf-peft-lora"), ("ours-packed", "hf-full"),
             ("ours-lora", "ours-full")]  # fmt: skip
    for o, h in pairs:
        if o in tps and h in tps:
            print(f"{o} / {h}: tokens/s {tps[o] / tps[h]:.2f}x", end="")
            if o in memory and h in memory:
                print(f", training memory {memory[o] / memory[h]:.2f}x", end="")
            print()


if __name__ == "__main__":
    main()
