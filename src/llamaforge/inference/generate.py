"""Batched text generation with a KV cache, following Meta's reference ``generate``.

Prompts of different lengths share one batch: decoding starts at the shortest prompt and
rows still inside their prompt keep their own tokens (as Meta's code does), so no padding
ever reaches the model. Sampling is greedy (temperature 0), or temperature with top-k and
Meta's ``sample_top_p`` nucleus rule. Each row stops at eos, at a stop string, at
``max_new_tokens`` or at the end of the context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamaforge.inference.detokenizer import TextFollower, completion_text
from llamaforge.inference.sampler import RowSampling, check_sampling, choose, draw, filtered_probs
from llamaforge.inference.sampler import logprobs_of as _logprobs_of
from llamaforge.model import KVCache, ModelArgs, Transformer
from llamaforge.tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    tokens: list[int]  # generated ids (the prompt's only when echo=True)
    prompt_tokens: list[int]
    finish_reason: str  # "eos", "stop", "length" (max_new_tokens) or "context"
    logprobs: list[float] = field(default_factory=list)  # of each generated token


@dataclass(frozen=True)
class GenerationOptions:
    """The keywords of ``generate_completions`` and ``FastGenerator.generate``, with their
    defaults: the sampling settings, when a row stops, and what the result holds.

    ``temperature`` 0 is greedy; ``top_p`` is Meta's nucleus cut (1: none), ``top_k`` None
    none. A row stops at eos (``stop_at_eos``), at the first of the ``stop`` strings (cut
    off), after ``max_new_tokens`` or at the end of the context. ``seed`` fixes the draws;
    ``echo`` puts the prompt before the completion; ``bos`` starts a text prompt with bos;
    ``truncate`` keeps the last tokens of a prompt that leaves no room; ``on_text(row,
    delta)`` receives text as it is produced."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int | None = None
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    seed: int | None = None
    echo: bool = False
    bos: bool = True
    truncate: bool = False
    on_text: Callable[[int, str], None] | None = None


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling as Meta's ``sample_top_p``, from probabilities (n, vocab): keep the
    smallest prefix of the sorted distribution whose mass before each token is at most
    ``p``, renormalise, draw. Token ids (n, 1); `sampler.choose` does the work."""
    rows = [RowSampling(1.0, p, None, generator)] * probs.shape[0]
    return choose(probs.float().log(), rows)[:, None]


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab), every row with the
    same settings and drawing from ``generator`` in row order (`sampler.choose`)."""
    return choose(logits, [RowSampling(temperature, top_p, top_k, generator)] * logits.shape[0])


def check_utf8(text: str, what: str) -> None:
    """Raise ValueError when ``text`` holds bytes that are not UTF-8 (lone surrogates, as
    Python decodes such command-line arguments), naming ``what`` and the first byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise ValueError(f"{what}: not valid UTF-8 (byte {byte} at character {e.start})") from None


def _encode_prompts(
    tokenizer: Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_seq_len: int,
    o: GenerationOptions,
) -> list[list[int]]:
    """Token ids of each prompt (text, or ids used as given), checked to leave room for a new
    token in the context; ``o.truncate`` keeps the last tokens of one that does not. The
    settings are checked first: ``max_new_tokens``, then temperature, top_p and top_k."""
    if o.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {o.max_new_tokens}")
    check_sampling(o.temperature, o.top_p, o.top_k)
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_utf8(p, f"prompt {i}")
    encoded = [
        tokenizer.encode(p, bos=o.bos) if isinstance(p, str) else [int(t) for t in p]
        for p in prompts
    ]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty (encode with bos=True to start from nothing)")
        if len(ids) >= max_seq_len:
            if not o.truncate:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens but the model's context is {max_seq_len}; "
                    "shorten it or pass truncate=True (--truncate) to keep its last tokens"
                )
            encoded[i] = ids[-(max_seq_len - min(o.max_new_tokens, max_seq_len // 2)) :]
    return encoded


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; None (torch's global one) without."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _check_finite(logits: torch.Tensor, where: str) -> None:
    """Refuse to sample text from garbage: NaN or Inf logits are a ValueError."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            f"the model's logits {where} are NaN or Inf (non-finite weights or activations): "
            "no text can be generated from it"
        )


class _Row:
    """One prompt's completion as its tokens arrive: the tokens kept and their
    log-probabilities, its text (followed as it grows by a `TextFollower` only when stop
    strings or ``on_text`` need it, else decoded once at the end) and why it ended
    (``finish``, None while it goes on). ``room`` is how many tokens the context leaves after
    the prompt."""

    def __init__(
        self, tokenizer: Tokenizer, prompt: list[int], o: GenerationOptions, room: int, index: int
    ) -> None:
        self.tokenizer, self.prompt, self.o = tokenizer, prompt, o
        self.room, self.index = room, index
        self.eos = tokenizer.eos_id if o.stop_at_eos else None
        follow = bool(o.stop) or o.on_text is not None
        self.follower = TextFollower(tokenizer, prompt, o.stop) if follow else None
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finish: str | None = None

    def add(self, token: int, logprob: float) -> None:
        """Take the next token: eos ends the row unkept; otherwise it is kept, and the row
        ends at a stop string (the text cut before it), at max_new_tokens or at the
        context's end."""
        if token == self.eos:
            self.finish = "eos"
            return
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if self.follower is not None and self.follower.add(token):
            self.finish = "stop"
        elif len(self.tokens) >= self.o.max_new_tokens:
            self.finish = "length"
        elif len(self.tokens) >= self.room:
            self.finish = "context"

    def emit(self) -> None:
        """Hand ``on_text`` the text made since its last call that is safe to stream (all of
        it once finished)."""
        if self.o.on_text is not None and self.follower is not None:
            delta = self.follower.delta(final=self.finish is not None)
            if delta:
                self.o.on_text(self.index, delta)

    def completion(self) -> Completion:
        reason = self.finish or (
            "length" if len(self.tokens) >= self.o.max_new_tokens else "context"
        )
        if self.follower is not None:
            prefix, text = self.follower.prompt_text, self.follower.text
        else:
            prefix = self.tokenizer.decode(self.prompt)
            text = completion_text(self.tokenizer, self.prompt, self.tokens, prefix)
        if self.o.echo:
            text, tokens = prefix + text, self.prompt + self.tokens
        else:
            tokens = self.tokens
        return Completion(text, tokens, self.prompt, reason, self.logprobs)


def _prompt_batch(
    encoded: list[list[int]], total_len: int, fill: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (batch, total_len) token grid with each prompt at the start of its row (``fill``
    after it), and the mask of the positions that hold a prompt token."""
    bsz = len(encoded)
    tokens = torch.full((bsz, total_len), fill, dtype=torch.long, device=device)
    in_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
    for i, ids in enumerate(encoded):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        in_prompt[i, : len(ids)] = True
    return tokens, in_prompt


def generate_completions(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    **options: Any,
) -> list[Completion]:
    """Generate a completion for each prompt (text, or token ids used as given); ``options``
    are ``GenerationOptions``' fields (``max_new_tokens``, ``temperature``, ``top_p``,
    ``top_k``, ``stop``, ``stop_at_eos``, ``seed``, ``echo``, ``bos``, ``truncate``,
    ``on_text``).

    ``on_text(row, delta)`` receives text as it is produced, less what may still change (an
    incomplete UTF-8 character, a tail that may begin a stop string): the deltas add up to
    the completion's text. A prompt that does not leave
    room for a single new token in the model's context raises ``ValueError``, unless
    ``truncate`` keeps its last tokens.
    """
    o = GenerationOptions(**options)
    if not prompts:
        return []
    max_seq_len = model.args.max_seq_len
    encoded = _encode_prompts(tokenizer, prompts, max_seq_len, o)

    device = next(model.parameters()).device
    lengths = [len(ids) for ids in encoded]
    total_len = min(max_seq_len, max(lengths) + o.max_new_tokens)
    tokens, in_prompt = _prompt_batch(encoded, total_len, tokenizer.eos_id, device)
    generator = _generator(o.seed, device)
    rows = [_Row(tokenizer, ids, o, total_len - len(ids), i) for i, ids in enumerate(encoded)]

    model.setup_cache(len(encoded), total_len)
    try:
        prev = 0
        for cur in range(min(lengths), total_len):
            logits = model(tokens[:, prev:cur], prev, last_only=True)[:, -1].float()
            _check_finite(logits, f"at position {cur}")
            nxt = sample(logits, o.temperature, o.top_p, o.top_k, generator)
            nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
            tokens[:, cur] = nxt
            prev = cur
            chosen = _logprobs_of(logits, nxt).tolist()
            for row, token, lp, n in zip(rows, nxt.tolist(), chosen, lengths):
                if row.finish is None and cur >= n:  # rows still in their prompt wait
                    row.add(token, lp)
                    row.emit()
            if all(row.finish is not None for row in rows):
                break
    finally:
        model.clear_cache()
    return [row.completion() for row in rows]


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str],
    **kwargs,
) -> str | list[str]:
    """Text in, text out: one completion per prompt (see ``generate_completions``)."""
    single = isinstance(prompts, str)
    results = generate_completions(model, tokenizer, [prompts] if single else prompts, **kwargs)
    texts = [r.text for r in results]
    return texts[0] if single else texts


# -- fast single-stream decoding -----------------------------------------------------------
#
# gpt-fast's recipe on the unchanged model: a KV cache of fixed length, so that every
# decoding step has the same shapes and one torch.compile'd step serves them all (replayed as
# a CUDA graph on a GPU); int8 weights (quantize.py); and speculative decoding, where a small
# draft model proposes a few tokens and the model checks them all in one forward pass.


class StaticKVCache(KVCache):
    """A ``KVCache`` whose updates return all ``max_len`` slots, so every step has the same
    shapes. ``update`` ignores its int ``start_pos`` and writes at ``self.positions``, the
    slots of the chunk being run (``forward_static`` sets them). The mask hides the slots
    past each query, so entries left by a rejected speculation are harmless: rolling back
    is only a matter of which positions come next.

    One tensor per layer rather than ``KVCache``'s single one: a compiled step then writes
    each layer's slots in place, where writing through views of one shared tensor made
    torch.compile copy the whole cache at every step."""

    def __init__(  # noqa: D107 - KVCache's arguments; its single tensor is not made
        self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch, args.kv_heads, max_len, args.head_dim)
        self.ks = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.vs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.positions = torch.zeros(1, dtype=torch.long, device=device)
        if torch.device(device).type == "cuda":  # fixed addresses: CUDA graphs write in place
            for t in self.ks + self.vs:
                torch._dynamo.mark_static_address(t)

    @property
    def max_len(self) -> int:
        return self.ks[0].shape[2]

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.ks[layer][:, :, self.positions] = k
        self.vs[layer][:, :, self.positions] = v
        return self.ks[layer], self.vs[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        self.ks = [k.index_select(0, rows) for k in self.ks]
        self.vs = [v.index_select(0, rows) for v in self.vs]


def forward_static(
    model: Transformer, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Logits (batch, seq, vocab) of ``tokens`` (batch, seq) at ``positions`` (seq,), each
    attending to the cache slots up to its own position."""
    cache.positions = positions
    mask = torch.arange(cache.max_len, device=positions.device) <= positions[:, None]
    return model(tokens, 0, mask=mask, positions=positions, cache=cache)


@dataclass
class DecodeStats:
    """What the last ``FastGenerator.generate`` did: tokens made, forward passes of the
    model, and the draft's proposals and how many the model accepted."""

    new_tokens: int = 0
    target_forwards: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


class FastGenerator:
    """Single-stream decoding with a static KV cache, optionally ``torch.compile``d and
    optionally speculative (``draft``: a smaller model with the same vocabulary).

    Greedy output is the same as ``generate_completions``' (up to float rounding, which
    compile may reorder); with a draft, sampling follows the rejection rule of speculative
    sampling (Leviathan et al., 2023), so the tokens have the model's own distribution.
    The compiled steps and caches are kept between calls: build one and reuse it.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        compile: bool = False,
        draft: Transformer | None = None,
        draft_k: int = 4,
    ) -> None:
        self.model, self.tokenizer, self.draft, self.draft_k = model, tokenizer, draft, draft_k
        self.device = next(model.parameters()).device
        if draft is not None:
            if draft.args.vocab_size != model.args.vocab_size:
                raise ValueError(
                    f"the draft's vocab_size {draft.args.vocab_size} differs from the model's "
                    f"{model.args.vocab_size}: a draft must share the model's tokenizer"
                )
            if next(draft.parameters()).device != self.device:
                raise ValueError("the draft must be on the model's device")
            if draft_k < 1:
                raise ValueError(f"draft_k {draft_k}: must be at least 1")
        self.step: Callable[..., torch.Tensor] = forward_static
        # A CUDA graph's replay overwrites its previous outputs: those are copied out.
        self.graphs = compile and self.device.type == "cuda"
        if compile:
            cuda = self.device.type == "cuda"
            self.step = torch.compile(
                forward_static,
                mode="reduce-overhead" if cuda else None,  # CUDA graphs on a GPU
                fullgraph=True,
                dynamic=False,
            )
        # Read a chunk of tokens back per host sync: a GPU then runs ahead of Python.
        self.sync_every = 8 if self.device.type == "cuda" else 1
        self.caches: tuple[StaticKVCache, StaticKVCache | None] | None = None
        self.stats = DecodeStats()

    def _caches(self, length: int) -> tuple[StaticKVCache, StaticKVCache | None]:
        """Caches of at least ``length`` slots (rounded up to 64, so that similar requests
        reuse one size and its compiled steps)."""
        if self.caches is None or self.caches[0].max_len < length:
            length = -(-length // 64) * 64
            dtype = self.model.tok_embeddings.weight.dtype

            def make(m: Transformer) -> StaticKVCache:
                return StaticKVCache(m.args, 1, length, dtype, self.device)

            self.caches = (make(self.model), make(self.draft) if self.draft else None)
        return self.caches

    def _run(
        self, model: Transformer, cache: StaticKVCache, tokens: list[int] | torch.Tensor, start: int
    ) -> torch.Tensor:
        """Logits (seq, vocab) of ``tokens`` at ``start…`` through the compiled step."""
        tokens = torch.as_tensor(tokens, device=self.device).view(1, -1)
        positions = torch.arange(start, start + tokens.shape[1], device=self.device)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self.step(model, cache, tokens, positions)[0].clone()
        return self.step(model, cache, tokens, positions)[0]

    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[int], **options: Any) -> Completion:
        """One completion, with ``generate_completions``' options (``GenerationOptions``) and
        result for a single prompt (``on_text`` is called with row 0). ``self.stats`` tells
        what it took."""
        o = GenerationOptions(**options)
        max_seq_len = self.model.args.max_seq_len
        (ids,) = _encode_prompts(self.tokenizer, [prompt], max_seq_len, o)
        budget = min(o.max_new_tokens, max_seq_len - len(ids))
        target_cache, draft_cache = self._caches(len(ids) + budget + self.draft_k + 1)
        sampling = (o.temperature, o.top_p, o.top_k, _generator(o.seed, self.device))
        self.stats = DecodeStats(target_forwards=1)

        # Prefill eagerly (prompts vary in length), then decode through the compiled step.
        prompt_t = torch.tensor(ids, device=self.device)
        positions = torch.arange(len(ids), device=self.device)
        logits = forward_static(self.model, target_cache, prompt_t[None], positions)[0, -1:]
        if draft_cache is not None:
            forward_static(self.draft, draft_cache, prompt_t[None], positions)
        _check_finite(logits, "after the prompt")
        chunks = (
            self._speculate(logits, len(ids), budget, sampling)
            if self.draft is not None
            else self._decode(logits, len(ids), budget, sampling)
        )
        row = _Row(self.tokenizer, ids, o, budget, 0)
        for tokens, lps in chunks:
            for token, lp in zip(tokens, lps):
                row.add(token, lp)
                if row.finish:
                    break
            row.emit()
            if row.finish:
                break
        chunks.close()
        self.stats.new_tokens = len(row.tokens)
        return row.completion()

    def _pick(self, logits: torch.Tensor, sampling: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens (n,) from logits (n, vocab), and their log-probabilities."""
        tokens = sample(logits, *sampling)
        return tokens, _logprobs_of(logits, tokens)

    def _decode(self, logits: torch.Tensor, pos: int, budget: int, sampling: tuple):
        """Yield chunks (tokens, logprobs) of plain decoding: one step per token."""
        cache = self.caches[0]
        tokens, lps = [], []
        for i in range(budget):
            token, lp = self._pick(logits, sampling)
            tokens.append(token)
            lps.append(lp)
            if len(tokens) == self.sync_every or i == budget - 1:
                yield torch.cat(tokens).tolist(), torch.cat(lps).tolist()
                tokens, lps = [], []
            if i < budget - 1:
                logits = self._run(self.model, cache, token, pos + i)
                self.stats.target_forwards += 1

    def _speculate(self, logits: torch.Tensor, pos: int, budget: int, sampling: tuple):
        """Yield chunks of speculative decoding. Each round the draft proposes ``draft_k``
        tokens one at a time and the model scores them all in one forward pass; the longest
        agreeing prefix is kept, plus one token of the model's own, so a round makes 1 to
        ``draft_k + 1`` tokens. Both caches then simply continue from the new position."""
        target_cache, draft_cache = self.caches
        k = self.draft_k
        token, lp = self._pick(logits, sampling)
        yield token.tolist(), lp.tolist()
        made, pos = 1, pos  # `token` is the last token made; it sits at slot `pos`
        while made < budget:
            proposal, draft_logits = [token], []
            for j in range(k):
                dl = self._run(self.draft, draft_cache, proposal[-1], pos + j)
                draft_logits.append(dl)
                proposal.append(sample(dl, *sampling))
            verify = self._run(self.model, target_cache, torch.cat(proposal), pos)
            self.stats.target_forwards += 1
            drafted = torch.cat(proposal[1:])  # (k,)
            n, new = verify_drafted(verify, torch.cat(draft_logits), drafted, sampling)
            self.stats.proposed += k
            self.stats.accepted += n
            if n == k:  # the draft never saw its own last proposal: add it to its cache
                self._run(self.draft, draft_cache, drafted[k - 1 :], pos + k)
            lps = _logprobs_of(verify[: n + 1], new)
            yield new.tolist(), lps.tolist()
            made, pos, token = made + n + 1, pos + n + 1, new[-1:]

    def _accept(
        self,
        verify: torch.Tensor,
        draft_logits: torch.Tensor,
        drafted: torch.Tensor,
        sampling: tuple,
    ) -> tuple[int, torch.Tensor]:
        """`rejection_sample` (kept as a method for callers of the rule alone)."""
        return rejection_sample(verify, draft_logits, drafted, sampling)


def verify_drafted(
    verify: torch.Tensor, draft_logits: torch.Tensor | None, drafted: torch.Tensor, sampling: tuple
) -> tuple[int, torch.Tensor]:
    """Check ``drafted`` (k,) tokens against the model's logits ``verify`` (k+1, vocab) at the
    position before each of them and after the last. Greedy (``sampling``'s temperature
    <= 0): the longest prefix equal to the model's own choices, plus the model's token after
    it; else `rejection_sample` (which needs the draft's logits (k, vocab)). Returns (the
    number of drafted tokens kept, the tokens made: those kept and one of the model's)."""
    temperature = sampling[0]
    k = drafted.shape[0]
    if temperature <= 0:
        choice = verify.argmax(-1)  # the model's own token after each prefix
        agree = (choice[:k] == drafted).int().cumprod(0)
        n = int(agree.sum())
        return n, torch.cat([drafted[:n], choice[n : n + 1]])
    assert draft_logits is not None, "sampling needs the draft's logits"
    n, extra = rejection_sample(verify, draft_logits, drafted, sampling)
    return n, torch.cat([drafted[:n], extra])


def rejection_sample(
    verify: torch.Tensor,
    draft_logits: torch.Tensor,
    drafted: torch.Tensor,
    sampling: tuple,
) -> tuple[int, torch.Tensor]:
    """Speculative sampling's rule: keep drafted token i with probability
    min(1, p_i / q_i); at the first rejection draw from max(0, p - q) renormalised, and
    after k acceptances from the model's next distribution. Returns (accepted, [token])."""
    temperature, top_p, top_k, generator = sampling
    rows = [RowSampling(temperature, top_p, top_k)]
    p = filtered_probs(verify, rows * verify.shape[0])  # (k+1, vocab)
    q = filtered_probs(draft_logits, rows * draft_logits.shape[0])  # (k, vocab)
    k = drafted.shape[0]
    idx = torch.arange(k, device=drafted.device)
    ratio = p[idx, drafted] / q[idx, drafted]
    u = torch.rand(k, device=drafted.device, generator=generator)
    rejected = (u > ratio).nonzero()
    if len(rejected) == 0:
        return k, draw(p[k : k + 1], generator)
    n = int(rejected[0, 0])
    residual = (p[n] - q[n]).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q at this position: any draw from p is right
        residual = p[n]
    return n, draw(residual[None], generator)
