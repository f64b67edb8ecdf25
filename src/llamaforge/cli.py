"""The ``llamaforge`` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__


def _cmd_quickstart(a: argparse.Namespace) -> int:
    from .quickstart import main as quickstart_main

    return quickstart_main(a.overrides, a.out)


def _cmd_pretrain(a: argparse.Namespace) -> int:
    from .pretrain import main as pretrain_main

    extra = [f"{k}={v}" for k, v in (("resume", a.resume), ("out", a.out)) if v is not None]
    return pretrain_main(([a.config] if a.config else []) + a.overrides + extra)


def _cmd_eval(a: argparse.Namespace) -> int:
    from .eval.cli import main as eval_main

    return eval_main(a.args)


def _cmd_plot(a: argparse.Namespace) -> int:
    from .metrics import plot_run

    print(plot_run(a.run_dir, a.out))
    return 0


def _pretrain_epilog() -> str:
    from .config import describe
    from .pretrain import PretrainConfig

    keys = "\n".join("  " + line for line in describe(PretrainConfig()))
    return (
        "Many processes: torchrun --nproc_per_node N -m llamaforge pretrain CONFIG "
        "[KEY=VALUE ...] (FSDP2 by default; parallel=ddp for DDP).\n\nSettings and "
        f"defaults (TOML tables for the dotted ones; model.* null = the preset's value):\n{keys}"
    )


class _PretrainHelp(argparse.Action):
    """``-h`` for pretrain: the settings list needs the config class, imported only here
    (so other commands do not pay for importing the training stack)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show this help and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.epilog = _pretrain_epilog()
        parser.print_help()
        parser.exit()


def _model_args_for(a: argparse.Namespace):
    from .checkpoint import read_params
    from .presets import get_preset

    if a.ckpt:
        args, _ = read_params(a.ckpt)
        return args, str(a.ckpt)
    return get_preset(a.preset), f"preset {a.preset}"


def _cmd_info(a: argparse.Namespace) -> int:
    from .flops import (
        activation_memory,
        count_params,
        flops_per_token,
        human_bytes,
        human_count,
        training_memory,
    )

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
            for mode in ("none", "selective", "full")
        },
    }
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
    return 0


def _cmd_init(a: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save
    from .config import apply_overrides
    from .model import build_model
    from .presets import get_preset
    from .tokenizer import Tokenizer

    tok = Tokenizer(a.tokenizer)
    args = apply_overrides(get_preset(a.preset, vocab_size=tok.vocab_size), a.overrides)
    torch.manual_seed(a.seed)
    model = build_model(args)
    out = save(model, tok, a.out, dtype=a.dtype, overwrite=a.force)
    print(f"wrote {out}: {model.num_params():,} parameters, random init (seed {a.seed})")
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load
    from .generate import generate_completions

    prompts = list(a.prompt or [])
    if a.prompt_file:
        prompts.append(Path(a.prompt_file).read_text(encoding="utf-8"))
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load(a.ckpt, device=device, dtype=a.dtype, tokenizer=a.tokenizer)
    if tok is None:
        raise ValueError(f"{a.ckpt}: no tokenizer.model in the checkpoint; pass --tokenizer")

    def stream(row: int, delta: str) -> None:
        if len(prompts) == 1:
            sys.stdout.write(delta)
            sys.stdout.flush()

    if len(prompts) == 1 and a.echo:
        sys.stdout.write(prompts[0])
    results = generate_completions(
        model,
        tok,
        prompts,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        stop=a.stop or (),
        seed=a.seed,
        truncate=a.truncate,
        on_text=stream,
    )
    if len(prompts) == 1:
        sys.stdout.write("\n")
    else:
        for p, r in zip(prompts, results):
            print(f"=== {p!r} ({r.finish_reason})\n{(p if a.echo else '') + r.text}")
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(
        a.src,
        a.dst,
        source=a.source,
        target=a.target,
        dtype=a.dtype,
        shards=a.shards,
        force=a.force,
        tokenizer=a.tokenizer,
        max_seq_len=a.max_seq_len,
        progress=not a.quiet,
    )
    print(f"wrote {out} ({a.target})")
    return 0


def _cmd_data_prepare(a: argparse.Namespace) -> int:
    from .data.prepare import load_data_config, prepare

    cfg = load_data_config(a.config, a.overrides)
    print(f"preparing {len(cfg.sources)} source(s) into {cfg.output}")
    results = prepare(cfg, progress=not a.quiet)
    failed = [r["name"] for r in results if not r.get("complete")]
    if failed:
        print(f"failed sources: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_data_stats(a: argparse.Namespace) -> int:
    from .data.report import format_table1, table1

    rows = table1(a.data_dir, int(a.tokens))
    print(json.dumps(rows, indent=2) if a.json else format_table1(rows, int(a.tokens)))
    return 0


def _cmd_data_show(a: argparse.Namespace) -> int:
    from .data.report import first_documents

    docs = first_documents(a.data_dir, a.source, a.n, a.tokenizer, a.split)
    for i, doc in enumerate(docs):
        text = doc if a.max_chars <= 0 or len(doc) <= a.max_chars else doc[: a.max_chars] + " …"
        print(f"=== {a.source} document {i} ({len(doc)} characters)\n{text}")
    return 0


def _cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer

    tok = train_tokenizer(
        [Path(p) for p in a.inputs], a.out, vocab_size=a.vocab_size, max_sentences=a.max_sentences
    )
    print(f"wrote {a.out}: {tok.vocab_size} pieces (BPE, digits split, byte fallback)")
    return 0


def _cmd_tokenizer_encode(a: argparse.Namespace) -> int:
    from .tokenizer import Tokenizer

    tok = Tokenizer(a.model)
    text = a.text if a.text is not None else sys.stdin.read()
    ids = tok.encode(text, bos=a.bos, eos=a.eos)
    if a.pieces:
        print(" ".join(f"{i}:{tok.id_to_piece(i)}" for i in ids))
    else:
        print(" ".join(map(str, ids)))
    return 0


def _cmd_tokenizer_decode(a: argparse.Namespace) -> int:
    from .tokenizer import Tokenizer

    tok = Tokenizer(a.model)
    raw = a.ids if a.ids else sys.stdin.read().split()
    try:
        ids = [int(x) for x in raw]
    except ValueError as e:
        raise ValueError(f"token ids must be integers ({e})") from None
    bad = [i for i in ids if i >= tok.vocab_size]
    if bad:
        raise ValueError(f"ids {bad[:5]} are outside the vocabulary (size {tok.vocab_size})")
    print(tok.decode(ids))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamaforge",
        description="LLaMA (Touvron et al. 2023) in PyTorch: tokenizer, model, generation.",
    )
    p.add_argument("--version", action="version", version=f"llamaforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "quickstart",
        help="corpus → tokenizer → train a small LLaMA → checkpoint → samples, on this machine",
        description="Build a corpus from the Python standard library, train a tokenizer and a "
        "small LLaMA on it, report validation loss against the unigram baseline, save a "
        "checkpoint and print samples. Settings are key=value overrides of QuickstartConfig "
        "(e.g. steps=200 dim=96 device=cpu).",
    )
    q.add_argument("--out", help="run directory (default runs/quickstart)")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    q.set_defaults(func=_cmd_quickstart)

    pt = sub.add_parser(
        "pretrain",
        help="train a LLaMA from scratch on prepared data (one process, or many via torchrun)",
        description="Pretrain with the paper's recipe (AdamW 0.9/0.95, wd 0.1, clip 1.0, "
        "warmup + cosine to 10 %) on shards from `llamaforge data prepare`. Writes "
        "OUT/metrics.jsonl, OUT/checkpoints/step-N (resumable; resume=auto by default), "
        "OUT/model (native checkpoint), OUT/loss.png and OUT/summary.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    pt.add_argument("-h", "--help", action=_PretrainHelp)
    pt.add_argument("config", nargs="?", help="a TOML file (configs/pretrain/*.toml)")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    pt.add_argument(
        "--resume", help="auto (newest complete checkpoint; the default), none, or a step-N dir"
    )
    pt.add_argument("--out", help="run directory (same as out=...)")
    pt.set_defaults(func=_cmd_pretrain)

    ev = sub.add_parser(
        "eval",
        help="the paper's benchmarks on a checkpoint (llamaforge eval --help)",
        add_help=False,
    )
    ev.add_argument("args", nargs=argparse.REMAINDER)
    ev.set_defaults(func=_cmd_eval)

    pl = sub.add_parser("plot", help="loss curve (train and validation vs tokens) of a run")
    pl.add_argument("run_dir", help="a run directory with metrics.jsonl")
    pl.add_argument("--out", help="PNG path (default RUN_DIR/loss.png)")
    pl.set_defaults(func=_cmd_plot)

    i = sub.add_parser("info", help="parameters, FLOPs per token and training memory of a model")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="1M, 15M, 110M, 1B, 7B, 13B, 33B or 65B")
    src.add_argument("--ckpt", help="a checkpoint directory (reads its params.json)")
    i.add_argument(
        "--seq-len", type=int, help="context for the attention FLOPs (default max_seq_len)"
    )
    i.add_argument("--vocab-size", type=int, default=32000, help="when params.json says -1")
    i.add_argument(
        "--micro-batch", type=int, default=1, help="sequences per step for the activations"
    )
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_cmd_info)

    n = sub.add_parser("init", help="write a randomly initialised checkpoint")
    n.add_argument("--preset", required=True, help="model size (see `llamaforge info`)")
    n.add_argument("--tokenizer", required=True, help="SentencePiece model; sets vocab_size")
    n.add_argument("--out", required=True, help="checkpoint directory to create")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    n.add_argument("--force", action="store_true", help="replace an existing --out")
    n.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ModelArgs overrides")
    n.set_defaults(func=_cmd_init)

    g = sub.add_parser("generate", help="generate text from a checkpoint, streamed to stdout")
    g.add_argument("--ckpt", required=True, help="native checkpoint directory")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--prompt-file", help="read one prompt from this file")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--echo", action="store_true", help="print the prompt too")
    g.add_argument(
        "--truncate",
        action="store_true",
        help="keep the last tokens of a prompt longer than the context",
    )
    g.add_argument("--tokenizer", help="tokenizer.model to use instead of the checkpoint's")
    g.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    g.add_argument("--dtype", help="float32, bfloat16, float16 (default: as stored)")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser(
        "convert",
        help="convert checkpoints between Meta, Hugging Face, GGUF, llama2.c and native",
        description="Convert SRC (layout --from) to DST (layout --to). Every path goes "
        "through the native format; DST is written atomically and an existing DST is "
        "refused unless --force.",
    )
    c.add_argument(
        "--from", dest="source", required=True, choices=("native", "meta", "hf", "llama2c")
    )
    c.add_argument("--to", dest="target", required=True, choices=("native", "hf", "meta", "gguf"))
    c.add_argument("src", help="source directory (llama2c: the .bin file)")
    c.add_argument("dst", help="destination directory (gguf: the .gguf file)")
    c.add_argument("--dtype", help="float32/bfloat16/float16; for gguf: f32, f16 (default), q8_0")
    c.add_argument("--shards", type=int, default=1, help="model-parallel files for --to meta")
    c.add_argument("--tokenizer", help="tokenizer file if not in SRC (llama2c: tokenizer.bin)")
    c.add_argument(
        "--max-seq-len",
        type=int,
        help="context length to record (Meta checkpoints do not store it: 2048)",
    )
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)

    d = sub.add_parser("data", help="clean, tokenize and inspect training data")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dp = dsub.add_parser(
        "prepare",
        help="sources → cleaned text → token shards (see configs/data/)",
        description="Read every [[sources]] entry of CONFIG (TOML), clean it with its kind's "
        "filters, tokenize and write memory-mappable shards and meta.json per source. "
        "Re-running skips finished sources.",
    )
    dp.add_argument("config", help="data config (TOML)")
    dp.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    dp.add_argument("--quiet", action="store_true", help="no progress bars")
    dp.set_defaults(func=_cmd_data_prepare)
    ds = dsub.add_parser("stats", help="the paper's Table 1 for a run of N tokens")
    ds.add_argument("data_dir", help="prepared data folder (the config's output)")
    ds.add_argument("--tokens", type=float, required=True, help="tokens in the run, e.g. 1.4e12")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(func=_cmd_data_stats)
    dw = dsub.add_parser("show", help="print the first cleaned documents of a source")
    dw.add_argument("data_dir", help="prepared data folder")
    dw.add_argument("--source", required=True)
    dw.add_argument("-n", type=int, default=3)
    dw.add_argument("--split", default="train", choices=("train", "val"))
    dw.add_argument("--tokenizer", help="default: the one named in meta.json")
    dw.add_argument("--max-chars", type=int, default=2000, help="cut each document (0: no cut)")
    dw.set_defaults(func=_cmd_data_show)

    t = sub.add_parser("tokenizer", help="train and inspect SentencePiece tokenizers")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tt = tsub.add_parser("train", help="train a BPE tokenizer the paper's way")
    tt.add_argument("inputs", nargs="+", help="UTF-8 text files")
    tt.add_argument("--out", required=True, help="path of the .model file to write")
    tt.add_argument("--vocab-size", type=int, default=32000)
    tt.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        help="sample at most this many lines (default 2M)",
    )
    tt.set_defaults(func=_cmd_tokenizer_train)
    te = tsub.add_parser("encode", help="text → ids (reads stdin without TEXT)")
    te.add_argument("--model", required=True, help="tokenizer.model")
    te.add_argument("text", nargs="?")
    te.add_argument("--bos", action=argparse.BooleanOptionalAction, default=False)
    te.add_argument("--eos", action=argparse.BooleanOptionalAction, default=False)
    te.add_argument("--pieces", action="store_true", help="show id:piece pairs")
    te.set_defaults(func=_cmd_tokenizer_encode)
    td = tsub.add_parser("decode", help="ids → text (reads stdin without IDS)")
    td.add_argument("--model", required=True, help="tokenizer.model")
    td.add_argument("ids", nargs="*")
    td.set_defaults(func=_cmd_tokenizer_decode)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # its own parser: argparse cannot forward leading options
        from .eval.cli import main as eval_main

        return eval_main(argv[1:])
    parser = build_parser()
    a, unknown = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after --flags (argparse stops a positional list at them)
    if unknown and hasattr(a, "overrides") and all("=" in u and u[0] != "-" for u in unknown):
        a.overrides += unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("llamaforge: interrupted", file=sys.stderr)
        return 130
    except (
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ) as e:
        print(f"llamaforge {a.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if not isinstance(code, int):
            raise
        print(f"llamaforge {a.command}: error: {e}", file=sys.stderr)
        return code
