"""Per-row logits processing for the serving engine: penalties, logit bias, min_tokens and
grammar masks, for a whole batch at once.

The penalties, as the batched sampler's ``bias`` (`inference.sampler.sample_batch`: added to
the raw logits, so that reported log-probabilities stay the model's own), in this order:
  - ``repetition_penalty`` r (HF transformers' / CTRL's): the logit l of every token seen in
    the prompt or the output becomes l / r when positive, l * r when not;
  - ``frequency_penalty`` f and ``presence_penalty`` p (OpenAI's): l - c * f - (c > 0) * p,
    c the times the token was generated so far;
  - ``logit_bias``: its value added to its token's logit.
``min_tokens`` masks the eos token and ``stop_token_ids`` (through the sampler's
``allowed``) until that many tokens are generated; a grammar row's matcher masks what its
grammar does not allow next.

State lives on the device in slots of `LogitsState` tables: the output token counts
(slots, vocab), updated with one scatter-add per step from the sampled tokens; the tokens
seen in the prompt (slots, vocab); each slot's bias row and settings. A request that needs
none of it takes no slot and costs nothing; a step where no row needs any passes no
``allowed`` nor ``bias`` at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from llamaforge.serve.grammar import Grammar, RowMatcher, bitmask_for, unpack_bitmask

__all__ = ["LogitsState", "RowLogits", "Shaping"]


@dataclass(frozen=True)
class Shaping:
    """A request's logits settings (see the module's docstring); `active` when any of them
    changes anything."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop_token_ids: Sequence[int] = ()
    grammar: Grammar | None = None

    @property
    def penalised(self) -> bool:
        """Whether the row needs a slot (counts, bias row)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )

    @property
    def active(self) -> bool:
        return self.penalised or self.min_tokens > 0 or self.grammar is not None


@dataclass(eq=False)
class RowLogits:
    """One request's processing state: its slot in the tables (None: no penalties), the
    tokens masked until ``min_tokens``, its grammar matcher."""

    shaping: Shaping
    slot: int | None
    early_stops: list[int]
    matcher: RowMatcher | None = None
    generated: int = 0  # tokens sampled so far (eos included)


class LogitsState:
    """The engine's per-row processing tables on ``device`` for a vocabulary of ``vocab``
    tokens (slots grow as needed: doubling)."""

    def __init__(self, vocab: int, device: torch.device, eos_id: int, slots: int = 4) -> None:
        self.vocab, self.device, self.eos_id = vocab, device, eos_id
        self._free: list[int] = []
        self._size = 0
        self._alloc(slots)

    def _alloc(self, slots: int) -> None:
        """Grow every table to ``slots`` rows, keeping the rows held."""
        held = self._size

        def grow(old: torch.Tensor | None, *shape: int, dtype: torch.dtype) -> torch.Tensor:
            new = torch.zeros(slots, *shape, dtype=dtype, device=self.device)
            if old is not None:
                new[:held] = old
            return new

        first = held == 0
        self.counts = grow(None if first else self.counts, self.vocab, dtype=torch.float32)
        self.seen = grow(None if first else self.seen, self.vocab, dtype=torch.bool)
        self.bias = grow(None if first else self.bias, self.vocab, dtype=torch.float32)
        # each slot's presence, frequency and repetition penalties
        self.settings = grow(None if first else self.settings, 3, dtype=torch.float32)
        self._free += range(held, slots)
        self._size = slots

    def open(self, shaping: Shaping, prompt: Sequence[int]) -> RowLogits | None:
        """A request's state (None when its settings change nothing)."""
        if not shaping.active:
            return None
        slot = None
        if shaping.penalised:
            if not self._free:
                self._alloc(self._size * 2)
            slot = self._free.pop()
            self.counts[slot].zero_()
            self.seen[slot].zero_()
            self.seen[slot, torch.tensor(sorted(set(prompt)), device=self.device)] = True
            self.bias[slot].zero_()
            if shaping.logit_bias:
                ids = torch.tensor(list(shaping.logit_bias), device=self.device)
                vals = torch.tensor(list(shaping.logit_bias.values()), device=self.device)
                self.bias[slot, ids] = vals.float()
            s = shaping
            self.settings[slot] = torch.tensor(
                [s.presence_penalty, s.frequency_penalty, s.repetition_penalty]
            )
        matcher = shaping.grammar.matcher() if shaping.grammar is not None else None
        early = [self.eos_id, *shaping.stop_token_ids] if shaping.min_tokens else []
        return RowLogits(shaping, slot, early, matcher)

    def close(self, row: RowLogits | None) -> None:
        """Give ``row``'s slot back (once)."""
        if row is not None and row.slot is not None:
            self._free.append(row.slot)
            row.slot = None

    def shape(
        self, rows: Sequence[RowLogits | None], logits: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sampler's ``allowed`` and ``bias`` for ``logits`` (n, vocab), row i shaped by
        ``rows[i]`` (None: untouched); (None, None) when no row is shaped."""
        return self._allowed(rows, logits), self._bias(rows, logits)

    def _bias(self, rows: Sequence[RowLogits | None], logits: torch.Tensor) -> torch.Tensor | None:
        at = [i for i, r in enumerate(rows) if r is not None and r.slot is not None]
        if not at:
            return None
        slots = torch.tensor([rows[i].slot for i in at], device=self.device)  # type: ignore[union-attr]
        raw = logits[torch.tensor(at, device=logits.device)].float()
        new = penalise(
            raw, self.counts[slots], self.seen[slots], self.settings[slots], self.bias[slots]
        )
        bias = torch.zeros_like(logits, dtype=torch.float32)
        bias[torch.tensor(at, device=logits.device)] = new - raw
        return bias

    def _allowed(
        self, rows: Sequence[RowLogits | None], logits: torch.Tensor
    ) -> torch.Tensor | None:
        grammar = [i for i, r in enumerate(rows) if r is not None and r.matcher is not None]
        early = [
            i
            for i, r in enumerate(rows)
            if r is not None and r.early_stops and r.generated < r.shaping.min_tokens
        ]
        if not grammar and not early:
            return None
        n = logits.shape[0]
        allowed = torch.ones(n, self.vocab, dtype=torch.bool)
        if grammar:
            bits = bitmask_for(len(grammar), self.vocab)
            for j, i in enumerate(grammar):
                rows[i].matcher.fill(bits, j)  # type: ignore[union-attr]
            allowed[torch.tensor(grammar)] = unpack_bitmask(bits, self.vocab)
            for i in grammar:
                banned = rows[i].matcher.grammar.banned  # type: ignore[union-attr]
                if banned:
                    allowed[i, banned] = False
        for i in early:
            allowed[i, rows[i].early_stops] = False  # type: ignore[union-attr]
        return allowed.to(logits.device, non_blocking=True)

    def count(self, rows: Sequence[RowLogits | None], tokens: torch.Tensor) -> None:
        """Each shaped row generated ``tokens[i]`` ((n,), on the device): one scatter-add
        into the counts of the rows with slots."""
        at = [i for i, r in enumerate(rows) if r is not None and r.slot is not None]
        for r in rows:
            if r is not None:
                r.generated += 1
        if not at:
            return
        slots = torch.tensor([rows[i].slot for i in at], device=self.device)  # type: ignore[union-attr]
        picked = tokens[torch.tensor(at, device=tokens.device)]
        ones = torch.ones(len(at), device=self.device)
        self.counts.index_put_((slots, picked), ones, accumulate=True)


def penalise(
    raw: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    settings: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """The processed logits of rows ``raw`` (m, vocab): repetition penalty on the tokens
    ``seen`` in the prompt or generated (``counts`` > 0), then the frequency and presence
    penalties, then ``bias``; ``settings`` (m, 3) holds each row's presence, frequency and
    repetition penalties."""
    presence, frequency, repetition = settings[:, 0:1], settings[:, 1:2], settings[:, 2:3]
    generated = counts > 0
    hit = seen | generated
    out = torch.where(hit, torch.where(raw > 0, raw / repetition, raw * repetition), raw)
    out = out - counts * frequency - generated.float() * presence
    return out + bias
