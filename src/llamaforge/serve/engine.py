"""The serving engine: one scheduler thread owns the model and batches continuously.

Each step of the scheduler
  1. takes new requests and cancellations from the HTTP side,
  2. admits waiting requests into free cache slots and prefills their prompts in chunks,
     within a per-step token budget (a long prompt takes several steps; running requests
     keep decoding meanwhile),
  3. decodes every running request by one token in one batched forward,
  4. retires finished requests and frees their slots.

The KV cache (`SlotCache`) is a fixed budget: ``max_batch`` slots of ``max_seq_len``
positions each. Running (decoding) requests occupy slots ``0..n-1``, so a decode step works on
the views ``k[layer, :n, :, :L]`` (L: the longest position + 1) with a per-row mask; a request
that retires is replaced by the last running row (one row copy). Requests still prefilling sit
in other slots and move to slot ``n`` when their prompt is in. When every slot is taken, new
requests wait; `Engine.submit` refuses one beyond ``max_queue`` waiting (`QueueFull`).

Every request has its own sampling parameters and its own ``torch.Generator`` (seeded from
``seed``). Text is followed as `generate.generate_completions` follows it (the same
`_TextTracker`, stop strings and eos), so at temperature 0 the text equals
``llamaforge generate``'s; streamed deltas hold back an incomplete UTF-8 sequence and any tail
that may become a stop string, so the deltas add up to the final text exactly.

Speculative decoding (``draft=``: a smaller model with the same vocabulary): the draft has a
`SlotCache` of its own with the same slots, prefilled with the same chunks, and its rows move
with the model's. Each decode step then speculates for every running row: the draft proposes
``draft_k`` tokens per row (k batched one-token steps), the model scores each row's pending
token and its k proposals in one batched forward of k+1 positions per row, and each row keeps
its longest accepted prefix plus one token of the model's own (`generate.verify_drafted`:
greedy agreement, or the rejection rule of speculative sampling at temperature > 0). The kept
tokens go through the same text, stop, max_tokens and eos checks one at a time, the first
finishing one ends the request, and a row's length simply becomes its accepted length: the
positions written past it are overwritten later and hidden by the mask meanwhile (both caches
have ``draft_k`` spare positions per slot for proposals past the context). With more than
``draft_max_batch`` rows running, a step decodes plainly and the draft only reads the new
tokens into its cache, so that speculation can resume at any step. Greedy text is
the same as without a draft; sampled text has the same distribution, but a seed gives other
tokens than without a draft (the draft consumes random numbers too).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamaforge.inference.generate import _TextTracker, check_sampling, sample, verify_drafted
from llamaforge.model import ModelArgs, Transformer
from llamaforge.tokenizer import Tokenizer

__all__ = [
    "Engine",
    "EngineStats",
    "Output",
    "QueueFull",
    "SamplingParams",
    "SlotCache",
    "TokenInfo",
]


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's ``max_queue``."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k likeliest
    prompt_logprobs: bool = False  # the prompt's token logprobs too (echo)

    def check(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens {self.max_tokens}: must be >= 0")
        check_sampling(self.temperature, self.top_p)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs {self.logprobs}: must be in 0..20")


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


class SlotCache:
    """KV cache of ``slots`` rows × ``max_len`` positions for every layer, with the
    ``update(layer, start_pos, k, v)`` interface the model calls.

    Two modes, set before each forward: `prefill` (one row, a chunk at ``start_pos``, as the
    model's own KVCache) and `decode` (rows ``0..n-1``, one new token each at its own
    position, or s tokens each at their own positions when verifying a draft's proposals: a
    per-row scatter, and the views up to the longest position)."""

    def __init__(
        self, args: ModelArgs, slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (args.n_layers, slots, args.kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len
        self._row = 0
        self._rows: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._n = 0
        self._width = 0

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def prefill(self, row: int) -> None:
        self._rows = None
        self._row = row

    def decode(self, pos: torch.Tensor) -> None:
        """Rows ``0..len(pos)-1``, each writing one token at ``pos[i]`` ((n,) positions), or
        ``s`` tokens at ``pos[i, :]`` ((n, s) positions)."""
        pos = pos.reshape(len(pos), -1)
        self._rows = torch.arange(len(pos), device=pos.device).repeat_interleave(pos.shape[1])
        self._pos = pos.reshape(-1)
        self._n = len(pos)
        self._width = int(pos.max()) + 1

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            r, end = self._row, start_pos + k.shape[2]
            self.k[layer, r : r + 1, :, start_pos:end] = k
            self.v[layer, r : r + 1, :, start_pos:end] = v
            return self.k[layer, r : r + 1, :, :end], self.v[layer, r : r + 1, :, :end]
        n = self._n
        # (n, heads, s, head_dim) -> one (heads, head_dim) entry per (row, position)
        heads, dim = k.shape[1], k.shape[3]
        self.k[layer, self._rows, :, self._pos] = k.transpose(1, 2).reshape(-1, heads, dim)
        self.v[layer, self._rows, :, self._pos] = v.transpose(1, 2).reshape(-1, heads, dim)
        return self.k[layer, :n, :, : self._width], self.v[layer, :n, :, : self._width]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst``."""
        if src != dst and length > 0:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def swap(self, a: int, la: int, b: int, lb: int) -> None:
        """Exchange rows ``a`` (``la`` positions used) and ``b`` (``lb``)."""
        n = max(la, lb)
        if a == b or n == 0:
            return
        for t in (self.k, self.v):
            tmp = t[:, a, :, :n].clone()
            t[:, a, :, :n] = t[:, b, :, :n]
            t[:, b, :, :n] = tmp


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Output], None]
    stream: bool = True
    arrival: float = field(default_factory=time.monotonic)
    slot: int = -1
    cached: int = 0  # prompt/generated tokens whose keys and values are in the cache
    generated: list[int] = field(default_factory=list)  # the text's tokens (no eos)
    n_generated: int = 0  # every sampled token, eos included
    pending: int | None = None  # the sampled token not yet fed to the model
    text: str = ""
    emitted: int = 0
    finish: str | None = None
    prompt_lp: list[TokenInfo] | None = None
    new_tokens: list[TokenInfo] = field(default_factory=list)
    generator: torch.Generator | None = None
    tracker: _TextTracker | None = None
    first_token_at: float | None = None


class EngineStats:
    """Counters the scheduler keeps (read by /metrics and /health; plain attributes written
    by one thread)."""

    def __init__(self) -> None:
        self.waiting = 0
        self.running = 0
        self.prefilling = 0
        self.kv_used = 0  # positions in use
        self.kv_total = 0
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
    runs only in the engine's thread (`start`/`stop`)."""

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
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch}: must be at least 1")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk {prefill_chunk}: must be at least 1")
        model_len = model.args.max_seq_len
        self.max_seq_len = min(max_seq_len or model_len, model_len)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len {self.max_seq_len}: must be at least 2")
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
        self.draft_cache: SlotCache | None = None
        if draft is not None:
            check_draft(model, draft, draft_k)
            dw = draft.tok_embeddings.weight
            self.draft_cache = SlotCache(
                draft.args, max_batch, self.max_seq_len + draft_k, dw.dtype, self.device
            )
        # with a draft, draft_k spare positions per slot: a row near the end of its context
        # still verifies k proposals (those past the context are never emitted)
        slot_len = self.max_seq_len + self.draft_k
        self.cache = SlotCache(model.args, max_batch, slot_len, weight.dtype, self.device)
        self.stats = EngineStats()
        self.stats.kv_total = max_batch * self.max_seq_len
        self.stats.draft_k = self.draft_k
        self._ids = itertools.count(1)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Request] = []
        self._running: list[_Request] = []  # running[i].slot == i
        self._free = set(range(max_batch))
        self._queued = 0  # submitted, not yet admitted (read by submit from other threads)
        self._lock = threading.Lock()

    # -- the HTTP side ----------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        emit: Callable[[Output], None],
        stream: bool = True,
    ) -> int:
        """Queue a request; ``emit`` is called from the engine thread with each Output (as
        tokens come when ``stream``, else once at the end). Raises ValueError for a request
        that cannot run, QueueFull when too many wait."""
        params.check()
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.args.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}: "
                f"together more than the context of {self.max_seq_len} tokens"
            )
        with self._lock:
            if self._queued >= self.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting (limit {self.max_queue})")
            self._queued += 1
        req = _Request(next(self._ids), list(prompt), params, emit, stream=stream)
        self._inbox.put(("add", req))
        self._wake.set()
        return req.id

    def cancel(self, request_id: int) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
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

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the KV caches (the draft's included)."""
        return sum(c.nbytes for c in self._caches())

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the engine thread ------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._drain()
                if not (self._waiting or self._prefilling or self._running):
                    self._update_stats()  # cancellations may have emptied the batch
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                try:
                    self.step()
                except Exception as e:  # a failed forward: fail what was in flight, go on
                    traceback.print_exc()
                    self._fail_all(f"internal error: {type(e).__name__}: {e}")
            self._fail_all("the server is shutting down", waiting=True)

    def _drain(self) -> None:
        cancelled: set[int] = set()
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._waiting.append(item)
            else:
                cancelled.add(item)
        if cancelled:
            for req in [r for r in self._waiting if r.id in cancelled]:
                self._waiting.remove(req)
                self._dequeued()
            for req in [r for r in self._prefilling if r.id in cancelled]:
                self._prefilling.remove(req)
                self._free.add(req.slot)
            for req in [r for r in self._running if r.id in cancelled]:
                self._retire(req)

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _fail_all(self, message: str, waiting: bool = False) -> None:
        victims = self._prefilling + self._running + (list(self._waiting) if waiting else [])
        for req in self._prefilling:
            self._free.add(req.slot)
        self._prefilling.clear()
        while self._running:
            self._retire(self._running[-1])
        if waiting:
            for _ in self._waiting:
                self._dequeued()
            self._waiting.clear()
        for req in victims:
            self._send(req, Output("", [], error=message))
        self._update_stats()

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler step (the engine thread calls it; tests may too, with no thread)."""
        self._admit()
        self._prefill()
        if self._running:
            if self.draft is not None and len(self._running) <= self.draft_max_batch:
                self._speculate()
            else:
                self._decode()
        self.stats.steps += 1
        self._update_stats()

    def _update_stats(self) -> None:
        s = self.stats
        s.waiting, s.running, s.prefilling = (
            len(self._waiting),
            len(self._running),
            len(self._prefilling),
        )
        s.kv_used = sum(r.cached for r in self._running) + sum(r.cached for r in self._prefilling)

    def _admit(self) -> None:
        while self._waiting and self._free:
            req = self._waiting.popleft()
            self._dequeued()
            req.slot = max(self._free)  # low slots are where running rows live
            self._free.discard(req.slot)
            req.tracker = _TextTracker(self.tokenizer, req.prompt)
            if req.params.seed is not None:
                req.generator = torch.Generator(device=self.device)
                req.generator.manual_seed(req.params.seed)
            elif req.params.temperature > 0:
                req.generator = torch.Generator(device=self.device)
                req.generator.seed()
            if req.params.prompt_logprobs:
                req.prompt_lp = [TokenInfo(req.prompt[0])]
            self._prefilling.append(req)
            self.stats.prompt_tokens += len(req.prompt)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for req in list(self._prefilling):
            if budget <= 0:
                break
            start = req.cached
            end = min(len(req.prompt), start + budget)
            budget -= end - start
            chunk = torch.tensor([req.prompt[start:end]], dtype=torch.long, device=self.device)
            self.cache.prefill(req.slot)
            full = req.params.prompt_logprobs
            logits = self.model(chunk, start, cache=self.cache, last_only=not full)[0].float()
            if self.draft is not None:
                assert self.draft_cache is not None
                self.draft_cache.prefill(req.slot)
                # explicit positions: a draft with a shorter context still drafts (badly)
                positions = torch.arange(start, end, device=self.device)
                cache = self.draft_cache
                self.draft(chunk, start, positions=positions, cache=cache, last_only=True)
            req.cached = end
            if full:
                self._prompt_logprobs(req, logits, start, end)
            if end < len(req.prompt):
                continue
            self._prefilling.remove(req)
            self._to_running(req)
            if req.params.max_tokens == 0:
                req.finish = "length"
                self._finish(req)
                continue
            last = logits[-1:]
            if not bool(torch.isfinite(last).all()):
                self._error(req, "the model's logits are NaN or Inf: no text can be generated")
                continue
            self._accept(req, last)

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

    def _to_running(self, req: _Request) -> None:
        target = len(self._running)
        if req.slot != target:
            other = next((r for r in self._prefilling if r.slot == target), None)
            if other is not None:
                for cache in self._caches():
                    cache.swap(req.slot, req.cached, target, other.cached)
                other.slot = req.slot
            else:
                for cache in self._caches():
                    cache.move(req.slot, target, req.cached)
                self._free.add(req.slot)
                self._free.discard(target)
            req.slot = target
        self._running.append(req)

    def _caches(self) -> list[SlotCache]:
        return [self.cache] if self.draft_cache is None else [self.cache, self.draft_cache]

    def _forward_rows(
        self, model: Transformer, cache: SlotCache, tokens: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """Logits (n, s, vocab) of running rows ``0..n-1``: ``tokens`` (n, s) at positions
        ``pos`` (n, s), each attending to its row's cache up to its own position."""
        cache.decode(pos)
        width = int(pos.max()) + 1
        keys = torch.arange(width, device=self.device)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (n, 1, s, width)
        return model(tokens, 0, mask=mask, positions=pos, cache=cache)

    def _decode(self) -> None:
        rows = self._running
        tokens = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[r.cached] for r in rows], dtype=torch.long, device=self.device)
        logits = self._forward_rows(self.model, self.cache, tokens, pos)[:, -1].float()
        if self.draft_cache is not None:  # not speculating now: the draft's cache keeps up
            self._forward_rows(self.draft, self.draft_cache, tokens, pos)
        # a NaN or +inf anywhere makes the row's max non-finite: one small reduction
        finite = torch.isfinite(logits.amax(dim=-1)).tolist()
        greedy = logits.argmax(dim=-1).tolist()
        batch = list(rows)
        for req in batch:  # first: a row retiring below moves the others' new positions too
            req.cached += 1
        for i, req in enumerate(batch):
            if not finite[i]:
                self._error(req, "the model's logits are NaN or Inf: no text can be generated")
                continue
            self._accept(req, logits[i : i + 1], greedy[i])

    def _speculate(self) -> None:
        """One speculative step for every running row (see the module's docstring)."""
        assert self.draft is not None and self.draft_cache is not None
        rows = list(self._running)
        k, dev = self.draft_k, self.device
        base_host = [r.cached for r in rows]
        base = torch.tensor(base_host, dtype=torch.long, device=dev)
        proposal = [torch.tensor([r.pending for r in rows], dtype=torch.long, device=dev)]
        draft_logits = []
        for j in range(k):  # the draft proposes k tokens per row, one batched step each
            dl = self._forward_rows(
                self.draft, self.draft_cache, proposal[-1][:, None], (base + j)[:, None]
            )[:, -1].float()
            draft_logits.append(dl)
            proposal.append(self._propose(rows, dl))
        tokens = torch.stack(proposal, dim=1)  # (n, k+1): the pending token, then k drafted
        steps = torch.arange(k + 1, device=dev)
        verify = self._forward_rows(self.model, self.cache, tokens, base[:, None] + steps)
        verify = verify.float()  # (n, k+1, vocab)
        drafted = tokens[:, 1:]
        dlogits = torch.stack(draft_logits, dim=1)  # (n, k, vocab)
        finite = torch.isfinite(verify.amax(dim=-1)).all(dim=-1).tolist()
        draft_finite = torch.isfinite(dlogits.amax(dim=-1)).all(dim=-1).tolist()
        results: list[tuple[int, list[int]] | str] = []
        for i, req in enumerate(rows):
            p = req.params
            if not finite[i]:
                results.append("the model's logits are NaN or Inf: no text can be generated")
            elif p.temperature > 0 and not draft_finite[i]:
                results.append("the draft model's logits are NaN or Inf: no text can be sampled")
            else:
                sampling = (p.temperature, p.top_p, None, req.generator)
                n, new = verify_drafted(verify[i], dlogits[i], drafted[i], sampling)
                results.append((n, new.tolist()))
                self.stats.spec_drafted += k
                self.stats.spec_accepted += n
        # Rows that kept all k proposals: the draft never ran its last one; add it (at
        # base + k). The other rows write a token their cache gets anyway: their next
        # pending token at its position (or, for a failed row, the current one again).
        if any(not isinstance(r, str) and r[0] == k for r in results):
            last = drafted[:, -1].tolist()
            fill, at = [], []
            for i, r in enumerate(results):
                if isinstance(r, str):
                    fill.append(rows[i].pending)
                    at.append(base_host[i])
                elif r[0] == k:
                    fill.append(last[i])
                    at.append(base_host[i] + k)
                else:
                    fill.append(r[1][-1])
                    at.append(base_host[i] + r[0] + 1)
            self._forward_rows(
                self.draft,
                self.draft_cache,
                torch.tensor(fill, dtype=torch.long, device=dev)[:, None],
                torch.tensor(at, dtype=torch.long, device=dev)[:, None],
            )
        # every row's new length first: a row retiring below moves the others' rows
        for i, r in enumerate(results):
            if not isinstance(r, str):
                rows[i].cached = base_host[i] + r[0] + 1
        for i, req in enumerate(rows):
            r = results[i]
            if isinstance(r, str):
                self._error(req, r)
                continue
            n, new = r
            for j, token in enumerate(new):
                req.cached = base_host[i] + j + 1  # as plain decoding would have it
                if self._take(req, token, verify[i, j : j + 1], flush=False):
                    break
            else:
                req.cached = base_host[i] + n + 1
                req.pending = new[-1]
                self._flush(req, final=False)

    def _propose(self, rows: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """The draft's next token (n,) for each row from its logits (n, vocab): greedy, or
        sampled with the row's own settings and generator."""
        nxt = logits.argmax(dim=-1)
        for i, req in enumerate(rows):
            p = req.params
            if p.temperature > 0 and bool(torch.isfinite(logits[i]).all()):
                nxt[i] = sample(logits[i : i + 1], p.temperature, p.top_p, None, req.generator)[0]
        return nxt

    def _accept(self, req: _Request, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample the next token from ``logits`` (1, vocab), follow the text, emit, and
        retire the request when it is done."""
        p = req.params
        if p.temperature <= 0:
            token = greedy if greedy is not None else int(logits.argmax(dim=-1))
        else:
            token = int(sample(logits, p.temperature, p.top_p, None, req.generator)[0])
        self._take(req, token, logits)

    def _take(self, req: _Request, token: int, logits: torch.Tensor, flush: bool = True) -> bool:
        """Follow ``token``, generated from ``logits`` (1, vocab): its logprobs, the text,
        stop strings, eos and limits; finish the request when it is done (True), else emit
        the new text (``flush``)."""
        p = req.params
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        self.stats.record_tokens(1)
        info = TokenInfo(token)
        if p.logprobs is not None:
            lp = torch.log_softmax(logits[0], dim=-1)
            info.logprob = float(lp[token])
            if p.logprobs > 0:
                vals, idx = lp.topk(p.logprobs)
                info.top = list(zip(idx.tolist(), vals.tolist()))
        req.new_tokens.append(info)  # eos too: it was generated (usage, logprobs)
        req.n_generated += 1
        if token == self.tokenizer.eos_id:
            req.finish = "stop"
        else:
            req.generated.append(token)
            req.pending = token
            assert req.tracker is not None
            req.text = req.tracker.text(req.generated)
            hit = min((req.text.find(s) for s in p.stop if s in req.text), default=-1)
            if hit >= 0:
                req.text, req.finish = req.text[:hit], "stop"
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
        text = req.text
        if not final:
            text = text.rstrip("\ufffd")
            safe = len(text)
            for s in req.params.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
            text = text[:safe]
        delta = text[req.emitted :] if len(text) > req.emitted else ""
        req.emitted = max(req.emitted, len(text))
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
        if req in self._running:
            self._retire(req)
        self._flush(req, final=True)

    def _error(self, req: _Request, message: str) -> None:
        if req in self._running:
            self._retire(req)
        self._send(req, Output("", [], error=message))

    def _retire(self, req: _Request) -> None:
        """Free ``req``'s slot, moving the last running row into it."""
        i = self._running.index(req)
        last = self._running.pop()
        if last is not req:
            for cache in self._caches():
                cache.move(last.slot, i, last.cached)
            last.slot = i
            self._running[i] = last
        freed = len(self._running)
        self._free.add(freed)

    def _send(self, req: _Request, out: Output) -> None:
        try:
            req.emit(out)
        except Exception:  # a consumer gone away must not stop the engine
            traceback.print_exc()
