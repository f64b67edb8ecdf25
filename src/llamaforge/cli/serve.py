"""``llamaforge serve``: the OpenAI-compatible server (llamaforge/serve/)."""

from __future__ import annotations

import argparse
import os
import sys

from llamaforge.cli.main import tokenizer_path


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="Serve a checkpoint with OpenAI's /v1/completions, /v1/chat/completions "
        "and /v1/models (streaming as Server-Sent Events), /health, /metrics (Prometheus), "
        "/tokenize and /detokenize. One scheduler batches every request continuously; the KV "
        "cache holds --max-batch sequences of --max-seq-len positions, requests beyond them "
        "wait, and more than --max-queue waiting are refused with 429. Binds to 127.0.0.1 "
        "unless --host says otherwise. --draft DIR decodes speculatively: a smaller checkpoint "
        "with the same tokenizer proposes --draft-k tokens per request and step, the model "
        "checks them in one forward (greedy text is unchanged; sampling keeps the model's "
        "distribution); the acceptance rate is in /metrics, /health and printed at exit. "
        "Stop it with Ctrl-C.",
    )
    s.add_argument("--ckpt", required=True, help="native checkpoint directory")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    s.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="sequences decoded together = KV-cache slots (default 8)",
    )
    s.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="positions per slot: prompt + completion (default: the model's max_seq_len)",
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
    s.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    s.add_argument("--dtype", help="float32, bfloat16, float16 (default: as stored)")
    s.add_argument(
        "--quantize",
        choices=["int8", "int8-bf16"],
        help="int8 weight-only quantisation of the Linear layers (int8-bf16: fp32 activations "
        "enter the CPU's int8 kernel as bf16, 2-3x faster on the CPU, logits within a few %%)",
    )
    s.add_argument(
        "--draft",
        metavar="DIR",
        help="speculative decoding with this smaller checkpoint (same vocabulary) proposing "
        "tokens for every running request; greedy output is unchanged",
    )
    s.add_argument(
        "--draft-k",
        type=int,
        default=4,
        metavar="N",
        help="tokens the draft proposes per request and step (default 4)",
    )
    s.add_argument(
        "--draft-max-batch",
        type=int,
        metavar="N",
        help="speculate only while at most N requests decode; larger batches decode plainly "
        "(default: always)",
    )
    s.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' (default: $LLAMAFORGE_API_KEY, else none)",
    )
    s.add_argument(
        "--template",
        metavar="NAME|FILE",
        help="chat template: alpaca, llama2 or a .jinja file (default: the checkpoint's)",
    )
    s.add_argument("--model-name", help="the model id clients use (default: the folder's name)")
    s.add_argument(
        "--tokenizer", help="tokenizer.model (or its folder) to use instead of the checkpoint's"
    )
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body; larger ones get 413 (default 1 MiB)",
    )
    s.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    s.set_defaults(func=_serve)


def _serve(a: argparse.Namespace) -> int:
    import socket
    from pathlib import Path

    if a.draft_k < 1:
        raise ValueError(f"--draft-k {a.draft_k}: must be at least 1")
    if a.draft_max_batch is not None and a.draft_max_batch < 1:
        raise ValueError(f"--draft-max-batch {a.draft_max_batch}: must be at least 1")
    for flag in ("max_batch", "prefill_chunk", "max_queue", "max_body_bytes"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(a, flag)}: must be >= 1")
    if a.max_seq_len is not None and a.max_seq_len < 2:
        raise ValueError(f"--max-seq-len {a.max_seq_len}: must be >= 2")
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port {a.port}: must be in 0..65535")

    import uvicorn

    from llamaforge.chat_templates import ChatTemplateError
    from llamaforge.checkpoint.native import load
    from llamaforge.device import resolve_device
    from llamaforge.inference.chat import resolve_template, stop_strings
    from llamaforge.serve.app import Server, create_app
    from llamaforge.serve.engine import Engine, check_draft

    device = resolve_device(a.device or "auto")
    model, tok = load(a.ckpt, device=device, dtype=a.dtype, tokenizer=tokenizer_path(a.tokenizer))
    if tok is None:
        raise ValueError(f"{a.ckpt}: no tokenizer.model in the checkpoint; pass --tokenizer")
    if a.quantize:
        from llamaforge.inference.quantize import quantize_int8

        model = quantize_int8(model, cpu_bf16_compute=a.quantize == "int8-bf16")
    draft = None
    if a.draft is not None:
        draft, _ = load(a.draft, device=device, dtype=model.tok_embeddings.weight.dtype)
        try:
            check_draft(model, draft, a.draft_k)
        except ValueError as e:
            raise ValueError(f"--draft {a.draft}: {e}") from None
        if a.quantize:
            draft = quantize_int8(draft, cpu_bf16_compute=a.quantize == "int8-bf16")
        mine = Path(tokenizer_path(a.tokenizer) or Path(a.ckpt) / "tokenizer.model")
        theirs = Path(a.draft) / "tokenizer.model"
        if theirs.is_file() and mine.is_file() and theirs.read_bytes() != mine.read_bytes():
            print(
                f"warning: --draft {a.draft}: its tokenizer.model differs from the model's; "
                "the output is still the model's, but few drafted tokens will be accepted",
                file=sys.stderr,
            )
    if a.max_seq_len is not None and a.max_seq_len > model.args.max_seq_len:
        raise ValueError(
            f"--max-seq-len {a.max_seq_len}: the model's context is {model.args.max_seq_len}"
        )
    template, template_error, stops = None, None, []
    try:
        template = resolve_template(a.template, tok, a.ckpt)
        stops = stop_strings(template)
    except ChatTemplateError as e:
        if a.template is not None:
            raise
        template_error = str(e)
    engine = Engine(
        model,
        tok,
        max_batch=a.max_batch,
        max_seq_len=a.max_seq_len,
        prefill_chunk=a.prefill_chunk,
        max_queue=a.max_queue,
        draft=draft,
        draft_k=a.draft_k,
        draft_max_batch=a.draft_max_batch,
    )
    name = a.model_name or Path(a.ckpt).resolve().name
    srv = Server(
        engine,
        tok,
        model_name=name,
        template=template,
        template_error=template_error,
        chat_stops=stops,
        max_body_bytes=a.max_body_bytes,
    )
    api_key = a.api_key or os.environ.get("LLAMAFORGE_API_KEY") or None
    app = create_app(srv, api_key=api_key)
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((a.host, a.port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind {a.host}:{a.port}: {e.strerror}") from None
    port = sock.getsockname()[1]
    kv = engine.kv_nbytes / 2**20
    spec = f", draft {Path(a.draft).name} k={a.draft_k}" if draft is not None else ""
    print(
        f"llamaforge serve: {name} on http://{a.host}:{port} ({device}, "
        f"{a.max_batch} slots x {engine.max_seq_len} positions, KV cache {kv:.1f} MiB"
        f"{spec}{', API key required' if api_key else ''})",
        flush=True,
    )
    # Idle keep-alive connections outlive the clients' own expiry (httpx, and so openai:
    # 5 s), so a client never reuses a connection the server is closing at that moment.
    config = uvicorn.Config(
        app, log_level=a.log_level, timeout_graceful_shutdown=5, timeout_keep_alive=30
    )
    stopped: list[bool] = []

    def report() -> None:
        if stopped:
            return
        stopped.append(True)
        if draft is not None:
            st = engine.stats
            print(
                f"speculative decoding: {st.spec_accepted}/{st.spec_drafted} drafted tokens "
                f"accepted ({st.acceptance_rate or 0.0:.1%}), draft_k={a.draft_k}",
                file=sys.stderr,
            )
        print("llamaforge serve: stopped", file=sys.stderr, flush=True)

    class _Server(uvicorn.Server):
        # uvicorn re-raises SIGTERM/SIGINT once it has shut down (the process then ends
        # inside run()), so the closing lines are printed here, after the engine stopped
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            report()

    server = _Server(config)
    server.run(sockets=[sock])
    report()
    return 0
