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
from llamaforge.cli.loading import (
    Loaded,
    add_load_args,
    add_speed_args,
    check_draft_k,
    load_checkpoint,
    load_draft,
    print_acceptance,
    quantize,
)
from llamaforge.cli.main import tokenizer_path


def _model_args_class() -> type:
    from llamaforge.model import ModelArgs

    return ModelArgs


def register(subparsers: argparse._SubParsersAction) -> None:
    """The ``info``, ``init`` and ``generate`` commands."""
    _register_info(subparsers)
    _register_init(subparsers)
    _register_generate(subparsers)


def _register_info(subparsers: argparse._SubParsersAction) -> None:
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


def _register_init(subparsers: argparse._SubParsersAction) -> None:
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


def _register_generate(subparsers: argparse._SubParsersAction) -> None:
    from llamaforge.cli.chat import add_template_args

    g = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint, streamed to stdout",
        description="Continue each prompt with the checkpoint. One prompt streams its "
        "continuation after the prompt; several are one batch, each row printed under a "
        "'=== [i/n]' label with its finish reason. The prompt is shown dimmed on a terminal "
        "(--echo: always, --no-echo: never). Sampling is unseeded (each run differs) "
        "unless --seed is given; --temperature 0 is greedy.",
    )
    add_load_args(g)
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
        "--tp",
        type=int,
        default=1,
        help="tensor parallelism: split the model over N processes (run under torchrun "
        "--nproc_per_node N; rank 0 prints)",
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
    add_speed_args(f)


def _model_args_for(a: argparse.Namespace):
    from llamaforge.checkpoint.native import read_params
    from llamaforge.presets import get_preset

    if a.ckpt:
        args, _ = read_params(a.ckpt)
        return args, str(a.ckpt)
    return get_preset(a.preset), f"preset {a.preset}"


def _info(a: argparse.Namespace) -> int:
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
    info = _model_info(args, what, seq, a.micro_batch)
    if a.tp is not None or a.dp is not None:
        info["layout"] = _layout_info(args, a.tp or 1, a.dp or 1, seq, a.micro_batch)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_info(info, args, a.micro_batch)
    if "layout" in info:
        _print_layout(info["layout"], a.micro_batch, seq, a.gpu_memory)
    return 0


def _model_info(args: Any, what: str, seq: int, micro_batch: int) -> dict[str, Any]:
    """Sizes, FLOPs per token and training memory of a model, JSON-ready."""
    from llamaforge.training.flops import (
        activation_memory,
        count_params,
        flops_per_token,
        training_memory,
    )

    counts = count_params(args)
    mem = training_memory(args)
    return {
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
            mode: activation_memory(args, micro_batch * seq, mode)
            for mode in ("none", "selective", "manual", "full")
        },
    }


def _layout_info(args: Any, tp: int, dp: int, seq: int, micro_batch: int) -> dict[str, Any]:
    """Per-GPU memory with ``tp`` tensor-parallel and ``dp`` FSDP2 ranks, by checkpointing."""
    from llamaforge.training.flops import AC_FOR_LAYOUT, layout_memory

    if tp < 1 or dp < 1:
        raise ValueError(f"--tp {tp} and --dp {dp} must be >= 1")
    return {
        "tp": tp,
        "dp_shard": dp,
        "gpus": tp * dp,
        "bytes_per_gpu": {
            m: layout_memory(args, tp=tp, dp_shard=dp, seq_len=seq, micro_batch=micro_batch, mode=m)
            for m in AC_FOR_LAYOUT
        },
    }


def _print_info(info: dict[str, Any], args: Any, micro_batch: int) -> None:
    from llamaforge.units import human_bytes, human_count

    counts, seq, memory = info["params"], info["seq_len"], info["memory_bytes"]
    print(
        f"{info['model']}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
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
        print(f"  {label:<20}{human_bytes(memory[key]):>12}")
    print(f"  + activations for {micro_batch} x {seq} tokens (estimated), by checkpointing:")
    for mode, n in info["activation_bytes"].items():
        total = human_bytes(n + memory["training_total"])
        print(f"    {mode:<18}{human_bytes(n):>12}   (step total {total})")
    print(f"weights for inference (bf16): {human_bytes(memory['weights_bf16'])}")


def _print_layout(layout: dict[str, Any], micro_batch: int, seq: int, gpu_memory: float) -> None:
    from llamaforge.training.flops import layout_total
    from llamaforge.units import human_bytes

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
    print(f"  activations per micro-batch of {micro_batch} x {seq} (Korthikanti et al.):")
    limit = gpu_memory * 1024**3
    for mode, mem in per.items():
        total = layout_total(mem)
        fits = "fits" if total <= 0.9 * limit else "does not fit"
        print(
            f"    {mode:<20}{human_bytes(mem['activations']):>12}   (total "
            f"{human_bytes(total)}: {fits} in {gpu_memory:g} GiB with a 10 % margin)"
        )


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
    prompts = _read_prompts(a)
    _check_generate_args(a)
    loaded = load_checkpoint(a, tp=a.tp)
    inputs: list[str] | list[list[int]] = prompts
    stops = list(a.stop or ())
    if a.chat:
        inputs, template_stops = _chat_inputs(a, loaded.tok, prompts)
        stops += template_stops
    fast = _fast_generator(a, loaded)
    stdout = sys.stdout if loaded.rank == 0 else open(os.devnull, "w")  # noqa: SIM115 (rank 0 prints)
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
    results = _complete(a, loaded, fast, inputs, settings)
    if len(prompts) > 1:
        for i, (p, r) in enumerate(zip(prompts, results), 1):
            out.end_line()
            out.write(f"=== [{i}/{len(prompts)}] {r.finish_reason}\n")
            show_prompt(p)
            out.write(r.text)
    out.end_line()
    return 0


def _read_prompts(a: argparse.Namespace) -> list[str]:
    """The --prompt texts, then the --prompt-file's; at least one."""
    from llamaforge.inference.generate import check_utf8

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
    return prompts


def _check_generate_args(a: argparse.Namespace) -> None:
    """The flags that cannot go together, before anything is loaded."""
    from llamaforge.inference.generate import check_sampling

    try:
        check_sampling(a.temperature, a.top_p, a.top_k)
    except ValueError as e:
        raise ValueError(f"--{e}".replace("_", "-", 1)) from None
    if not a.chat and (a.template or a.system):
        raise ValueError("--template and --system need --chat")
    check_draft_k(a)
    if a.tp != 1 and (a.compile or a.draft or a.quantize):
        raise ValueError(
            "--tp splits the model over processes: it does not combine with "
            "--compile, --draft or --quantize (use one process for those)"
        )


def _chat_inputs(a: argparse.Namespace, tok: Any, prompts: list[str]) -> tuple[list, list[str]]:
    """``--chat``: each prompt as a user message (after --system) rendered with the chat
    template and encoded; and the template's stop strings."""
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
    return inputs, stop_strings(tpl)


def _fast_generator(a: argparse.Namespace, loaded: Loaded) -> Any:
    """The FastGenerator with --compile or --draft (None without them); --quantize makes
    the weights int8 either way."""
    draft = load_draft(a, loaded)
    quantize(a.quantize, loaded.model, draft)
    if not (a.compile or draft is not None):
        return None
    from llamaforge.inference.generate import FastGenerator

    return FastGenerator(
        loaded.model, loaded.tok, compile=a.compile, draft=draft, draft_k=a.draft_k
    )


def _complete(
    a: argparse.Namespace, loaded: Loaded, fast: Any, inputs: list, settings: dict[str, Any]
) -> list[Any]:
    """Every input's completion: one batch, or one by one with the fast generator (then
    the draft's acceptance on stderr)."""
    if fast is None:
        from llamaforge.inference.generate import generate_completions

        return generate_completions(loaded.model, loaded.tok, inputs, **settings)
    results, proposed, accepted = [], 0, 0
    for prompt in inputs:
        results.append(fast.generate(prompt, **settings))
        proposed, accepted = proposed + fast.stats.proposed, accepted + fast.stats.accepted
    if fast.draft is not None:
        print_acceptance(accepted, proposed, a.draft_k)
    return results


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
