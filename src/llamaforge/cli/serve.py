"""``llamaforge serve``: the OpenAI-compatible server (llamaforge/serve/)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

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


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="Serve a checkpoint with OpenAI's /v1/completions, /v1/chat/completions "
        "and /v1/models (streaming as Server-Sent Events), /health, /metrics (Prometheus), "
        "/tokenize and /detokenize. One scheduler batches every request continuously: up to "
        "--max-batch requests run at once, their prompts prefilled together in chunks of "
        "--prefill-chunk tokens per step between decode steps; the KV cache is a pool of "
        "blocks of --block-size positions (--kv-cache-gb or --num-blocks; default: room for "
        "--max-batch requests of --max-seq-len positions) taken as tokens arrive, prompts "
        "that start alike share their cached blocks (--no-prefix-cache turns that off), and "
        "when the pool runs out the newest request is preempted and resumed later. Requests "
        "beyond --max-batch wait, and more than --max-queue waiting are refused with 429. "
        "Binds to 127.0.0.1 "
        "unless --host says otherwise. --draft DIR decodes speculatively: a smaller checkpoint "
        "with the same tokenizer proposes --draft-k tokens per request and step, the model "
        "checks them in one forward (greedy text is unchanged; sampling keeps the model's "
        "distribution); the acceptance rate is in /metrics, /health and printed at exit. "
        "Stop it with Ctrl-C.",
    )
    add_load_args(s)
    s.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor parallelism: split the model over N processes (run under torchrun "
        "--nproc_per_node N; rank 0 serves HTTP, every rank runs each forward; --kv-cache-gb "
        "is per process)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    _add_scheduler_args(s)
    add_speed_args(s, per_request=True)
    s.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (CUDA graphs on a GPU) at static shapes, the rows "
        "padded to 1, 2, 4, ... --max-batch; every shape is compiled before serving starts "
        "(the time is printed; minutes on a CPU); prefill stays eager; works with --quantize "
        "and --draft (the draft's steps are compiled too)",
    )
    s.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' (default: $LLAMAFORGE_API_KEY, else none)",
    )
    s.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="chat template: alpaca, llama2, hermes or a .jinja file (default: the checkpoint's)",
    )
    s.add_argument("--model-name", help="the model id clients use (default: the folder's name)")
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body; larger ones get 413 (default 1 MiB)",
    )
    s.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    _add_lora_args(s)
    _add_limit_args(s)
    s.set_defaults(func=_serve)


def _add_lora_args(s: argparse.ArgumentParser) -> None:
    """LoRA adapters served by name over the base (llamaforge/serve/adapters.py)."""
    s.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the PEFT adapter DIR (as 'llamaforge finetune' writes it, for this base: "
        "its recorded weights sha256 is checked) as the model NAME; repeatable. Requests for "
        "different adapters and the base run in the same batches",
    )
    s.add_argument(
        "--lora-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="allow POST /v1/load_lora_adapter to load adapters from under DIR (symlinks "
        "followed; a relative lora_path is taken under the first DIR); repeatable. Without "
        "it adapters load only at start (--lora). /v1/unload_lora_adapter refuses (409) an "
        "adapter that requests are running with",
    )


def _add_limit_args(s: argparse.ArgumentParser) -> None:
    """What one client may hold: timeouts and connections (llamaforge/serve/net.py)."""
    seconds = {"type": float, "metavar": "S"}
    s.add_argument(
        "--header-timeout",
        **seconds,
        help="a request's line and headers must arrive within S seconds (default 10)",
    )
    s.add_argument(
        "--body-timeout",
        **seconds,
        help="a request's body must arrive within S seconds of its headers (default 30)",
    )
    s.add_argument(
        "--keep-alive",
        **seconds,
        help="an idle kept-alive connection is closed after S seconds (default 30)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections; one more gets a 503 (default: 1024, or what the open-file "
        "limit allows)",
    )
    s.add_argument(
        "--stall-timeout",
        **seconds,
        help="/health answers 503 when the engine has made no progress for S seconds while "
        "requests wait (default 60)",
    )


def _add_scheduler_args(s: argparse.ArgumentParser) -> None:
    """The batch, the context, the KV pool and its blocks, the prefill chunk, the queue, and
    when to speculate."""
    s.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests running (prefilling or decoding) at once (default 8)",
    )
    s.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="positions per request: prompt + completion (default: the model's max_seq_len)",
    )
    pool = s.add_mutually_exclusive_group()
    pool.add_argument(
        "--kv-cache-gb",
        type=float,
        metavar="G",
        help="size the KV pool to G GiB (the draft's cache included); default: room for "
        "--max-batch requests of --max-seq-len positions",
    )
    pool.add_argument("--num-blocks", type=int, metavar="N", help="size the KV pool to N blocks")
    s.add_argument(
        "--block-size",
        type=int,
        default=16,
        help="positions per KV block: the unit of allocation and prefix sharing (default 16)",
    )
    s.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="do not share the cached blocks of prompts that start alike",
    )
    s.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens prefilled per scheduler step, across requests (default 512)",
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for a slot before new ones get 429 (default 256)",
    )
    s.add_argument(
        "--draft-max-batch",
        type=int,
        metavar="N",
        help="speculate only while at most N requests decode; larger batches decode plainly "
        "(default: always)",
    )


def _check_args(a: argparse.Namespace) -> None:
    check_draft_k(a)
    if a.tp < 1:
        raise ValueError(f"--tp {a.tp}: must be >= 1")
    if a.tp != 1 and a.quantize:
        raise ValueError(
            f"--tp {a.tp} with --quantize {a.quantize}: int8 weights do not split over "
            "processes; serve them on one process, or split the model without --quantize"
        )
    if a.tp != 1 and a.compile:
        raise ValueError(
            f"--tp {a.tp} with --compile: the compiled decode step runs on one process only"
        )
    if a.compile and (a.lora or a.lora_dir):
        raise ValueError(
            "--compile with --lora/--lora-dir: the rows' adapters change the decode step "
            "each step; serve adapters without --compile"
        )
    if a.tp != 1 and (a.lora or a.lora_dir):
        raise ValueError(
            f"--tp {a.tp} with --lora/--lora-dir: LoRA adapters are served on one process "
            "only (the other ranks would not hold them)"
        )
    if a.draft_max_batch is not None and a.draft_max_batch < 1:
        raise ValueError(f"--draft-max-batch {a.draft_max_batch}: must be at least 1")
    for flag in ("max_batch", "prefill_chunk", "max_queue", "max_body_bytes"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(a, flag)}: must be >= 1")
    if a.block_size < 1:
        raise ValueError(f"--block-size {a.block_size}: must be >= 1")
    if a.num_blocks is not None and a.num_blocks < 1:
        raise ValueError(f"--num-blocks {a.num_blocks}: must be >= 1")
    if a.kv_cache_gb is not None and not 0 < a.kv_cache_gb < float("inf"):
        raise ValueError(f"--kv-cache-gb {a.kv_cache_gb}: must be a number of GiB > 0")
    if a.max_seq_len is not None and a.max_seq_len < 2:
        raise ValueError(f"--max-seq-len {a.max_seq_len}: must be >= 2")
    for flag in ("header_timeout", "body_timeout", "keep_alive", "stall_timeout"):
        value = getattr(a, flag)
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be > 0 seconds")
    if a.max_connections is not None and a.max_connections < 1:
        raise ValueError(f"--max-connections {a.max_connections}: must be >= 1")
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port {a.port}: must be in 0..65535")
    for d in a.lora_dir:
        if not os.path.isdir(d):
            raise ValueError(f"--lora-dir {d!r}: not a directory")


def _adapters(a: argparse.Namespace, model: Any, model_name: str) -> Any:
    """The adapter registry over ``model`` with every --lora loaded (each checked against
    the base), or None when neither --lora nor --lora-dir is given."""
    from llamaforge.serve.adapters import AdapterRegistry, parse_lora_arg

    if not (a.lora or a.lora_dir):
        return None
    given = [parse_lora_arg(v) for v in a.lora]
    registry = AdapterRegistry(
        model, base_dir=a.ckpt, allowed_dirs=a.lora_dir, reserved=[model_name]
    )
    for name, path in given:
        if not os.path.isdir(path):
            raise ValueError(f"--lora {name}={path}: not a directory")
        registry.load(name, path, confined=False)
    return registry


def _load(a: argparse.Namespace) -> tuple[Loaded, Any]:
    """The model and, with --draft, its draft (checked against it), quantised as asked;
    with --tp, this rank's share of the model (the draft, whole, on rank 0 only)."""
    from llamaforge.serve.engine import check_draft

    loaded = load_checkpoint(a, tp=a.tp)
    draft = None
    if loaded.rank == 0:
        draft = load_draft(a, loaded, check=lambda model, d: check_draft(model, d, a.draft_k))
    quantize(a.quantize, loaded.model, draft)
    context = loaded.model.args.max_seq_len
    if a.max_seq_len is not None and a.max_seq_len > context:
        raise ValueError(f"--max-seq-len {a.max_seq_len}: the model's context is {context}")
    return loaded, draft


def _server(a: argparse.Namespace, loaded: Loaded, draft: Any) -> Any:
    """The `Server` over a new engine; the chat template is optional unless --template."""
    from pathlib import Path

    from llamaforge.chat_templates import ChatTemplateError
    from llamaforge.inference.chat import resolve_template, stop_strings
    from llamaforge.serve.app import Server
    from llamaforge.serve.engine import Engine

    template, template_error, stops = None, None, []
    try:
        template = resolve_template(a.template, loaded.tok, a.ckpt)
        stops = stop_strings(template)
    except ChatTemplateError as e:
        if a.template is not None:
            raise
        template_error = str(e)
    model_name = a.model_name or Path(a.ckpt).resolve().name
    engine = Engine(
        loaded.model,
        loaded.tok,
        max_batch=a.max_batch,
        max_seq_len=a.max_seq_len,
        prefill_chunk=a.prefill_chunk,
        max_queue=a.max_queue,
        draft=draft,
        draft_k=a.draft_k,
        draft_max_batch=a.draft_max_batch,
        num_blocks=_num_blocks(a, loaded.model, draft),
        block_size=a.block_size,
        prefix_cache=not a.no_prefix_cache,
        adapters=_adapters(a, loaded.model, model_name),
        compile=a.compile,
        **({"stall_timeout": a.stall_timeout} if a.stall_timeout is not None else {}),
    )
    return Server(
        engine,
        loaded.tok,
        model_name=model_name,
        template=template,
        template_error=template_error,
        chat_stops=stops,
        max_body_bytes=a.max_body_bytes,
    )


def _num_blocks(a: argparse.Namespace, model: Any, draft: Any) -> int | None:
    """The KV pool's blocks: --num-blocks, or as many as --kv-cache-gb holds (the model's
    and the draft's keys and values per block), or None (the engine's default)."""
    from llamaforge.serve.kv_cache import block_nbytes
    from llamaforge.serve.tp import kv_args

    if a.kv_cache_gb is None:
        return a.num_blocks
    per_block = sum(  # under --tp, this rank's heads
        block_nbytes(kv_args(m), a.block_size, m.tok_embeddings.weight.dtype)
        for m in (model, draft)
        if m is not None
    )
    n = int(a.kv_cache_gb * 2**30 // per_block)
    if n < 1:
        raise ValueError(
            f"--kv-cache-gb {a.kv_cache_gb}: less than one block of {a.block_size} positions "
            f"({per_block} bytes)"
        )
    return n


def _bind(host: str, port: int) -> Any:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind {host}:{port}: {e.strerror}") from None
    return sock


def _serve(a: argparse.Namespace) -> int:
    from pathlib import Path

    from llamaforge.serve.app import create_app
    from llamaforge.serve.net import Limits, plan_connections, uvicorn_config

    _check_args(a)
    max_connections, backlog = plan_connections(a.max_connections)
    given = {
        k: getattr(a, k) for k in ("header_timeout", "body_timeout", "keep_alive")
        if getattr(a, k) is not None
    }  # fmt: skip
    limits = Limits(**given, max_connections=max_connections)
    if a.tp != 1:  # rank 0 stops its server as on Ctrl-C if torchrun dies
        from llamaforge.parallel.process import die_with_parent

        die_with_parent(signal.SIGTERM)
    loaded, draft = _load(a)
    group = None
    if a.tp != 1:
        from llamaforge.serve.tp import control_group

        group = control_group()
        if loaded.rank != 0:
            return _work(loaded.model, group)
    srv = _server(a, loaded, draft)
    if a.compile:
        print("llamaforge serve: compiling the decode step...", file=sys.stderr, flush=True)
        seconds = srv.engine.warm_up()
        print(f"llamaforge serve: compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    api_key = a.api_key or os.environ.get("LLAMAFORGE_API_KEY") or None
    app = create_app(srv, api_key=api_key)
    sock = _bind(a.host, a.port)
    engine = srv.engine
    runner = None
    if group is not None:
        from llamaforge.serve.tp import BroadcastRunner

        engine.runner = runner = BroadcastRunner(engine.runner, group)
    kv = engine.kv_nbytes / 2**20
    spec = f", draft {Path(a.draft).name} k={a.draft_k}" if draft is not None else ""
    if engine.adapters is not None:
        names = [x.name for x in engine.adapters.adapters()]
        spec += f", LoRA adapters {names}" + (f" (--lora-dir {a.lora_dir})" if a.lora_dir else "")
    print(
        f"llamaforge serve: {srv.model_name} on http://{a.host}:{sock.getsockname()[1]} "
        f"({loaded.device}, {a.max_batch} rows of up to {engine.max_seq_len} positions, KV "
        f"pool {engine.blocks.num_blocks} blocks x {a.block_size} positions = {kv:.1f} MiB"
        f"{', no prefix cache' if a.no_prefix_cache else ''}"
        f"{spec}{', API key required' if api_key else ''}"
        f"{f', split over {a.tp} processes (KV pool per process)' if a.tp != 1 else ''}, at most "
        f"{limits.max_connections} connections)",
        flush=True,
    )
    stopped: list[bool] = []

    def report() -> None:
        if stopped:
            return
        stopped.append(True)
        if runner is not None:
            runner.close()  # the workers' loop ends
        if draft is not None:
            st = engine.stats
            print_acceptance(st.spec_accepted, st.spec_drafted, a.draft_k)
        print("llamaforge serve: stopped", file=sys.stderr, flush=True)

    _run_uvicorn(uvicorn_config(app, limits, backlog, a.log_level), sock, report)
    return 0


def _work(model: Any, group: Any) -> int:
    """A worker rank of --tp: run rank 0's forwards until it stops (it prints nothing).
    torchrun passes Ctrl-C and SIGTERM to every rank: a worker ignores them and ends with
    rank 0, which finishes its requests first (torchrun kills what is left after 30 s)."""
    from llamaforge.parallel.process import die_with_parent
    from llamaforge.serve.tp import serve_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)  # it ignores SIGTERM; nothing of its own to save
    return serve_worker(model, group)


def _run_uvicorn(config: Any, sock: Any, report: Callable[[], None]) -> None:
    """Serve on ``sock`` until a signal; ``report`` once the server has shut down."""
    import socket

    import uvicorn

    class _Server(uvicorn.Server):
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down (the process then ends
        # inside run()), so the closing lines are printed here, after the engine stopped
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            report()

    _Server(config).run(sockets=[sock])
    report()
