"""Batched text generation with a KV cache, following Meta's reference ``generate``.

Prompts of different lengths share one batch: decoding starts at the shortest prompt and
rows still inside their prompt keep their own tokens (as Meta's code does), so no padding
ever reaches the model. Sampling is greedy (temperature 0), or temperature with top-k and
Meta's ``sample_top_p`` nucleus rule. Each row stops at eos, at a stop string, at
``max_new_tokens`` or at the end of the context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .model import Transformer
from .tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    tokens: list[int]  # generated ids (the prompt's only when echo=True)
    prompt_tokens: list[int]
    finish_reason: str  # "eos", "stop", "length" (max_new_tokens) or "context"
    logprobs: list[float] = field(default_factory=list)  # of each generated token


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling exactly as Meta's ``sample_top_p``: keep the smallest prefix of the
    sorted distribution whose mass before each token is at most ``p``, renormalise, draw."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice)


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        return sample_top_p(probs, top_p, generator).squeeze(-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class _TextTracker:
    """Decodes one row's completion incrementally, for streaming and stop strings."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int]) -> None:
        self.tokenizer, self.prompt = tokenizer, prompt
        # Decoding the completion alone would drop the leading space of its first piece.
        self.prefix = tokenizer.decode(prompt)
        self.emitted = 0

    def text(self, generated: list[int]) -> str:
        full = self.tokenizer.decode(self.prompt + generated)
        if full.startswith(self.prefix):
            return full[len(self.prefix) :]
        return self.tokenizer.decode(generated)

    def delta(self, text: str, final: bool) -> str:
        # Hold back an incomplete UTF-8 sequence (byte-fallback pieces decode to U+FFFD).
        stable = text if final else text.rstrip("\ufffd")
        out = stable[self.emitted :]
        self.emitted = max(self.emitted, len(stable))
        return out


@torch.inference_mode()
def check_sampling(temperature: float, top_p: float, top_k: int | None = None) -> None:
    """Raise ValueError naming the first sampling setting that cannot work: temperature
    must be finite and >= 0 (0: greedy), top_p in (0, 1], top_k None (off) or >= 1."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature {temperature}: must be a finite number >= 0 (0: greedy)")
    if not 0.0 < top_p <= 1.0:  # also refuses nan
        raise ValueError(f"top_p {top_p}: must be in (0, 1] (1: no nucleus cut)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k {top_k}: must be at least 1 (leave it unset for no top-k)")


def check_utf8(text: str, what: str) -> None:
    """Raise ValueError when ``text`` holds bytes that are not UTF-8 (lone surrogates, as
    Python decodes such command-line arguments), naming ``what`` and the first byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise ValueError(f"{what}: not valid UTF-8 (byte {byte} at character {e.start})") from None


def generate_completions(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int | None = None,
    stop: Sequence[str] = (),
    stop_at_eos: bool = True,
    seed: int | None = None,
    echo: bool = False,
    bos: bool = True,
    truncate: bool = False,
    on_text: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Generate a completion for each prompt (text, or token ids used as given).

    ``on_text(row, delta)`` receives text as it is produced. A prompt that does not leave
    room for a single new token in the model's context raises ``ValueError``, unless
    ``truncate`` keeps its last tokens.
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_sampling(temperature, top_p, top_k)
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_utf8(p, f"prompt {i}")
    max_seq_len = model.args.max_seq_len
    encoded = [
        tokenizer.encode(p, bos=bos) if isinstance(p, str) else [int(t) for t in p] for p in prompts
    ]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} is empty (encode with bos=True to start from nothing)")
        if len(ids) >= max_seq_len:
            if not truncate:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens but the model's context is {max_seq_len}; "
                    "shorten it or pass truncate=True (--truncate) to keep its last tokens"
                )
            encoded[i] = ids[-(max_seq_len - min(max_new_tokens, max_seq_len // 2)) :]

    device = next(model.parameters()).device
    bsz = len(encoded)
    lengths = [len(ids) for ids in encoded]
    total_len = min(max_seq_len, max(lengths) + max_new_tokens)
    tokens = torch.full((bsz, total_len), tokenizer.eos_id, dtype=torch.long, device=device)
    in_prompt = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
    for i, ids in enumerate(encoded):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        in_prompt[i, : len(ids)] = True
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    generated: list[list[int]] = [[] for _ in range(bsz)]
    logprobs: list[list[float]] = [[] for _ in range(bsz)]
    finish: list[str | None] = [None] * bsz
    trackers = [_TextTracker(tokenizer, ids) for ids in encoded]
    texts = [""] * bsz
    follow_text = bool(stop) or on_text is not None  # else decode once at the end

    model.setup_cache(bsz, total_len)
    try:
        prev = 0
        for cur in range(min(lengths), total_len):
            logits = model(tokens[:, prev:cur], prev, last_only=True)[:, -1].float()
            if not bool(torch.isfinite(logits).all()):  # never sample text from garbage
                raise ValueError(
                    f"the model's logits at position {cur} are NaN or Inf (non-finite "
                    "weights or activations): no text can be generated from it"
                )
            nxt = sample(logits, temperature, top_p, top_k, generator)
            nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
            tokens[:, cur] = nxt
            prev = cur
            chosen_logprobs = torch.log_softmax(logits, -1).gather(-1, nxt[:, None])[:, 0]
            for i, (token, lp) in enumerate(zip(nxt.tolist(), chosen_logprobs.tolist())):
                if finish[i] is not None or cur < lengths[i]:
                    continue
                if stop_at_eos and token == tokenizer.eos_id:
                    finish[i] = "eos"
                else:
                    generated[i].append(token)
                    logprobs[i].append(lp)
                    if follow_text:
                        texts[i] = trackers[i].text(generated[i])
                    hit = min((texts[i].find(s) for s in stop if s in texts[i]), default=-1)
                    if hit >= 0:
                        texts[i], finish[i] = texts[i][:hit], "stop"
                    elif len(generated[i]) >= max_new_tokens:
                        finish[i] = "length"
                    elif cur == total_len - 1:
                        finish[i] = "context"
                if on_text is not None:
                    delta = trackers[i].delta(texts[i], final=finish[i] is not None)
                    if delta:
                        on_text(i, delta)
            if all(f is not None for f in finish):
                break
    finally:
        model.clear_cache()

    out = []
    for i in range(bsz):
        reason = finish[i] or ("length" if len(generated[i]) >= max_new_tokens else "context")
        if reason != "stop":
            texts[i] = trackers[i].text(generated[i])
        text = trackers[i].prefix + texts[i] if echo else texts[i]
        toks = encoded[i] + generated[i] if echo else generated[i]
        out.append(Completion(text, toks, encoded[i], reason, logprobs[i]))
    return out


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
