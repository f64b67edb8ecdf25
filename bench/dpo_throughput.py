"""DPO-step throughput and step memory: llamaforge's preference step
(``PreferenceTrainer.train_step``, as ``llamaforge finetune method=dpo`` runs it) with full
finetuning (reference log-probs stored before training) and LoRA (reference: adapters off),
against TRL's ``DPOTrainer`` (its default: a reference copy of the model for full
finetuning, peft's disabled adapter for LoRA) — same model shape, the same batches (TRL's
collated pairs, fed to both), sigmoid loss β 0.1, AdamW (0.9, 0.95, no decay), clip 1.0.
Variants run in interleaved rounds; the median step of each is reported with real tokens/s
(non-padding positions of the chosen and rejected rows) and, on the CPU, the training memory
(weights, reference, AdamW's states held between steps + the step's own peak).

Data: the shared self-instruct tasks as prompt / chosen (its answer) / rejected (another
task's answer), Meta's tokenizer (needs ../shared/data or LLAMAFORGE_SHARED_DATA).

    python bench/dpo_throughput.py                          # CPU, 15M preset shape
    python bench/dpo_throughput.py --device cuda --dtype bf16 --preset 7B --batch 4 \\
        --max-len 1024 --variants ours-lora trl-lora
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import StepMemory  # noqa: E402

from llamaforge.checkpoint.convert.hf import hf_config  # noqa: E402
from llamaforge.config import load_config  # noqa: E402
from llamaforge.finetune.lora import LoraConfig  # noqa: E402
from llamaforge.finetune.preference import PreferenceTrainer, sequence_logps  # noqa: E402
from llamaforge.finetune.run import FinetuneConfig, lora_hooks  # noqa: E402
from llamaforge.parallel import DistInfo  # noqa: E402
from llamaforge.presets import get_preset  # noqa: E402
from llamaforge.units import human_bytes  # noqa: E402

VARIANTS = ("ours-full", "ours-lora", "trl-full", "trl-lora")
SHARED = Path(os.environ.get("LLAMAFORGE_SHARED_DATA", Path(__file__).parents[2] / "shared/data"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _hf_model(a: argparse.Namespace, device: torch.device, vocab: int):
    import transformers

    args = get_preset(a.preset, vocab_size=vocab, max_seq_len=a.max_len)
    cfg = transformers.LlamaConfig(**hf_config(args), attn_implementation="sdpa")
    cfg.use_cache = False
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device)


def trl_trainer(variant: str, a: argparse.Namespace, device: torch.device, tok_dir: Path):
    """TRL's DPOTrainer on the HF model (its batches are what every variant steps on)."""
    import datasets
    import peft
    import transformers
    import trl

    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    rows = [json.loads(x) for x in (tok_dir / "pairs.jsonl").read_text().splitlines()]
    model = _hf_model(a, device, len(tok))
    pcfg = None
    if variant == "trl-lora":
        pcfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                               target_modules=TARGETS, task_type="CAUSAL_LM")  # fmt: skip
    args = trl.DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, report_to=[],
        use_cpu=device.type == "cpu", bf16=a.dtype == "bf16", beta=0.1, max_length=a.max_len,
        max_grad_norm=1.0,
    )  # fmt: skip
    ref = None
    if variant == "trl-full":  # what TRL builds from a model's path: a frozen copy
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    return trl.DPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        peft_config=pcfg,
    )


def trl_step(trainer, device: torch.device):
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)

    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets up

    def step(batch) -> None:
        inputs = {k: v.to(device) for k, v in batch.items()}
        trainer.training_step(model, inputs)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, opt


def ours(variant: str, a: argparse.Namespace, device: torch.device, vocab: int, batches):
    """(step function, model, optimizer) through the real preference trainer; full
    finetuning's reference log-probs are computed first, as a run does."""
    cfg = load_config(
        FinetuneConfig, None,
        [f"model.preset={a.preset}", f"model.vocab_size={vocab}", f"model.max_seq_len={a.max_len}",
         "method=dpo", "preference.beta=0.1", f"batch_size={a.batch}", "steps=1000",
         f"micro_batch={2 * a.batch}", f"batch_tokens={2 * a.batch * a.max_len}",
         "optim.lr=2e-4", "optim.weight_decay=0.0", "optim.warmup_steps=0", f"device={device}",
         f"dtype={a.dtype}", "out=/tmp/llamaforge-bench-dpo", "compile=false", "resume=none"],
    )  # fmt: skip
    if variant == "ours-lora":
        cfg.lora = LoraConfig(enabled=True, rank=a.rank, alpha=2 * a.rank, dropout=0.0)
    t = PreferenceTrainer(
        cfg, DistInfo(device=device), args=get_preset(a.preset, vocab_size=vocab,
        max_seq_len=a.max_len), seq_len=a.max_len, loader=None,  # type: ignore[arg-type]
        all_targets_count=False, name="dpo", **lora_hooks(cfg),
    )  # fmt: skip
    t.build()
    if variant == "ours-full":  # the stored reference of every batch's rows, before training
        with torch.no_grad():
            t.reference = torch.cat(
                [sequence_logps(t.model, x.to(device), y.to(device), {})[0] for x, y, _ in batches]
            )

    def step(batch) -> None:
        x, y, extras = batch
        t.train_step(x, y, 2e-4, extras)

    return step, t.model, t.optimizer


def to_rows(batch, index0: int):
    """TRL's collated batch ([chosen…, rejected…] whole sequences) as our rows."""
    ids, mask = batch["input_ids"], batch["completion_mask"] * batch["attention_mask"]
    b = ids.shape[0] // 2
    order = torch.stack([torch.arange(b), torch.arange(b) + b], 1).flatten()
    x, y = ids[order, :-1], ids[order, 1:].masked_fill(mask[order, 1:] == 0, -100)
    index = torch.arange(index0, index0 + b).repeat_interleave(2)
    return x, y, {"index": index}


def _write_inputs(tok_dir: Path, n: int) -> None:
    import transformers

    from llamaforge.checkpoint.convert import convert
    from llamaforge.checkpoint.native import save
    from llamaforge.model import ModelArgs, build_model
    from llamaforge.tokenizer import Tokenizer

    tasks = [json.loads(x) for x in (SHARED / "instruct/self-instruct/seed_tasks.jsonl")
             .read_text().splitlines()]  # fmt: skip
    rows = []
    for i, t in enumerate(tasks[:n]):
        inst = t["instances"][0]
        other = tasks[(i + 7) % len(tasks)]["instances"][0]["output"]
        prompt = t["instruction"] + ("\n" + inst["input"] if inst["input"] else "")
        rows.append({"prompt": prompt, "chosen": " " + inst["output"], "rejected": " " + other})
    (tok_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the HF tokenizer the converter writes for Meta's (a tiny model carries it there)
    native, hf = tok_dir / "native", tok_dir / "hf"
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, max_seq_len=64)
    save(build_model(args), Tokenizer(SHARED / "tokenizer/llama/tokenizer.model"), native)
    convert(native, hf, source="native", target="hf", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tok_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="15M")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="pairs per step")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (attention projections)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    a = p.parse_args()
    device = torch.device(a.device)
    tok_dir = Path(tempfile.mkdtemp())
    _write_inputs(tok_dir, 8 * a.batch)

    first = trl_trainer("trl-full", a, device, tok_dir)
    loader = iter(first.get_train_dataloader())
    trl_batches = [next(loader) for _ in range(8)]
    vocab = first.model.config.vocab_size
    rows = [to_rows(b, i * a.batch) for i, b in enumerate(trl_batches)]
    steps, memory, held, batches = {}, {}, {}, {}
    for v in a.variants:
        if v.startswith("trl"):
            trainer = first if v == "trl-full" else trl_trainer(v, a, device, tok_dir)
            steps[v], model, opt = trl_step(trainer, device)
            batches[v] = trl_batches
            extra = trainer.ref_model if v == "trl-full" else None
        else:
            steps[v], model, opt = ours(v, a, device, vocab, rows)
            batches[v], extra = rows, None
        for b in batches[v][:2]:  # warm-up (AdamW's states exist after it)
            steps[v](b)
        states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        ref = list(extra.state_dict().values()) if extra is not None else []
        tensors = [*model.state_dict().values(), *ref, *states]
        held[v] = sum(t.numel() * t.element_size() for t in tensors)
        if device.type == "cpu":
            with StepMemory() as tracker:
                steps[v](batches[v][0])
            memory[v] = held[v] + tracker.peak
    times: dict[str, list[float]] = {v: [] for v in a.variants}
    toks: dict[str, list[int]] = {v: [] for v in a.variants}
    for r in range(a.rounds):
        for v in a.variants:
            for s in range(a.steps):
                i = (r * a.steps + s) % 8
                t0 = time.perf_counter()
                steps[v](batches[v][i])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[v].append(time.perf_counter() - t0)
                toks[v].append(int(trl_batches[i]["attention_mask"].sum()))

    import peft
    import transformers
    import trl

    name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    print(
        f"# DPO step, {a.preset} shape, vocab {vocab}, ≤ {a.max_len} tokens, {a.batch} pairs a "
        f"step, LoRA r={a.rank} on wq wk wv wo, {a.dtype}, {name}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}"
    )
    print("| variant | step (median) | real tokens/s | training memory (held + step) |")
    print("|---|---|---|---|")
    tps = {}
    for v in a.variants:
        tps[v] = sum(toks[v]) / sum(times[v])
        mem = "n/a"
        if v in memory:
            mem = f"{human_bytes(memory[v])} ({human_bytes(held[v])} + "
            mem += f"{human_bytes(memory[v] - held[v])})"
        print(f"| {v} | {statistics.median(times[v]) * 1e3:.0f} ms | {tps[v]:,.0f} | {mem} |")
    for o, h in (("ours-full", "trl-full"), ("ours-lora", "trl-lora")):
        if o in tps and h in tps:
            line = f"{o} / {h}: tokens/s {tps[o] / tps[h]:.2f}x"
            if o in memory and h in memory:
                line += f", training memory {memory[o] / memory[h]:.2f}x"
            print(line)


if __name__ == "__main__":
    main()
