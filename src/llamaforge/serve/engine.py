"""The serving engine: one scheduler thread owns the model and batches continuously.

Memory is paged (`serve.kv_cache`): a pool of fixed-size KV blocks, a block table per
request that grows as its tokens arrive and is released when it ends, fails, is cancelled
or preempted, and prefix caching (a request whose prompt starts with the blocks of an
earlier one takes them and prefills only the rest). `serve.scheduler` decides each step's
work; `serve.runner.ModelRunner` runs a batch's forward over the block tables. Each step
  1. takes new requests and cancellations from the HTTP side,
  2. reserves every decoding request a slot for its next token, preempting the newest
     requests when the pool is short (they recompute their tokens later and resume),
  3. prefills, in one forward, chunks of several requests' prompts within a per-step token
     budget (a long prompt takes several steps; running requests keep decoding meanwhile),
     admitting waiting requests while the budget, ``max_batch`` and the pool allow,
  4. decodes every running request by one token in one batched forward,
  5. retires finished requests and releases their blocks.
`Engine.submit` refuses a request beyond ``max_queue`` waiting (`QueueFull`), and one that
alone could not fit in the pool (`ContextLengthExceeded`).

Every request has its own sampling parameters and its own ``torch.Generator`` (seeded from
``seed``). Text is followed as `generate.generate_completions` follows it (the same
`inference.detokenizer.TextFollower`: incremental, stop strings matched on the tail; eos),
so at temperature 0 the text equals
``llamaforge generate``'s, with or without a prefix-cache hit or a preemption; streamed
deltas hold back an incomplete UTF-8 sequence and any tail that may become a stop string,
so the deltas add up to the final text exactly. A preempted request keeps its text, its
streaming state and its generator: its recompute ends with the logits of its pending
token, from which it samples as its decode step would have.

Speculative decoding (``draft=``: a smaller model with the same vocabulary): the draft has a
`PagedKVCache` of its own over the same block tables, filled by the same prefill forwards.
Each decode step then speculates for every running row: the draft proposes ``draft_k``
tokens per row (k batched one-token steps), the model scores each row's pending token and
its k proposals in one batched forward of k+1 positions per row, and each row keeps its
longest accepted prefix plus one token of the model's own (`generate.verify_drafted`:
greedy agreement, or the rejection rule of speculative sampling at temperature > 0). The
kept tokens go through the same text, stop, max_tokens and eos checks one at a time, the
first finishing one ends the request, and a row's length simply becomes its accepted
length: the positions written past it (each row reserves ``draft_k`` lookahead slots) are
overwritten later and hidden by the mask meanwhile. With more than ``draft_max_batch`` rows
running, a step decodes plainly and the draft only reads the new tokens into its cache, so
that speculation can resume at any step. Greedy text is the same as without a draft;
sampled text has the same distribution, but a seed gives other tokens than without a draft
(the draft consumes random numbers too).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llamaforge.inference.detokenizer import TextFollower
from llamaforge.inference.generate import check_sampling, verify_drafted
from llamaforge.inference.sampler import RowSampling, SampledToken, logprobs_of, sample_batch
from llamaforge.model import Transformer
from llamaforge.serve.adapters import AdapterLease, AdapterNotFound, AdapterRegistry
from llamaforge.serve.grammar import Grammar
from llamaforge.serve.kv_cache import BlockManager, PagedKVCache, blocks_for
from llamaforge.serve.logits import LogitsState, RowLogits, Shaping
from llamaforge.serve.runner import CompiledRunner, ModelRunner, make_runner
from llamaforge.serve.scheduler import Scheduler, Seq, StepPlan
from llamaforge.serve.tp import kv_args
from llamaforge.tokenizer import Tokenizer

__all__ = [
    "ContextLengthExceeded",
    "Engine",
    "EngineStats",
    "EngineStopped",
    "Output",
    "QueueFull",
    "SamplingParams",
    "TokenInfo",
]

log = logging.getLogger(__name__)

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's ``max_queue``."""


class EngineStopped(RuntimeError):
    """The engine's thread has ended: nothing more is admitted."""


class ContextLengthExceeded(ValueError):
    """The prompt and ``max_tokens`` together exceed the engine's context."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k likeliest
    prompt_logprobs: bool = False  # the prompt's token logprobs too (echo)
    presence_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's, in [-2, 2]
    repetition_penalty: float = 1.0  # HF's / CTRL's, > 0 (1: none)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> [-100, 100]
    min_tokens: int = 0  # eos and stop_token_ids masked until this many tokens
    stop_token_ids: Sequence[int] = ()  # tokens that end the request (not in its text)
    grammar: Grammar | None = None  # structured output (`serve.grammar`)

    def shaping(self) -> Shaping:
        """The logits settings (`serve.logits`)."""
        return Shaping(
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
            self.logit_bias,
            self.min_tokens,
            tuple(self.stop_token_ids),
            self.grammar,
        )

    def check(self) -> None:
        """Raise ValueError naming the first setting the engine cannot take."""
        self._check_shaping()
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens {self.max_tokens!r}: must be an integer >= 0")
        check_sampling(self.temperature, self.top_p)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs {self.logprobs}: must be in 0..20")
        if self.seed is not None and not (
            isinstance(self.seed, int) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            raise ValueError(f"seed {self.seed!r}: must be an integer in {SEED_RANGE[0]}..2**64-1")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop {self.stop!r}: must be a sequence of non-empty strings")

    def _check_shaping(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and -2.0 <= v <= 2.0):
                raise ValueError(f"{name} {v!r}: must be a number in [-2, 2]")
        r = self.repetition_penalty
        if not (isinstance(r, (int, float)) and 0.0 < r <= 2.0):
            raise ValueError(f"repetition_penalty {r!r}: must be a number in (0, 2] (1: none)")
        for t, b in self.logit_bias.items():
            if not (isinstance(b, (int, float)) and -100.0 <= b <= 100.0):
                raise ValueError(f"logit_bias {b!r} for token {t}: must be in [-100, 100]")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens {self.min_tokens!r}: must be an integer >= 0")

    def check_tokens(self, vocab: int) -> None:
        """Raise ValueError naming a token id (``logit_bias``, ``stop_token_ids``) outside
        the vocabulary of ``vocab`` tokens."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)), None)
            if bad is not None:
                raise ValueError(
                    f"{name}: token id {bad!r} is outside the vocabulary (0..{vocab - 1})"
                )


@dataclass
class TokenInfo:
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """What the engine reports about a request: new text and tokens since the last Output,
    and, in the last one, ``finish_reason`` ("stop" or "length") or ``error``."""

    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[TokenInfo] | None = None  # first Output only, when asked for
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(kw_only=True, eq=False)  # identity: lists find this very request
class _Request(Seq):
    params: SamplingParams
    emit: Callable[[Output], None]
    stream: bool = True
    arrival: float = field(default_factory=time.monotonic)
    n_generated: int = 0  # every sampled token, eos included
    pending: int | None = None  # the sampled token not yet fed to the model
    finish: str | None = None
    prompt_lp: list[TokenInfo] | None = None
    new_tokens: list[TokenInfo] = field(default_factory=list)
    generator: torch.Generator | None = None
    sampling: RowSampling | None = None  # the row's settings for the batched sampler
    follower: TextFollower | None = None  # the text, its stop strings and what was streamed
    logits: RowLogits | None = None  # penalties, bias, masks (None: none)
    first_token_at: float | None = None
    lease: AdapterLease | None = None  # the LoRA adapter it runs with, held until it ends

    @property
    def adapter(self) -> int:
        """The row's LoRA slot for the runner (-1: the base)."""
        return self.lease.slot if self.lease is not None else -1


class EngineStats:
    """Counters the scheduler keeps (read by /metrics and /health; plain attributes written
    by one thread)."""

    def __init__(self) -> None:
        self.waiting = 0
        self.running = 0
        self.prefilling = 0
        self.kv_used = 0  # token positions with keys and values in the cache
        self.kv_total = 0  # positions the pool holds
        self.kv_blocks_used = 0
        self.kv_blocks_total = 0
        self.kv_blocks_cached = 0  # blocks keyed by their tokens (prefix caching)
        self.kv_bytes_held = 0  # bytes of the blocks in use (the draft's cache included)
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found there (not prefilled)
        self.preemptions = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.draft_k = 0  # speculative decoding: tokens drafted per row and step (0: off)
        self.spec_drafted = 0  # tokens the draft proposed
        self.spec_accepted = 0  # of those, tokens the model accepted
        self._window: deque[tuple[float, int]] = deque()

    @property
    def acceptance_rate(self) -> float | None:
        return self.spec_accepted / self.spec_drafted if self.spec_drafted else None

    @property
    def prefix_hit_rate(self) -> float:
        """Fraction of the prompt tokens looked up that the prefix cache held."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes of KV cache held per token in use (0 when none is)."""
        return self.kv_bytes_held / self.kv_used if self.kv_used else 0.0

    def record_tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generated_tokens += n
        self._window.append((now, n))
        while self._window and self._window[0][0] < now - 10.0:
            self._window.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._window) if t >= now - 10.0]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span


def check_draft(model: Transformer, draft: Transformer, draft_k: int) -> None:
    """Raise ValueError when ``draft`` cannot draft for ``model``: another vocabulary, another
    device, or ``draft_k`` < 1."""
    if draft.args.vocab_size != model.args.vocab_size:
        raise ValueError(
            f"the draft's vocab_size {draft.args.vocab_size} differs from the model's "
            f"{model.args.vocab_size}: a draft must share the model's tokenizer"
        )
    if draft.tok_embeddings.weight.device != model.tok_embeddings.weight.device:
        raise ValueError(
            f"the draft is on {draft.tok_embeddings.weight.device}, the model on "
            f"{model.tok_embeddings.weight.device}: they must share a device"
        )
    if draft_k < 1:
        raise ValueError(f"draft_k {draft_k}: must be at least 1")


class Engine:
    """Continuous batching over one model. `submit` and `cancel` are thread-safe; the model
    runs only in the engine's thread (`start`/`stop`).

    The KV pool holds ``num_blocks`` blocks of ``block_size`` positions (default: room for
    ``max_batch`` requests of ``max_seq_len`` positions, as a cache of fixed slots would
    hold); ``prefix_cache`` shares the blocks of common prompt prefixes between requests.
    ``compile`` runs the decode forwards (the draft's too) through `serve.runner.CompiledRunner`
    (static shapes per batch bucket; CUDA graphs on a GPU); `warm_up` compiles them all.

    Whatever one request raises (while admitted, prefilled or decoded) fails that request
    alone: it is answered with an error Output and its blocks are released. An exception in
    a batched forward fails the requests in that batch. The thread itself goes on until
    `stop`; `health` says when it has ended or has made no progress for ``stall_timeout``
    seconds while requests wait."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        max_queue: int = 256,
        draft: Transformer | None = None,
        draft_k: int = 4,
        draft_max_batch: int | None = None,
        stall_timeout: float = 60.0,
        num_blocks: int | None = None,
        block_size: int = 16,
        prefix_cache: bool = True,
        adapters: AdapterRegistry | None = None,
        compile: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch}: must be at least 1")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk {prefill_chunk}: must be at least 1")
        model_len = model.args.max_seq_len
        self.max_seq_len = min(max_seq_len or model_len, model_len)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len {self.max_seq_len}: must be at least 2")
        if block_size < 1:
            raise ValueError(f"block_size {block_size}: must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk, self.max_queue = max_batch, prefill_chunk, max_queue
        # the activations' dtype and device: the embedding's (an int8-quantised model keeps
        # it, while its Linear layers may hold int8 weights)
        weight = model.tok_embeddings.weight
        self.device = weight.device
        self.draft, self.draft_k = draft, draft_k if draft is not None else 0
        if draft_max_batch is not None and draft_max_batch < 1:
            raise ValueError(f"draft_max_batch {draft_max_batch}: must be at least 1")
        # speculate while at most this many rows decode (larger batches are compute-bound)
        self.draft_max_batch = draft_max_batch or max_batch
        if draft is not None:
            check_draft(model, draft, draft_k)
        if num_blocks is None:  # a slot cache's budget: max_batch full contexts
            num_blocks = max_batch * blocks_for(self.max_seq_len + self.draft_k, block_size)
        self.blocks = BlockManager(num_blocks, block_size, prefix_cache=prefix_cache)
        self.scheduler = Scheduler(
            self.blocks,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            draft_k=self.draft_k,
            draft_max_batch=self.draft_max_batch,
        )
        self.cache = PagedKVCache(kv_args(model), num_blocks, block_size, weight.dtype, self.device)
        if adapters is not None and adapters.model is not model:
            raise ValueError("the adapter registry is for another model than the engine's")
        if adapters is not None and compile:
            raise ValueError(
                "compile with LoRA adapters: the rows' adapters change the decode step's shapes "
                "each step; serve adapters without compiling"
            )
        widest = blocks_for(self.max_seq_len + self.draft_k, block_size)
        sizes = {"compile": compile, "max_batch": max_batch, "max_blocks": widest}
        self.runner = make_runner(model, self.cache, **sizes)
        self.adapters = adapters
        if adapters is not None:
            self.runner.lora = adapters.batch
        self.draft_runner: ModelRunner | None = None
        if draft is not None:
            dtype = draft.tok_embeddings.weight.dtype
            cache = PagedKVCache(draft.args, num_blocks, block_size, dtype, self.device)
            self.draft_runner = make_runner(draft, cache, **sizes)
        self.logits_state = LogitsState(model.args.vocab_size, self.device, tokenizer.eos_id)
        self.stats = EngineStats()
        self.stats.kv_total = num_blocks * block_size
        self.stats.kv_blocks_total = num_blocks
        self.stats.draft_k = self.draft_k
        self._ids = itertools.count(1)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queued = 0  # submitted, not yet admitted (read by submit from other threads)
        self._closed = False  # the thread has ended: submit refuses (under _lock)
        self._lock = threading.Lock()
        self.stall_timeout = stall_timeout
        self._beat = time.monotonic()  # when the thread last made progress or went idle
        self._busy = False  # the thread is in a step (not waiting for work)

    # -- the HTTP side ----------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        emit: Callable[[Output], None],
        stream: bool = True,
        adapter: str | None = None,
    ) -> int:
        """Queue a request; ``emit`` is called from the engine thread with each Output (as
        tokens come when ``stream``, else once at the end); ``adapter``: the name of a LoRA
        adapter of ``adapters`` to run it with (None: the base). Raises ValueError for a
        request that cannot run (ContextLengthExceeded: too long for the context or the KV
        pool), AdapterNotFound for an adapter not loaded, QueueFull when too many wait,
        EngineStopped once the engine's thread has ended."""
        params.check()
        self._check_shaping(params)
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.args.vocab_size
        bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: "
                f"together more than the context of {self.max_seq_len} tokens"
            )
        need = self.scheduler.needed(len(prompt), params.max_tokens)
        if need > self.blocks.num_blocks:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: "
                f"together they need {need} KV blocks of {self.blocks.block_size} positions, "
                f"more than the pool's {self.blocks.num_blocks}"
            )
        req = _Request(
            id=next(self._ids),
            prompt=list(prompt),
            params=params,
            emit=emit,
            stream=stream,
            match_prefix=not params.prompt_logprobs,  # those need every prompt position
        )
        if adapter is not None:
            if self.adapters is None:
                raise AdapterNotFound(f"no adapter named {adapter!r}: this engine serves none")
            req.lease = self.adapters.lease(adapter)
            req.table.extra = req.lease.key  # its KV blocks are shared with its own kind only
        try:
            with self._lock:  # the thread closes under the lock: nothing queued is unanswered
                if self._closed:
                    raise EngineStopped("the engine has stopped")
                if self._queued >= self.max_queue:
                    raise QueueFull(f"{self._queued} requests are waiting (limit {self.max_queue})")
                self._queued += 1
                self._inbox.put(("add", req))
        except Exception:
            self._release(req)
            raise
        self._wake.set()
        return req.id

    def _check_shaping(self, params: SamplingParams) -> None:
        """Raise ValueError for logits settings the engine cannot take: token ids outside
        the vocabulary, or any of them with a draft (its verification does not apply them)."""
        params.check_tokens(self.model.args.vocab_size)
        if self.draft is None or not params.shaping().active:
            return
        s, names = params.shaping(), []
        if s.grammar is not None:
            names.append("response_format")
        names += [n for n in ("presence_penalty", "frequency_penalty") if getattr(s, n)]
        if s.repetition_penalty != 1.0:
            names.append("repetition_penalty")
        if s.logit_bias:
            names.append("logit_bias")
        if s.min_tokens:
            names.append("min_tokens")
        raise ValueError(
            f"{', '.join(names)}: not supported with speculative decoding (this server runs "
            "a draft model)"
        )

    def cancel(self, request_id: int) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._beat = time.monotonic()
            self._thread = threading.Thread(
                target=self._loop, name="llamaforge-engine", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def warm_up(self) -> float:
        """With ``compile``: compile every decode shape now (the model's one-token steps and,
        with a draft, its k + 1-token verifications while speculating; the draft's steps),
        so that no request waits for a compilation; the seconds it took (0 without)."""
        seconds, k, rows = 0.0, self.draft_k, range(1, self.max_batch + 1)
        if isinstance(self.runner, CompiledRunner):  # speculating up to draft_max_batch rows
            spec = self.draft_max_batch if k else 0
            steps = [(n, k + 1 if n <= spec else 1) for n in rows]
            seconds += self.runner.warm_up(steps)
        if isinstance(self.draft_runner, CompiledRunner):
            seconds += self.draft_runner.warm_up((n, 1) for n in rows)
        return seconds

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the KV pools (the draft's included)."""
        return sum(c.nbytes for c in self._caches())

    def _caches(self) -> list[PagedKVCache]:
        runners = [self.runner] + ([self.draft_runner] if self.draft_runner else [])
        return [r.cache for r in runners]

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> str | None:
        """None while the engine serves; else what is wrong: its thread has ended, or it has
        made no progress for ``stall_timeout`` seconds with requests to run (wedged)."""
        if not self.alive:
            return "the engine thread has stopped"
        stalled = time.monotonic() - self._beat
        if (self._busy or self._queued) and stalled > self.stall_timeout:
            s = self.scheduler
            return (
                f"the engine has made no progress for {stalled:.1f} s ({self._queued} requests "
                f"waiting, {len(s.running) + len(s.prefilling)} running)"
            )
        return None

    # -- the engine thread ------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stop.is_set():
                    try:
                        self._turn()
                    except Exception:  # failing the requests failed too: keep the thread
                        log.exception("engine: could not fail the requests in flight")
                        time.sleep(0.1)
        finally:
            self._close()

    def _turn(self) -> None:
        """Take new work, then one step (or a short wait when there is none). An exception
        outside one request's own work fails the requests in flight."""
        self._drain()
        if not self.scheduler.busy:
            self._busy, self._beat = False, time.monotonic()
            self._update_stats()  # cancellations may have emptied the batch
            self._wake.wait(0.5)
            self._wake.clear()
            return
        if not self._busy:  # work after a wait: the stall clock starts now
            self._busy, self._beat = True, time.monotonic()
        try:
            if self.step():
                self._beat = time.monotonic()
        except Exception as e:
            log.exception("engine: a step failed; failing the requests in flight")
            self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _close(self) -> None:
        """The thread's last act: refuse new requests, answer every one it holds."""
        with self._lock:
            self._closed = True
        self._drain()
        why = "the server is shutting down" if self._stop.is_set() else "the engine stopped"
        self._fail_all(why, waiting=True)

    def _drain(self) -> None:
        cancelled: set[int] = set()
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self.scheduler.add(item)
            else:
                cancelled.add(item)
        if cancelled:
            s = self.scheduler
            for req in [*s.waiting, *s.prefilling, *s.running]:
                if req.id in cancelled:
                    self._drop(req)

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        s = self.scheduler
        victims = s.prefilling + s.running + (list(s.waiting) if waiting else [])
        for req in victims:
            self._drop(req)
        for req in victims:
            self._send(req, Output("", [], error=message))
        self._update_stats()

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler step (the engine thread calls it; tests may too, with no thread);
        whether it made progress (admitted, prefilled or decoded anything)."""
        plan = self.scheduler.schedule()
        for req in plan.preempted:
            self._preempted(req)  # type: ignore[arg-type]
        for req in plan.admitted:
            self._admitted(req)  # type: ignore[arg-type]
        if plan.prefill:
            self._prefill(plan)
        rows: list[_Request] = [r for r in plan.decode if r in self.scheduler.running]  # type: ignore[misc]
        if rows:
            if plan.speculate:
                self._speculate(rows)
            else:
                self._decode(rows)
        self.stats.steps += 1
        self._update_stats()
        return bool(plan.admitted or plan.prefill or plan.decode)

    def _update_stats(self) -> None:
        s, sched, bm = self.stats, self.scheduler, self.blocks
        s.waiting, s.running, s.prefilling = (
            len(sched.waiting),
            len(sched.running),
            len(sched.prefilling),
        )
        s.kv_used = sum(r.cached for r in sched.running) + sum(r.cached for r in sched.prefilling)
        s.kv_blocks_used, s.kv_blocks_cached = bm.used, bm.cached
        s.kv_bytes_held = bm.used * sum(c.bytes_per_block for c in self._caches())
        s.prefix_queries, s.prefix_hits = bm.queries, bm.hits
        s.preemptions = sched.preemptions

    def _admitted(self, req: _Request) -> None:
        """A request left the queue: the first time, what it needs before its prefill."""
        if req.admitted > 1:
            return
        self._dequeued()
        try:
            self._open(req)
        except Exception as e:
            self._fail(req, e)
            return
        self.stats.prompt_tokens += len(req.prompt)

    def _preempted(self, req: _Request) -> None:
        """``req`` lost its blocks: its prompt's logprobs, if still being collected, start
        over with its recompute (which then takes no cached prefix)."""
        if req.n_generated == 0 and req.prompt_lp is not None:
            req.prompt_lp = [TokenInfo(req.prompt[0])]
        else:
            req.match_prefix = True
        log.debug("engine: request %d preempted (%d tokens to recompute)", req.id, req.target)

    def _open(self, req: _Request) -> None:
        """What a request needs before its prefill: its text follower and generator."""
        req.follower = TextFollower(self.tokenizer, req.prompt, req.params.stop)
        if req.params.seed is not None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(req.params.seed)
        elif req.params.temperature > 0:
            req.generator = torch.Generator(device=self.device)
            req.generator.seed()
        p = req.params
        req.sampling = RowSampling(p.temperature, p.top_p, None, req.generator, p.logprobs)
        req.logits = self.logits_state.open(p.shaping(), req.prompt)
        if p.prompt_logprobs:
            req.prompt_lp = [TokenInfo(req.prompt[0])]

    def _prefill(self, plan: StepPlan) -> None:
        """Every planned chunk in one forward (each of the draft's too); a request whose
        prompt is in starts decoding."""
        chunks = [(r, a, b) for r, a, b in plan.prefill if r in self.scheduler.prefilling]
        if not chunks:
            return
        rows: list[_Request] = [c[0] for c in chunks]  # type: ignore[misc]
        tokens = [r.tokens()[a:b] for r, a, b in chunks]
        starts = [a for _, a, _ in chunks]
        tables = [r.table.blocks for r in rows]
        try:
            keep = [r.prompt_lp is not None and r.n_generated == 0 for r in rows]
            slots = self._slots(rows)
            logits = self.runner.prefill(tokens, starts, tables, keep_all=keep, adapters=slots)
            if self.draft_runner is not None:
                self.draft_runner.prefill(tokens, starts, tables, logits=False)
        except Exception as e:
            for req in rows:
                self._fail(req, e)
            return
        for (_, start, end), req, out in zip(chunks, rows, logits):
            try:
                self._prefilled(req, out, start, end)
            except Exception as e:
                self._fail(req, e)

    def _prefilled(self, req: _Request, logits: torch.Tensor, start: int, end: int) -> None:
        """``req``'s tokens up to ``end`` are in the cache, with ``logits`` for
        ``start..end-1`` (or the last); when all are, sample its next token."""
        req.cached = end
        self.scheduler.commit(req)
        if req.prompt_lp is not None and req.n_generated == 0:
            self._prompt_logprobs(req, logits, start, end)
        if end < req.target:
            return
        self.scheduler.started(req)
        if req.n_generated == 0 and req.params.max_tokens == 0:
            req.finish = "length"
            self._finish(req)
            return
        self._accept([req], logits[-1:])

    def _prompt_logprobs(self, req: _Request, logits: torch.Tensor, start: int, end: int) -> None:
        assert req.prompt_lp is not None
        nxt = req.prompt[start + 1 : end + 1]  # the tokens positions start..end-1 predict
        if not nxt:
            return
        lp = torch.log_softmax(logits[: len(nxt)], dim=-1)
        ids = torch.tensor(nxt, device=lp.device)
        chosen = lp.gather(-1, ids[:, None])[:, 0].tolist()
        k = req.params.logprobs or 0
        tops: list[list[tuple[int, float]]] = [[] for _ in nxt]
        if k > 0:
            vals, idx = lp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        req.prompt_lp += [TokenInfo(t, c, top) for t, c, top in zip(nxt, chosen, tops)]

    def _decode(self, rows: list[_Request]) -> None:
        """One token for every row in one batched forward (the draft's cache reads the same
        tokens when there is a draft: it is not speculating this step)."""
        tokens = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.device)
        starts = [r.cached for r in rows]
        tables = [r.table.blocks for r in rows]
        try:
            logits = self.runner.decode(tokens, starts, tables, self._slots(rows))[:, -1].float()
            if self.draft_runner is not None:
                self.draft_runner.decode(tokens, starts, tables)
        except Exception as e:
            for req in rows:
                self._fail(req, e)
            return
        for req in rows:
            req.cached += 1
            self.scheduler.commit(req)
        self._accept(rows, logits)

    def _speculate(self, rows: list[_Request]) -> None:
        """One speculative step for every row (see the module's docstring)."""
        assert self.draft_runner is not None
        k, dev = self.draft_k, self.device
        base = [r.cached for r in rows]
        tables = [r.table.blocks for r in rows]
        proposal = [torch.tensor([r.pending for r in rows], dtype=torch.long, device=dev)]
        draft_logits = []
        failed: dict[int, str] = {}  # row -> its error
        for j in range(k):  # the draft proposes k tokens per row, one batched step each
            starts = [b + j for b in base]
            dl = self.draft_runner.decode(proposal[-1][:, None], starts, tables)[:, -1].float()
            draft_logits.append(dl)
            proposal.append(self._propose(rows, dl, failed))
        tokens = torch.stack(proposal, dim=1)  # (n, k+1): the pending token, then k drafted
        verify = self.runner.decode(tokens, base, tables, self._slots(rows)).float()
        drafted = tokens[:, 1:]
        results = self._verify(rows, verify, torch.stack(draft_logits, dim=1), drafted, failed)
        self._catch_up_draft(rows, results, drafted, base, tables)
        # every row's new length first (its blocks then hold only kept tokens below it)
        for i, r in enumerate(results):
            if not isinstance(r, str):
                rows[i].cached = base[i] + r[0] + 1
                self.scheduler.commit(rows[i])
        for i, req in enumerate(rows):
            r = results[i]
            if isinstance(r, str):
                self._error(req, r)
                continue
            try:
                self._keep(req, r[1], base[i], verify[i])
            except Exception as e:
                self._fail(req, e)

    def _catch_up_draft(
        self,
        rows: list[_Request],
        results: list[tuple[int, list[int]] | str],
        drafted: torch.Tensor,
        base: list[int],
        tables: list[list[int]],
    ) -> None:
        """Rows that kept all k proposals: the draft never ran its last one; add it (at
        base + k). The other rows write a token their cache gets anyway: their next pending
        token at its position (or, for a failed row, the current one again)."""
        k = self.draft_k
        if not any(not isinstance(r, str) and r[0] == k for r in results):
            return
        assert self.draft_runner is not None
        last = drafted[:, -1].tolist()
        fill, at = [], []
        for i, r in enumerate(results):
            if isinstance(r, str):
                fill.append(rows[i].pending)
                at.append(base[i])
            elif r[0] == k:
                fill.append(last[i])
                at.append(base[i] + k)
            else:
                fill.append(r[1][-1])
                at.append(base[i] + r[0] + 1)
        tokens = torch.tensor(fill, dtype=torch.long, device=self.device)[:, None]
        self.draft_runner.decode(tokens, at, tables)

    def _verify(
        self,
        rows: list[_Request],
        verify: torch.Tensor,
        dlogits: torch.Tensor,
        drafted: torch.Tensor,
        failed: dict[int, str],
    ) -> list[tuple[int, list[int]] | str]:
        """Each row's ``(accepted proposals, kept tokens)`` from the model's logits
        ``verify`` (n, k+1, vocab) and the draft's ``dlogits`` (n, k, vocab), or its error."""
        k = self.draft_k
        finite = torch.isfinite(verify.amax(dim=-1)).all(dim=-1).tolist()
        draft_finite = torch.isfinite(dlogits.amax(dim=-1)).all(dim=-1).tolist()
        results: list[tuple[int, list[int]] | str] = []
        for i, req in enumerate(rows):
            p = req.params
            if i in failed:
                results.append(failed[i])
            elif not finite[i]:
                results.append("the model's logits are NaN or Inf: no text can be generated")
            elif p.temperature > 0 and not draft_finite[i]:
                results.append("the draft model's logits are NaN or Inf: no text can be sampled")
            else:
                try:
                    sampling = (p.temperature, p.top_p, None, req.generator)
                    n, new = verify_drafted(verify[i], dlogits[i], drafted[i], sampling)
                except Exception as e:
                    results.append(self._internal(req, e))
                    continue
                results.append((n, new.tolist()))
                self.stats.spec_drafted += k
                self.stats.spec_accepted += n
        return results

    def _keep(self, req: _Request, new: list[int], base: int, logits: torch.Tensor) -> None:
        """Follow a row's kept tokens ``new`` (its accepted proposals and the model's own),
        one at a time as plain decoding would, until one finishes the request; ``logits``
        (k+1, vocab) are the model's for each."""
        for j, info in enumerate(self._kept(req, new, logits)):
            req.cached = base + j + 1  # as plain decoding would have it
            if self._follow(req, info, flush=False):
                return
        req.cached = base + len(new)
        req.pending = new[-1]
        self._flush(req, final=False)

    def _kept(self, req: _Request, new: list[int], logits: torch.Tensor) -> list[TokenInfo]:
        """The kept tokens ``new`` of a speculative step as the client sees them, their
        logprobs (when asked for) under the model's ``logits`` (k+1, vocab)."""
        k = req.params.logprobs
        if k is None:
            return [TokenInfo(t) for t in new]
        rows = logits[: len(new)].float()
        ids = torch.tensor(new, device=rows.device)
        chosen = logprobs_of(rows, ids).tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in new]
        if k > 0:
            vals, idx = torch.log_softmax(rows, dim=-1).topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        return [TokenInfo(t, c, top) for t, c, top in zip(new, chosen, tops)]

    def _propose(
        self, rows: list[_Request], logits: torch.Tensor, failed: dict[int, str]
    ) -> torch.Tensor:
        """The draft's next token (n,) for each row from its logits (n, vocab), each row
        sampled with its own settings and generator (greedy at temperature 0); a row that
        cannot be sampled goes into ``failed`` and proposes token 0 meanwhile."""
        sampling = [replace(r.sampling, logprobs=None) for r in rows]  # type: ignore[type-var]
        picks = sample_batch(logits, sampling)
        for i, pick in enumerate(picks.to_host()):  # a greedy row's draft is only checked
            if pick.error is not None and i not in failed and rows[i].params.temperature > 0:
                failed[i] = f"the draft model's logits: {pick.error}"
        return picks.tokens

    def _accept(self, rows: list[_Request], logits: torch.Tensor) -> None:
        """Sample every row's next token from its ``logits`` (one row each, (n, vocab)) in one
        batched call, with one transfer to the host, then follow each row's text, emit, and
        retire the rows that are done. The one place the model's tokens are sampled."""
        shaped = [r.logits for r in rows]
        allowed, bias = self.logits_state.shape(shaped, logits)
        result = sample_batch(logits, [r.sampling for r in rows], allowed=allowed, bias=bias)  # type: ignore[misc]
        self.logits_state.count(shaped, result.tokens)
        picks = result.to_host()
        for req, pick in zip(rows, picks):
            if pick.error is not None:
                self._error(req, f"the model's logits: {pick.error}: no text can be generated")
                continue
            try:
                self._follow(req, self._info(req, pick))
            except Exception as e:
                self._fail(req, e)

    def _info(self, req: _Request, pick: SampledToken) -> TokenInfo:
        """What the client sees of a sampled token: its logprob and top tokens if asked."""
        if req.params.logprobs is None:
            return TokenInfo(pick.token)
        return TokenInfo(pick.token, pick.logprob, pick.top)

    def _follow(self, req: _Request, info: TokenInfo, flush: bool = True) -> bool:
        """Follow a generated token (``info``: its id, and its logprobs when asked for): the
        text, stop strings, eos and limits; finish the request when it is done (True), else
        emit the new text (``flush``). The one place a row's text is followed."""
        p, token = req.params, info.id
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        self.stats.record_tokens(1)
        req.new_tokens.append(info)  # eos too: it was generated (usage, logprobs)
        req.n_generated += 1
        matcher = req.logits.matcher if req.logits is not None else None
        if token == self.tokenizer.eos_id or token in p.stop_token_ids:
            req.finish = "stop"
        elif matcher is not None and not matcher.accept(token):
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed")
        else:
            req.generated.append(token)
            req.pending = token
            assert req.follower is not None
            if req.follower.add(token) or (matcher is not None and matcher.done):
                req.finish = "stop"
            elif len(req.generated) >= p.max_tokens or req.cached + 1 >= self.max_seq_len:
                req.finish = "length"
        if req.finish is not None:
            self._finish(req)
            return True
        if flush:
            self._flush(req, final=False)
        return False

    def _flush(self, req: _Request, final: bool) -> None:
        if not (final or req.stream):
            return
        assert req.follower is not None
        delta = req.follower.delta(final)
        first = req.prompt_lp is not None
        if not (delta or req.new_tokens or final or first):
            return
        out = Output(
            delta,
            req.new_tokens,
            finish_reason=req.finish if final else None,
            prompt_tokens=len(req.prompt),
            completion_tokens=req.n_generated,
            prompt_logprobs=req.prompt_lp,
        )
        req.new_tokens, req.prompt_lp = [], None
        self._send(req, out)

    def _finish(self, req: _Request) -> None:
        self.logits_state.close(req.logits)
        self.scheduler.remove(req)
        self._release(req)
        self._flush(req, final=True)

    def _slots(self, rows: list[_Request]) -> list[int] | None:
        """The rows' LoRA slots for the runner (None: the engine serves no adapters)."""
        return [r.adapter for r in rows] if self.adapters is not None else None

    def _release(self, req: _Request) -> None:
        """``req`` has ended: let go of its adapter (once)."""
        if req.lease is not None:
            req.lease.release()

    def _internal(self, req: _Request, e: Exception) -> str:
        """Log what ``req`` raised; the message its client gets."""
        log.error("engine: request %d failed: %s: %s", req.id, type(e).__name__, e, exc_info=e)
        return f"internal error: {type(e).__name__}: {e}"

    def _fail(self, req: _Request, e: Exception) -> None:
        """``req`` alone raised ``e``: answer it with the error and free its slot."""
        self._error(req, self._internal(req, e))

    def _error(self, req: _Request, message: str) -> None:
        self._drop(req)
        self._send(req, Output("", [], error=message))

    def _drop(self, req: _Request) -> None:
        """Take ``req`` out of the scheduler, wherever it is, and release its blocks."""
        self.logits_state.close(req.logits)
        if req.admitted == 0 and req in self.scheduler.waiting:
            self._dequeued()
        self.scheduler.remove(req)
        self._release(req)

    def _send(self, req: _Request, out: Output) -> None:
        try:
            req.emit(out)
        except Exception:  # a consumer gone away must not stop the engine
            log.exception("engine: could not deliver request %d's output", req.id)
