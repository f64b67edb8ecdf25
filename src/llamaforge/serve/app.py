"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health``, ``GET /metrics`` (Prometheus text), ``POST /tokenize``, ``POST /detokenize``
and ``GET /tokenizer_info`` (the remote-tokenizer endpoints lm-eval's ``local-completions``
uses), and ``GET /``, a chat page for the browser (serve/static/chat.html). Streaming is
Server-Sent Events as OpenAI sends them; errors are OpenAI's JSON ``{"error": {"message",
"type", "param", "code"}}`` with the HTTP status, also mid-stream.

The engine thread talks to the event loop with ``loop.call_soon_threadsafe``; a client that
disconnects (a closed stream, a dropped non-streaming request) cancels its requests, which
frees their cache slots. Bodies are read with a size limit and parsed here (never by
FastAPI), so every bad request is a 400/413 in OpenAI's shape; nothing from a request names
a file. Chat templates are rendered and prompts encoded in worker threads, so a slow render
or a long prompt never stalls the event loop (the other clients). An unexpected exception
in a handler is logged and answered as a 500 for that request alone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llamaforge.chat_templates import ChatTemplate, ChatTemplateError, encode_text
from llamaforge.finetune.lora import LoraError
from llamaforge.inference.generate import check_utf8
from llamaforge.serve.adapters import (
    AdapterConflict,
    AdapterForbidden,
    AdapterInUse,
    AdapterNotFound,
    LoadedAdapter,
    check_name,
)
from llamaforge.serve.engine import (
    SEED_RANGE,
    ContextLengthExceeded,
    Engine,
    EngineStopped,
    Output,
    QueueFull,
    SamplingParams,
    TokenInfo,
)
from llamaforge.serve.grammar import Grammar, GrammarCompiler, GrammarError, GrammarSpec
from llamaforge.serve.metrics import ServeMetrics
from llamaforge.serve.protocol import (
    APIError,
    Body,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    shown,
    validation_error,
)
from llamaforge.serve.tools import (
    AnswerReader,
    ToolChoice,
    ToolError,
    answer_message,
    finish_reason,
)
from llamaforge.tokenizer import Tokenizer

DEFAULT_MAX_BODY = 1 << 20
GRAMMAR_TIMEOUT = 10.0  # seconds a schema, regex or grammar may take to compile
RENDER_THREADS = 4  # chat templates and prompt encoding, off the event loop

log = logging.getLogger(__name__)
T = TypeVar("T")
B = TypeVar("B", bound=Body)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _Auth:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every path but /health and / (the
    chat page, which asks for the key), compared in constant time; anything else is a 401 in
    OpenAI's shape."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path") in ("/health", "/"):
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                given = value
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        err = APIError(401, "invalid or missing API key", code="invalid_api_key")
        await JSONResponse(err.body(), status_code=401)(scope, receive, send)


class Server:
    """What the handlers share: the engine, tokenizer, chat template and limits."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        template: ChatTemplate | None = None,
        template_error: str | None = None,
        chat_stops: list[str] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.template, self.template_error = template, template_error
        self.chat_stops = chat_stops or []
        self.max_body = max_body_bytes
        self.metrics = ServeMetrics(engine.stats)
        self.created = int(time.time())
        self.bos_piece = tokenizer.id_to_piece(tokenizer.bos_id)
        self.eos_piece = tokenizer.id_to_piece(tokenizer.eos_id)
        self._pieces: dict[int, str] = {}
        self._workers = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="llamaforge-render")
        self._grammars: GrammarCompiler | None = None
        self.grammar_timeout = GRAMMAR_TIMEOUT

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread: the event loop serves other clients meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    # -- request bodies ---------------------------------------------------------------

    async def read_json(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise APIError(413, f"request body over {self.max_body} bytes", code="body_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise APIError(
                        413, f"request body over {self.max_body} bytes", code="body_too_large"
                    )
                chunks.append(chunk)
        except ClientDisconnect:  # gone, or timed out by the server (nobody reads this)
            raise APIError(
                400, "the client went away before sending its whole body", code="incomplete_body"
            ) from None
        try:
            return json.loads(b"".join(chunks), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UTF-8, huge ints, NaN
            msg = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise APIError(400, f"the body is not valid JSON: {msg}", code="invalid_json") from None

    async def parse(self, request: Request, cls: type[B]) -> B:
        """The body as ``cls``: typed, in range, and `Body.check`-ed; else a 400."""
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from None
        req.check()
        return req

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base); a 404 for a name
        that is neither the base nor a loaded adapter."""
        if name is None or name == self.model_name:
            return None
        adapters = self.engine.adapters
        if adapters is not None and name in adapters:
            return name
        raise self.model_not_found(name)

    def model_not_found(self, name: str) -> APIError:
        names = [self.model_name]
        if self.engine.adapters is not None:
            names += [a.name for a in self.engine.adapters.adapters()]
        return APIError(
            404,
            f"the model {name!r} does not exist; this server serves {', '.join(map(repr, names))}",
            param="model",
            code="model_not_found",
        )

    def model_card(self, adapter: LoadedAdapter | None = None) -> dict[str, Any]:
        """/v1/models' entry for the base or a LoRA adapter (its ``parent``: the base)."""
        return {
            "id": adapter.name if adapter is not None else self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "llamaforge",
            "root": self.model_name,
            "parent": self.model_name if adapter is not None else None,
            "max_model_len": self.engine.max_seq_len,
        }

    # -- tokens as text ---------------------------------------------------------------

    def piece(self, token: int) -> str:
        """A token as OpenAI's logprobs show one: its text, or ``bytes:\\xNN`` for a byte
        that is not a character on its own."""
        text = self._pieces.get(token)
        if text is None:
            tok = self.tok
            if tok.is_byte(token):
                b = int(tok.id_to_piece(token)[3:5], 16)
                text = chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"
            elif tok.is_control(token):
                text = tok.id_to_piece(token)
            else:
                text = tok.id_to_piece(token).replace("\u2581", " ")
            self._pieces[token] = text
        return text

    def piece_bytes(self, token: int) -> list[int]:
        if self.tok.is_byte(token):
            return [int(self.tok.id_to_piece(token)[3:5], 16)]
        return list(self.piece(token).encode("utf-8"))

    def encode_prompt(self, prompt: str, what: str = "prompt") -> list[int]:
        try:
            check_utf8(prompt, what)
        except ValueError as e:
            raise APIError(400, str(e), param=what) from None
        return self.tok.encode(prompt, bos=True)

    # -- structured output ------------------------------------------------------------

    def _compile(self, spec: GrammarSpec) -> Grammar:
        if self._grammars is None:  # built on first use (a pass over the vocabulary)
            self._grammars = GrammarCompiler(self.tok, self.engine.model.args.vocab_size)
        return self._grammars.compile(spec)

    async def grammar(self, spec: GrammarSpec | None) -> Grammar | None:
        """``spec`` compiled in a worker thread (never the engine's), within
        ``grammar_timeout`` seconds; a 400 naming the field when it cannot be."""
        if spec is None:
            return None
        if self.engine.draft is not None:
            raise APIError(
                400,
                f"{spec.param}: not supported with speculative decoding (this server runs a "
                "draft model)",
                param=spec.param,
            )
        try:
            return await asyncio.wait_for(self.off_loop(self._compile, spec), self.grammar_timeout)
        except GrammarError as e:
            raise APIError(400, str(e), param=spec.param, code="invalid_grammar") from None
        except asyncio.TimeoutError:
            raise APIError(
                400,
                f"{spec.param}: compiling it took over {self.grammar_timeout:g} s",
                param=spec.param,
                code="invalid_grammar",
            ) from None

    # -- running requests -------------------------------------------------------------

    async def run(
        self,
        request: Request,
        prompts: list[list[int]],
        params: list[SamplingParams],
        param: str,
        stream: bool,
        adapter: str | None = None,
    ) -> tuple[asyncio.Queue[tuple[int, Output]], list[int]]:
        """Submit one engine request per prompt (``params[i]`` for ``prompts[i]``, with the
        LoRA ``adapter``, if named); their Outputs arrive on the queue as ``(index, output)``."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()

        def emitter(i: int) -> Callable[[Output], None]:
            return lambda out: loop.call_soon_threadsafe(q.put_nowait, (i, out))

        ids: list[int] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                ids.append(
                    self.engine.submit(prompt, p, emitter(i), stream=stream, adapter=adapter)
                )
        except AdapterNotFound:  # unloaded since check_model
            self.cancel(ids)
            raise self.model_not_found(adapter or "") from None
        except QueueFull as e:
            self.cancel(ids)
            raise APIError(
                429, f"the server is busy: {e}; retry later", headers={"Retry-After": "1"}
            ) from None
        except EngineStopped as e:
            self.cancel(ids)
            raise APIError(503, f"{e}; the server cannot generate", code="engine_stopped") from None
        except ContextLengthExceeded as e:
            self.cancel(ids)
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            self.cancel(ids)
            param = next((f for f in SHAPING_FIELDS if str(e).startswith(f)), None)
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        return q, ids

    def cancel(self, ids: list[int]) -> None:
        for i in ids:
            self.engine.cancel(i)

    async def collect(
        self,
        request: Request,
        q: asyncio.Queue[tuple[int, Output]],
        ids: list[int],
        endpoint: str,
    ) -> list[list[Output]]:
        """Every Output of the requests ``ids``, cancelling them if the client goes away;
        their latency is recorded under ``endpoint``."""
        t0, n = time.monotonic(), len(ids)
        outs: list[list[Output]] = [[] for _ in range(n)]
        done = 0
        try:
            while done < n:
                try:
                    i, out = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                outs[i].append(out)
                if out.error is not None:
                    raise APIError(500, out.error, code="engine_error")
                if out.finished:
                    done += 1
        except BaseException:
            self.cancel(ids)
            raise
        self.metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
        return outs

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generated_tokens.inc(completion_tokens)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # -- logprobs ---------------------------------------------------------------------

    def legacy_logprobs(
        self, infos: list[TokenInfo | None], offset: int, prompt: bool = False
    ) -> dict[str, list[Any]]:
        """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        lp: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for info in infos:
            if info is None:
                continue
            text = self.piece(info.id)
            lp["tokens"].append(text)
            lp["token_logprobs"].append(info.logprob)
            top = None
            if info.logprob is not None:
                top = {self.piece(t): v for t, v in info.top}
            lp["top_logprobs"].append(top)
            lp["text_offset"].append(offset)
            if not self.tok.is_control(info.id):  # <s> and </s> are not in the text
                offset += len(text)
        return lp

    def chat_logprobs(self, infos: list[TokenInfo]) -> list[dict[str, Any]]:
        return [
            {
                "token": self.piece(i.id),
                "logprob": i.logprob,
                "bytes": self.piece_bytes(i.id),
                "top_logprobs": [
                    {"token": self.piece(t), "logprob": v, "bytes": self.piece_bytes(t)}
                    for t, v in i.top
                ],
            }
            for i in infos
        ]


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


def _max_tokens(requested: int | None, prompt_len: int, context: int) -> int:
    return requested if requested is not None else max(context - prompt_len, 0)


def _response_base(
    srv: Server, prefix: str, kind: str, adapter: str | None = None
) -> dict[str, Any]:
    """The fields every response and chunk of one request repeats (``model``: the LoRA
    adapter's name when it ran with one)."""
    rid = f"{prefix}-{uuid.uuid4().hex}"
    model = adapter or srv.model_name
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model}


def _include_usage(req: CompletionRequest | ChatRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _event_stream(
    srv: Server,
    q: asyncio.Queue[tuple[int, Output]],
    ids: list[int],
    *,
    endpoint: str,
    base: dict[str, Any],
    include_usage: bool,
    prompt_tokens: int,
    choices: Callable[[int, Output], list[dict[str, Any]]],
    opening: list[dict[str, Any]] | None = None,
) -> StreamingResponse:
    """The Server-Sent Events of the requests ``ids``: a chunk per choice of ``opening``,
    then per choice of ``choices(index, output)`` for each Output as it arrives, the usage
    chunk when ``include_usage``, and ``[DONE]``. An engine error ends the stream with
    OpenAI's error body; requests still running when it ends early (an error, the client
    gone away) are cancelled."""

    def chunk(choice: dict[str, Any]) -> bytes:
        c: dict[str, Any] = {**base, "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    async def events() -> AsyncIterator[bytes]:
        t0, first, done, gen = time.monotonic(), True, 0, [0] * len(ids)
        try:
            for choice in opening or []:
                yield chunk(choice)
            while done < len(ids):
                i, out = await q.get()
                if out.error is not None:
                    yield _sse(APIError(500, out.error, code="engine_error").body())
                    yield SSE_DONE
                    return
                if first:
                    srv.metrics.ttft.observe(time.monotonic() - t0)
                    first = False
                gen[i] = out.completion_tokens
                if out.finished:
                    done += 1
                for choice in choices(i, out):
                    yield chunk(choice)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": srv.usage(prompt_tokens, sum(gen))})
            yield SSE_DONE
            srv.metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
        except Exception as e:  # a bug mid-stream: this stream alone ends with the error
            log.exception("%s: internal error mid-stream", endpoint)
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
            yield _sse(err.body())
            yield SSE_DONE
        finally:
            if done < len(ids):
                srv.cancel(ids)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ------------------------------------------------------------------------- the handlers

SHAPING_FIELDS = (
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "stop_token_ids",
    "response_format",
)


async def _shaping(
    srv: Server,
    req: CompletionRequest | ChatRequest,
    max_tokens: int,
    grammar: GrammarSpec | None = None,
) -> dict[str, Any]:
    """The request's penalties, bias, token limits and grammar (``grammar``, a tool
    choice's, or the request's own) as SamplingParams fields."""
    if req.min_tokens > max_tokens:
        raise APIError(
            400,
            f"min_tokens {req.min_tokens}: more than max_tokens {max_tokens}",
            param="min_tokens",
        )
    return {
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": req.repetition_penalty or 1.0,
        "logit_bias": req.logit_bias_ids(),
        "min_tokens": req.min_tokens,
        "stop_token_ids": list(req.stop_token_ids or ()),
        "grammar": await srv.grammar(grammar or req.grammar_spec()),
    }


def _choices(srv: Server, params: SamplingParams, n: int, prompts: int) -> list[SamplingParams]:
    """``params`` for each of ``n`` choices of each of ``prompts`` prompts (OpenAI's order:
    a prompt's choices together); choice j of a seeded request is seeded ``seed + j``."""
    if n * prompts > srv.engine.max_queue:
        raise APIError(
            400,
            f"n: {n} choices of {prompts} prompts are {n * prompts} requests; this server "
            f"takes at most {srv.engine.max_queue} at once (--max-queue)",
            param="n",
        )
    out = []
    for _ in range(prompts):
        for j in range(n):
            seed = params.seed
            if seed is not None and j:
                seed = (seed + j - SEED_RANGE[0]) % (SEED_RANGE[1] - SEED_RANGE[0] + 1)
                seed += SEED_RANGE[0]
            out.append(replace(params, seed=seed))
    return out


def _completion_prompts(srv: Server, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """The prompts as token ids and as text (token prompts decoded), each checked (in a
    worker thread: encoding a long prompt takes a while)."""
    p = req.prompt
    n = 1 if isinstance(p, str) or all(isinstance(x, int) for x in p) else len(p)
    if n > srv.engine.max_queue:
        raise APIError(
            400,
            f"prompt: {n} prompts in one request; this server takes at most "
            f"{srv.engine.max_queue} (--max-queue)",
            param="prompt",
        )
    if isinstance(p, str):
        texts: list[str | None] = [p]
        prompts = [srv.encode_prompt(p)]
    elif not p:
        raise APIError(400, "prompt: an empty list", param="prompt")
    elif all(isinstance(x, str) for x in p):
        texts = list(p)  # type: ignore[arg-type]
        prompts = [srv.encode_prompt(x, f"prompt.{i}") for i, x in enumerate(p)]  # type: ignore[arg-type]
    elif all(isinstance(x, int) for x in p):
        texts, prompts = [None], [list(p)]  # type: ignore[list-item]
    else:
        texts, prompts = [None] * len(p), [list(x) for x in p]  # type: ignore[arg-type,misc]
    vocab = srv.engine.model.args.vocab_size
    for ids in prompts:
        if not ids:
            raise APIError(400, "prompt: an empty prompt", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt: token id {bad} is outside 0..{vocab - 1}", param="prompt")
    prompt_texts = [t if t is not None else srv.tok.decode(ids) for t, ids in zip(texts, prompts)]
    return prompts, prompt_texts


class _Completion:
    """One /v1/completions request's choices, whole or as streamed chunks."""

    def __init__(self, srv: Server, req: CompletionRequest, prompt_texts: list[str]) -> None:
        self.srv, self.req, self.prompt_texts = srv, req, prompt_texts
        self.started = [False] * len(prompt_texts)  # streaming: a first chunk was sent

    def logprobs(self, i: int, outs: list[Output], echo_first: bool) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        infos: list[TokenInfo | None] = []
        offset = 0 if self.req.echo else len(self.prompt_texts[i])
        if echo_first:
            infos += outs[0].prompt_logprobs or [] if outs else []
        for o in outs:
            infos += o.tokens
        return self.srv.legacy_logprobs(infos, offset)

    def choice(self, i: int, outs: list[Output], echo: bool) -> dict[str, Any]:
        text = "".join(o.text for o in outs)
        return {
            "index": i,
            "text": self.prompt_texts[i] + text if echo else text,
            "logprobs": self.logprobs(i, outs, echo),
            "finish_reason": outs[-1].finish_reason,
        }

    def chunk_choices(self, i: int, out: Output) -> list[dict[str, Any]]:
        echo = self.req.echo and not self.started[i]
        self.started[i] = True
        return [self.choice(i, [out], echo)]


async def completions(srv: Server, request: Request) -> Response:
    req = await srv.parse(request, CompletionRequest)
    adapter = srv.check_model(req.model)
    prompts, prompt_texts = await srv.off_loop(_completion_prompts, srv, req)
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 needs echo=true", param="max_tokens")
    longest = max(len(ids) for ids in prompts)
    max_tokens = _max_tokens(req.max_tokens, longest, srv.engine.max_seq_len)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stops(),
        seed=req.seed,
        logprobs=req.logprobs,
        prompt_logprobs=req.echo and req.logprobs is not None,
        **await _shaping(srv, req, max_tokens),
    )
    n = req.n or 1
    every = _choices(srv, params, n, len(prompts))
    n_prompt = sum(len(x) for x in prompts)
    prompts = [p for p in prompts for _ in range(n)]
    q, ids = await srv.run(request, prompts, every, "max_tokens", req.stream, adapter)
    base = _response_base(srv, "cmpl", "text_completion", adapter)
    completion = _Completion(srv, req, [t for t in prompt_texts for _ in range(n)])
    if req.stream:
        return _event_stream(
            srv,
            q,
            ids,
            endpoint="completions",
            base=base,
            include_usage=_include_usage(req),
            prompt_tokens=n_prompt,
            choices=completion.chunk_choices,
        )
    all_outs = await srv.collect(request, q, ids, "completions")
    choices = [completion.choice(i, outs, req.echo) for i, outs in enumerate(all_outs)]
    usage = srv.usage(n_prompt, sum(outs[-1].completion_tokens for outs in all_outs))
    return JSONResponse({**base, "choices": choices, "usage": usage})


def render_chat(
    srv: Server,
    messages: list[Any],
    generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """``messages`` (and ``tools``) rendered with the chat template and encoded (in a worker
    thread: see `Server.off_loop`); a conversation the template refuses, or tools for a
    template that does not render them, is a 400."""
    if srv.template is None:
        raise APIError(
            400,
            f"this model has no chat template ({srv.template_error}); use /v1/completions, or "
            "start the server with --template",
            param="messages",
            code="no_chat_template",
        )
    if tools is not None and not srv.template.takes_tools:
        raise APIError(
            400,
            f"tools: the chat template {srv.template.name} does not render tools; start the "
            "server with --template hermes or a template that reads tools",
            param="tools",
            code="tools_not_supported",
        )
    msgs = []
    for i, m in enumerate(messages):
        msg = m.plain()
        for what, text in (("content", msg["content"]), ("", json.dumps(msg, ensure_ascii=False))):
            param = f"messages.{i}" + (f".{what}" if what else "")
            try:
                check_utf8(text, param)
            except ValueError as e:
                raise APIError(400, str(e), param=param) from None
        msgs.append(msg)
    try:
        check_utf8(json.dumps(tools, ensure_ascii=False), "tools")
    except ValueError as e:
        raise APIError(400, str(e), param="tools") from None
    try:
        rendered = srv.template.render(msgs, add_generation_prompt=generation_prompt, tools=tools)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    return encode_text(srv.tok, rendered, srv.template.bos_token, srv.template.eos_token)


async def _chat_params(
    srv: Server, req: ChatRequest, prompt: list[int], grammar: GrammarSpec | None = None
) -> SamplingParams:
    context = srv.engine.max_seq_len
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else None
    if requested is None:
        requested = req.max_tokens
    if requested is None and len(prompt) >= context:
        raise APIError(
            400,
            f"the messages are {len(prompt)} tokens: no room left in the context of {context}",
            param="messages",
            code="context_length_exceeded",
        )
    k = req.top_logprobs or 0
    max_tokens = _max_tokens(requested, len(prompt), context)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=[*req.stops(), *srv.chat_stops],
        seed=req.seed,
        logprobs=k if req.logprobs else None,
        **await _shaping(srv, req, max_tokens, grammar),
    )


def _chat_delta(
    delta: dict[str, Any],
    lp: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One streamed chat choice."""
    return {
        "index": index,
        "delta": delta,
        "logprobs": {"content": lp} if lp is not None else None,
        "finish_reason": finish,
    }


def _tool_choice(req: ChatRequest) -> ToolChoice | None:
    """The request's tools and tool_choice (see serve.tools); a 400 when they cannot go
    together."""
    try:
        return ToolChoice.of(req.tool_dicts(), req.tool_choice_value())
    except ToolError as e:
        param = str(e).split(":", 1)[0]
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def _tool_spec(req: ChatRequest, tools: ToolChoice) -> GrammarSpec | None:
    """The grammar of a required or named tool_choice (in a worker thread: it builds a
    grammar from the functions' schemas); a 400 naming what cannot be."""
    try:
        spec = tools.spec()
    except ToolError as e:
        raise APIError(400, str(e), param="tools", code="invalid_grammar") from None
    if spec is not None and req.grammar_spec() is not None:
        raise APIError(
            400,
            f"tool_choice: {shown(req.tool_choice_value())} constrains the answer to a tool "
            "call; it cannot be combined with response_format, guided_regex or guided_grammar",
            param="tool_choice",
        )
    return spec


def _tool_chunks(
    srv: Server, req: ChatRequest, reader: AnswerReader, index: int, out: Output
) -> list[dict[str, Any]]:
    """The streamed choices of ``out`` for choice ``index``, an answer read for tool calls:
    its content and calls as `AnswerReader` lets them go (the logprobs with the first)."""
    lp = srv.chat_logprobs(out.tokens) if req.logprobs else None
    deltas = reader.deltas(out.text, out.finished)
    if lp and not deltas:
        deltas = [{"content": ""}]
    chosen = [_chat_delta(d, lp if k == 0 else None, None, index) for k, d in enumerate(deltas)]
    if out.finished:
        chosen.append(_chat_delta({}, None, reader.finish_reason(out.finish_reason), index))
    return chosen


async def chat_completions(srv: Server, request: Request) -> Response:
    req = await srv.parse(request, ChatRequest)
    adapter = srv.check_model(req.model)
    tools = _tool_choice(req)
    rendered = tools.rendered if tools is not None else None
    prompt = await srv.off_loop(render_chat, srv, req.messages, True, rendered)
    spec = await srv.off_loop(_tool_spec, req, tools) if tools is not None else None
    params = await _chat_params(srv, req, prompt, spec)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    n = req.n or 1
    every = _choices(srv, params, n, 1)
    q, ids = await srv.run(request, [prompt] * n, every, param, req.stream, adapter)
    chat_base = _response_base(srv, "chatcmpl", "chat.completion", adapter)
    base = {**chat_base, "system_fingerprint": None}
    names = tools.names if tools is not None and tools.parse else None
    if req.stream:
        readers = [AnswerReader(names) for _ in range(n)] if names is not None else None

        def chunk_choices(i: int, out: Output) -> list[dict[str, Any]]:
            if readers is not None:
                return _tool_chunks(srv, req, readers[i], i, out)
            lp = srv.chat_logprobs(out.tokens) if req.logprobs else None
            chosen = [_chat_delta({"content": out.text}, lp, None, i)] if out.text or lp else []
            if out.finished:
                chosen.append(_chat_delta({}, None, out.finish_reason, i))
            return chosen

        return _event_stream(
            srv,
            q,
            ids,
            endpoint="chat",
            base={**base, "object": "chat.completion.chunk"},
            include_usage=_include_usage(req),
            prompt_tokens=len(prompt),
            choices=chunk_choices,
            opening=[_chat_delta({"role": "assistant", "content": ""}, index=i) for i in range(n)],
        )
    all_outs = await srv.collect(request, q, ids, "chat")
    choices = [_chat_choice(srv, req, i, outs, names) for i, outs in enumerate(all_outs)]
    usage = srv.usage(len(prompt), sum(outs[-1].completion_tokens for outs in all_outs))
    return JSONResponse({**base, "choices": choices, "usage": usage})


def _chat_choice(
    srv: Server,
    req: ChatRequest,
    index: int,
    outs: list[Output],
    names: frozenset[str] | None = None,
) -> dict[str, Any]:
    """One choice of a whole answer; with ``names`` (tools in use), read for tool calls."""
    infos = [t for o in outs for t in o.tokens]
    text, finish = "".join(o.text for o in outs), outs[-1].finish_reason
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if names is not None:
        message.update(answer_message(text, names))
        finish = finish_reason(finish, len(message.get("tool_calls", ())))
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": srv.chat_logprobs(infos)} if req.logprobs else None,
        "finish_reason": finish,
    }


def _tokenize_text(srv: Server, req: TokenizeRequest) -> list[int]:
    text = req.prompt or ""
    try:
        check_utf8(text, "prompt")
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from None
    # the bos/eos pieces in text become their ids, as chat templates are encoded
    tokens = encode_text(srv.tok, text, srv.bos_piece, srv.eos_piece)
    return [srv.tok.bos_id, *tokens] if req.add_special_tokens else tokens


async def tokenize(srv: Server, request: Request) -> Response:
    req = await srv.parse(request, TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", param="prompt")
    if req.messages is not None:
        tokens = await srv.off_loop(render_chat, srv, req.messages, req.add_generation_prompt)
    else:
        tokens = await srv.off_loop(_tokenize_text, srv, req)
    return JSONResponse(
        {"tokens": tokens, "count": len(tokens), "max_model_len": srv.engine.max_seq_len}
    )


async def detokenize(srv: Server, request: Request) -> Response:
    req = await srv.parse(request, DetokenizeRequest)
    vocab = srv.tok.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens: id {bad} is outside 0..{vocab - 1}", param="tokens")
    return JSONResponse({"prompt": await srv.off_loop(srv.tok.decode, req.tokens)})


async def _adapter_body(srv: Server, request: Request, fields: tuple[str, ...]) -> list[str]:
    """The string ``fields`` of a load/unload body (vLLM's names), or a 400 naming one;
    a 404 when the server serves no adapters."""
    if srv.engine.adapters is None:
        raise APIError(
            404,
            "this server serves no LoRA adapters: start it with --lora NAME=DIR or --lora-dir DIR",
            code="lora_disabled",
        )
    body = await srv.read_json(request)
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    values = []
    for f in fields:
        v = body.get(f)
        if not isinstance(v, str) or not v:
            raise APIError(400, f"{f}: expected a non-empty string, got {shown(v)}", param=f)
        values.append(v)
    return values


async def load_lora_adapter(srv: Server, request: Request) -> Response:
    """``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``: read and check the adapter
    in a worker thread, then serve it under its name (a path only under --lora-dir)."""
    name, path = await _adapter_body(srv, request, ("lora_name", "lora_path"))
    registry = srv.engine.adapters
    assert registry is not None
    try:
        check_name(name)
    except ValueError as e:
        raise APIError(400, f"lora_name: {e}", param="lora_name") from None
    if name == srv.model_name:
        raise APIError(409, f"lora_name {name!r} is the base model's name", param="lora_name")
    try:
        adapter = await srv.off_loop(registry.load, name, path)
    except AdapterForbidden as e:
        raise APIError(403, str(e), param="lora_path", code="lora_path_forbidden") from None
    except AdapterNotFound as e:
        raise APIError(404, str(e), param="lora_path", code="lora_path_not_found") from None
    except AdapterConflict as e:
        raise APIError(409, str(e), param="lora_name", code="lora_conflict") from None
    except (LoraError, ValueError, OSError) as e:  # not an adapter for this base, or unreadable
        raise APIError(400, str(e), param="lora_path", code="invalid_lora") from None
    return JSONResponse(srv.model_card(adapter))


async def unload_lora_adapter(srv: Server, request: Request) -> Response:
    """``POST /v1/unload_lora_adapter {"lora_name"}``: stop serving the adapter; a 409
    while requests run with it."""
    (name,) = await _adapter_body(srv, request, ("lora_name",))
    registry = srv.engine.adapters
    assert registry is not None
    try:
        registry.unload(name)
    except AdapterInUse as e:
        raise APIError(409, str(e), param="lora_name", code="lora_in_use") from None
    except AdapterNotFound as e:
        raise APIError(404, str(e), param="lora_name", code="model_not_found") from None
    return JSONResponse({"id": name, "object": "model", "deleted": True})


async def _api_error(_request: Request, e: APIError) -> Response:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(_request: Request, e: StarletteHTTPException) -> Response:
    err = APIError(e.status_code, str(e.detail))
    return JSONResponse(err.body(), status_code=e.status_code)


async def _internal_error(_request: Request, e: Exception) -> Response:
    err = APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
    return JSONResponse(err.body(), status_code=500)


def _counted(
    srv: Server, endpoint: str, fn: Callable[[Server, Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """``fn`` as a route, each request counted by endpoint and status."""

    async def handler(request: Request) -> Response:
        status = 500
        try:
            response = await fn(srv, request)
            status = response.status_code
            return response
        except APIError as e:
            status = e.status
            raise
        except Exception as e:  # a bug: this request alone gets a 500, the log the traceback
            log.exception("%s: internal error", endpoint)
            msg = f"internal error: {type(e).__name__}: {e}"
            raise APIError(500, msg, code="internal_error") from None
        finally:
            srv.metrics.requests.labels(endpoint, str(status)).inc()

    return handler


def _add_info_routes(app: FastAPI, srv: Server, manage_engine: bool) -> None:
    """The GET endpoints: /v1/models, /health, /metrics and /tokenizer_info."""

    @app.get("/v1/models")
    async def models() -> Response:
        adapters = srv.engine.adapters.adapters() if srv.engine.adapters is not None else []
        cards = [srv.model_card()] + [srv.model_card(a) for a in adapters]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/v1/models/{name}")
    async def model(name: str) -> Response:
        if srv.check_model(name) is None:
            return JSONResponse(srv.model_card())
        found = [a for a in srv.engine.adapters.adapters() if a.name == name]  # type: ignore[union-attr]
        if not found:
            raise srv.model_not_found(name)
        return JSONResponse(srv.model_card(found[0]))

    @app.get("/health")
    async def health() -> Response:
        problem = srv.engine.health()
        if problem is not None and (manage_engine or srv.engine.alive):
            return JSONResponse({"status": "unavailable", "error": problem}, status_code=503)
        s = srv.engine.stats
        running = s.running + s.prefilling
        body: dict[str, Any] = {"status": "ok", "waiting": s.waiting, "running": running}
        if s.draft_k:
            body["speculative"] = {
                "draft_k": s.draft_k,
                "draft_tokens": s.spec_drafted,
                "accepted_tokens": s.spec_accepted,
                "acceptance_rate": s.acceptance_rate,
            }
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(srv.metrics.render(), media_type=srv.metrics.content_type)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        return JSONResponse(
            {
                "bos_token": srv.bos_piece,
                "eos_token": srv.eos_piece,
                "pad_token": None,
                "model_max_length": srv.engine.max_seq_len,
                "chat_template": srv.template.source if srv.template is not None else None,
            }
        )


def _add_page_route(app: FastAPI) -> None:
    """``GET /``: the chat page (serve/static/chat.html). Its Content-Security-Policy lets
    its own inline script and style run (by their hashes) and nothing else: the page loads
    nothing from elsewhere and talks to this server alone."""
    page = (resources.files("llamaforge.serve") / "static" / "chat.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        digests = (base64.b64encode(hashlib.sha256(b.encode()).digest()) for b in blocks)
        return " ".join(f"'sha256-{d.decode()}'" for d in digests)

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    body = page.encode()

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)


def create_app(srv: Server, *, api_key: str | None = None, manage_engine: bool = True) -> Any:
    """The ASGI app; ``manage_engine`` starts the engine's thread with the app and stops it
    at shutdown."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            srv.engine.start()
        try:
            yield
        finally:
            if manage_engine:
                srv.engine.stop()
            srv.close()

    app = FastAPI(title="llamaforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    for path, endpoint, fn in (
        ("/v1/completions", "completions", completions),
        ("/v1/chat/completions", "chat", chat_completions),
        ("/tokenize", "tokenize", tokenize),
        ("/detokenize", "detokenize", detokenize),
        ("/v1/load_lora_adapter", "load_lora_adapter", load_lora_adapter),
        ("/v1/unload_lora_adapter", "unload_lora_adapter", unload_lora_adapter),
    ):
        app.add_api_route(path, _counted(srv, endpoint, fn), methods=["POST"])
    _add_info_routes(app, srv, manage_engine)
    _add_page_route(app)
    return _Auth(app, api_key) if api_key else app
