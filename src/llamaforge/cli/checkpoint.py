"""``llamaforge init``, ``info`` and ``generate``: make, size up and sample a checkpoint
(the checkpoint format itself: checkpoint.py; sampling: generate.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from llamaforge.cli.help import add_config_help
from llamaforge.cli.main import tokenizer_path


def _model_args_class() -> type:
    from llamaforge.model import ModelArgs

    return ModelArgs


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``info``, ``init`` and ``generate`` commands."""
    i = subparsers.add_parser(
        "info", help="parameters, FLOPs per token and training memory of a model"
    )
    src = i.add_mutually_exclusive_group()
    src.add_argument("--preset", help="1M, 15M, 110M, 1B, 7B, 13B, 33B or 65B")
    src.add_argument("--ckpt", help="a checkpoint directory (reads its params.json)")
    i.add_argument(
        "--seq-len", type=int, help="context for the attention FLOPs (default max_seq_len)"
    )
    i.add_argument("--vocab-size", type=int, default=32000, help="when params.json says -1")
    i.add_argument(
        "--micro-batch", type=int, default=1, help="sequences per step for the activations"
    )
    i.add_argument(
        "--tp", type=int, default=None, help="per-GPU memory with this many tensor-parallel ranks"
    )
    i.add_argument(
        "--dp", type=int, default=None, help="... and this many FSDP2 (data-parallel) ranks"
    )
    i.add_argument(
        "--gpu-memory", type=float, default=80.0, help="GiB per GPU for 'fits' (default 80)"
    )
    i.add_argument(
        "--layouts",
        action="store_true",
        help="print a markdown table of per-GPU memory for the Table 2 sizes over layouts",
    )
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_info)

    n = subparsers.add_parser(
        "init",
        help="write a randomly initialised checkpoint",
        description="Write a randomly initialised checkpoint of a preset size; KEY=VALUE "
        "overrides change ModelArgs fields (e.g. max_seq_len=512).",
        add_help=False,
    )
    add_config_help(n, _model_args_class, "ModelArgs (KEY=VALUE overrides; 7B defaults):")
    n.add_argument("--preset", required=True, help="model size (see `llamaforge info`)")
    n.add_argument(
        "--tokenizer",
        required=True,
        help="SentencePiece model, or a folder with tokenizer.model (Meta's download, a "
        "Hugging Face LLaMA repository); sets vocab_size",
    )
    n.add_argument("--out", required=True, help="checkpoint directory to create")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    n.add_argument("--force", action="store_true", help="replace an existing --out")
    n.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ModelArgs overrides")
    n.set_defaults(func=_init)

    g = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint, streamed to stdout",
        description="Continue each prompt with the checkpoint. One prompt streams its "
        "continuation after the prompt; several are one batch, each row printed under a "
        "'=== [i/n]' label with its finish reason. The prompt is shown dimmed on a terminal "
        "(--echo: always, --no-echo: never). Sampling is unseeded (each run differs) "
        "unless --seed is given; --temperature 0 is greedy.",
    )
    g.add_argument("--ckpt", required=True, help="native checkpoint directory")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--prompt-file", help="read one prompt from this file")
    g.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to add per row (default 128)"
    )
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument(
        "--top-p", type=float, default=0.95, help="nucleus mass in (0, 1] (default 0.95)"
    )
    g.add_argument(
        "--top-k", type=int, default=None, help="keep the k likeliest, k >= 1 (default: off)"
    )
    g.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")
    g.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user message rendered with the chat template; stop at eos",
    )
    from llamaforge.cli.chat import add_template_args

    add_template_args(g)
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for sampling (default: none, so sampling is unseeded and each run differs)",
    )
    g.add_argument(
        "--echo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print the prompt before its continuation (default: dimmed on a terminal, "
        "not when stdout is a file or a pipe)",
    )
    g.add_argument(
        "--truncate",
        action="store_true",
        help="keep the last tokens of a prompt longer than the context (default: an error)",
    )
    g.add_argument(
        "--tokenizer", help="tokenizer.model (or its folder) to use instead of the checkpoint's"
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    g.add_argument("--dtype", help="float32, bfloat16, float16 (default: as stored)")
    g.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallelism: split the model over N processes (run under torchrun "
        "--nproc_per_node N; rank 0 prints)",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="refuse a checkpoint with NaN/Inf weights (default: load it with a warning)",
    )
    _add_fast_args(g)
    g.set_defaults(func=_generate)


def _add_fast_args(g: argparse.ArgumentParser) -> None:
    """Fast single-stream decoding (generate.py's FastGenerator; prompts run one by one)."""
    f = g.add_argument_group(
        "fast decoding",
        "a static KV cache, compiled steps, int8 weights and speculative decoding; with "
        "--compile or --draft, prompts are decoded one at a time",
    )
    f.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step (CUDA graphs on a GPU); the first call compiles",
    )
    f.add_argument(
        "--quantize",
        choices=["int8", "int8-bf16"],
        help="int8 weight-only linear layers, one scale per output channel (CPU or GPU); "
        "int8-bf16: on the CPU, fp32 activations enter the int8 kernel as bf16 (faster, "
        "less exact)",
    )
    f.add_argument(
        "--draft",
        metavar="DIR",
        help="speculative decoding with this smaller checkpoint (same tokenizer) proposing "
        "tokens; greedy output is unchanged; the acceptance rate is printed on stderr",
    )
    f.add_argument(
        "--draft-k",
        type=int,
        default=4,
        metavar="N",
        help="tokens the draft proposes per step (default 4)",
    )


def _model_args_for(a: argparse.Namespace):
    from llamaforge.checkpoint.native import read_params
    from llamaforge.presets import get_preset

    if a.ckpt:
        args, _ = read_params(a.ckpt)
        return args, str(a.ckpt)
    return get_preset(a.preset), f"preset {a.preset}"


def _info(a: argparse.Namespace) -> int:
    from llamaforge.training.flops import (
        activation_memory,
        count_params,
        flops_per_token,
        training_memory,
    )
    from llamaforge.units import human_bytes, human_count

    if a.layouts:
        from llamaforge.training.flops import layout_table

        print(layout_table(a.gpu_memory, a.seq_len or 2048, a.micro_batch), end="")
        return 0
    if not (a.preset or a.ckpt):
        raise ValueError("give --preset SIZE or --ckpt DIR (or --layouts)")
    args, what = _model_args_for(a)
    if args.vocab_size <= 0:
        args.vocab_size = a.vocab_size
    seq = a.seq_len or args.max_seq_len
    counts = count_params(args)
    mem = training_memory(args)
    info = {
        "model": what,
        "args": args.to_dict(),
        "head_dim": args.head_dim,
        "ffn_hidden_dim": args.ffn_hidden_dim,
        "params": counts,
        "seq_len": seq,
        "flops_per_token": flops_per_token(args, seq),
        "memory_bytes": {
            "weights_bf16": 2 * counts["total"],
            "weights_fp32": mem.weights,
            "gradients_fp32": mem.gradients,
            "adamw_states_fp32": mem.optimizer,
            "training_total": mem.total,
        },
        "activation_bytes": {
            mode: activation_memory(args, a.micro_batch * seq, mode)
            for mode in ("none", "selective", "manual", "full")
        },
    }
    layout = None
    if a.tp is not None or a.dp is not None:
        from llamaforge.training.flops import AC_FOR_LAYOUT, layout_memory, layout_total

        tp, dp = a.tp or 1, a.dp or 1
        if tp < 1 or dp < 1:
            raise ValueError(f"--tp {tp} and --dp {dp} must be >= 1")
        layout = {
            "tp": tp,
            "dp_shard": dp,
            "gpus": tp * dp,
            "bytes_per_gpu": {
                m: layout_memory(
                    args, tp=tp, dp_shard=dp, seq_len=seq, micro_batch=a.micro_batch, mode=m
                )  # fmt: skip
                for m in AC_FOR_LAYOUT
            },
        }
        info["layout"] = layout
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{what}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
        f"({args.kv_heads} kv), head_dim {args.head_dim}, ffn {args.ffn_hidden_dim}, "
        f"vocab {args.vocab_size}"
    )
    print(
        f"parameters:       {counts['total']:,} ({human_count(counts['total'])}); "
        f"non-embedding {counts['non_embedding']:,}"
    )
    print(f"FLOPs per token:  {info['flops_per_token']:.4g} (6N + 12·L·d·T, training, T={seq})")
    print("memory for training (bf16 compute, fp32 master weights):")
    for key, label in (
        ("weights_fp32", "weights (fp32)"),
        ("gradients_fp32", "gradients (fp32)"),
        ("adamw_states_fp32", "AdamW states (fp32)"),
        ("training_total", "total"),
    ):
        print(f"  {label:<20}{human_bytes(info['memory_bytes'][key]):>12}")
    print(f"  + activations for {a.micro_batch} x {seq} tokens (estimated), by checkpointing:")
    for mode, n in info["activation_bytes"].items():
        total = human_bytes(n + mem.total)
        print(f"    {mode:<18}{human_bytes(n):>12}   (step total {total})")
    print(f"weights for inference (bf16): {human_bytes(info['memory_bytes']['weights_bf16'])}")
    if layout is not None:
        per = layout["bytes_per_gpu"]
        print(
            f"per GPU with tp {layout['tp']} × dp_shard {layout['dp_shard']} "
            f"({layout['gpus']} GPUs; FSDP2 + tensor/sequence parallelism, bf16):"
        )
        first = per["none"]
        for key, label in (
            ("weights", "weights (fp32)"),
            ("gradients", "gradients (fp32)"),
            ("optimizer", "AdamW states (fp32)"),
            ("gathered", "gathered bf16 blocks"),
        ):
            print(f"  {label:<22}{human_bytes(first[key]):>12}")
        print(f"  activations per micro-batch of {a.micro_batch} x {seq} (Korthikanti et al.):")
        limit = a.gpu_memory * 1024**3
        for mode, mem in per.items():
            total = layout_total(mem)
            fits = "fits" if total <= 0.9 * limit else "does not fit"
            print(
                f"    {mode:<20}{human_bytes(mem['activations']):>12}   (total "
                f"{human_bytes(total)}: {fits} in {a.gpu_memory:g} GiB with a 10 % margin)"
            )
    return 0


def _init(a: argparse.Namespace) -> int:
    import torch

    from llamaforge.checkpoint.native import save
    from llamaforge.config import apply_overrides
    from llamaforge.model import build_model
    from llamaforge.presets import get_preset
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path(a.tokenizer))
    args = apply_overrides(get_preset(a.preset, vocab_size=tok.vocab_size), a.overrides)
    torch.manual_seed(a.seed)
    model = build_model(args)
    out = save(model, tok, a.out, dtype=a.dtype, overwrite=a.force)
    print(f"wrote {out}: {model.num_params():,} parameters, random init (seed {a.seed})")
    return 0


def _generate(a: argparse.Namespace) -> int:
    from llamaforge.checkpoint.native import load
    from llamaforge.device import resolve_device
    from llamaforge.inference.generate import check_sampling, check_utf8, generate_completions

    prompts = list(a.prompt or [])
    for p in prompts:
        check_utf8(p, "--prompt")
    if a.prompt_file:
        try:
            prompts.append(Path(a.prompt_file).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{a.prompt_file}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset "
                f"{e.start})"
            ) from None
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    try:
        check_sampling(a.temperature, a.top_p, a.top_k)
    except ValueError as e:
        raise ValueError(f"--{e}".replace("_", "-", 1)) from None
    if not a.chat and (a.template or a.system):
        raise ValueError("--template and --system need --chat")
    device = resolve_device(a.device or "auto")
    tok_file = tokenizer_path(a.tokenizer)
    rank = 0
    if a.tp != 1:  # split over the torchrun processes
        model, tok, rank = load_tensor_parallel(a.ckpt, a.tp, a.device, a.dtype, tok_file, a.strict)
    else:
        model, tok = load(a.ckpt, device=device, dtype=a.dtype, tokenizer=tok_file, strict=a.strict)
    if tok is None:
        raise ValueError(f"{a.ckpt}: no tokenizer.model in the checkpoint; pass --tokenizer")
    inputs: list[str] | list[list[int]] = prompts
    stops = list(a.stop or ())
    if a.chat:
        from llamaforge.chat_templates import encode_text
        from llamaforge.inference.chat import resolve_template, stop_strings

        tpl = resolve_template(a.template, tok, a.ckpt)
        system = [{"role": "system", "content": a.system}] if a.system else []
        inputs = [
            encode_text(
                tok,
                tpl.render([*system, {"role": "user", "content": p}], add_generation_prompt=True),
                tpl.bos_token,
                tpl.eos_token,
            )
            for p in prompts
        ]
        stops += stop_strings(tpl)

    if a.draft_k < 1:
        raise ValueError(f"--draft-k {a.draft_k}: must be at least 1")
    if a.tp != 1 and (a.compile or a.draft or a.quantize):
        raise ValueError(
            "--tp splits the model over processes: it does not combine with "
            "--compile, --draft or --quantize (use one process for those)"
        )
    draft = None
    if a.draft:
        draft, _ = load(a.draft, device=device, dtype=model.tok_embeddings.weight.dtype)
    if a.quantize:
        from llamaforge.inference.quantize import quantize_int8

        for m in (model, draft) if draft is not None else (model,):
            quantize_int8(m, cpu_bf16_compute=a.quantize == "int8-bf16")
    fast = None
    if a.compile or draft is not None:
        from llamaforge.inference.generate import FastGenerator

        fast = FastGenerator(model, tok, compile=a.compile, draft=draft, draft_k=a.draft_k)

    stdout = sys.stdout if rank == 0 else open(os.devnull, "w")  # noqa: SIM115 (rank 0 prints)
    tty = stdout.isatty()
    echo = tty if a.echo is None else a.echo
    out = _Printer(stdout)

    def show_prompt(text: str) -> None:
        if echo:
            out.write(text, dim=tty)

    def stream(row: int, delta: str) -> None:
        if len(prompts) == 1:
            out.write(delta)

    if len(prompts) == 1:
        show_prompt(prompts[0])
    settings = dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        stop=stops,
        seed=a.seed,
        truncate=a.truncate,
        on_text=stream,
    )
    if fast is None:
        results = generate_completions(model, tok, inputs, **settings)
    else:
        results, proposed, accepted = [], 0, 0
        for prompt in inputs:
            results.append(fast.generate(prompt, **settings))
            proposed, accepted = proposed + fast.stats.proposed, accepted + fast.stats.accepted
        if draft is not None:
            rate = accepted / proposed if proposed else 0.0
            print(
                f"speculative decoding: {accepted}/{proposed} drafted tokens accepted "
                f"({rate:.1%}), draft_k={a.draft_k}",
                file=sys.stderr,
            )
    if len(prompts) > 1:
        for i, (p, r) in enumerate(zip(prompts, results), 1):
            out.end_line()
            out.write(f"=== [{i}/{len(prompts)}] {r.finish_reason}\n")
            show_prompt(p)
            out.write(r.text)
    out.end_line()
    return 0


def load_tensor_parallel(
    ckpt: str, tp: int, device: str | None, dtype: str | None, tokenizer: Any, strict: bool
) -> tuple[Any, Any, int]:
    """``--tp N``: join the torchrun group (left at exit) and load ``ckpt`` split over it;
    returns the model, the tokenizer and this process's rank."""
    import atexit

    from llamaforge import parallel as D

    info = D.init(device or "auto")
    atexit.register(D.cleanup)
    model, tok = D.load_tensor_parallel(
        ckpt, info, tp, dtype=dtype, tokenizer=tokenizer, strict=strict
    )
    return model, tok, info.rank


class _Printer:
    """Writes generated text for a person: runs of blank lines squeezed to one (a small
    model's newline runs), the prompt dimmed on a terminal, flushed as it goes."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.newlines = 1  # consecutive newlines just written (start: a fresh line)

    def write(self, text: str, dim: bool = False) -> None:
        kept = []
        for ch in text:
            if ch == "\n":
                if self.newlines >= 2:
                    continue
                self.newlines += 1
            else:
                self.newlines = 0
            kept.append(ch)
        chunk = "".join(kept)
        if chunk:
            self.stream.write(f"{self.DIM}{chunk}{self.RESET}" if dim else chunk)
            self.stream.flush()

    def end_line(self) -> None:
        if self.newlines == 0:
            self.stream.write("\n")
            self.newlines = 1
        self.stream.flush()
