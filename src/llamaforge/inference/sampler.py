"""Sampling the next token for a whole batch on the device, each row with its own settings.

A row is greedy (temperature 0) or samples from its logits divided by its temperature, cut to
its ``top_k`` likeliest tokens and then by Meta's ``sample_top_p`` nucleus rule (keep the
smallest prefix of the sorted distribution whose mass before each token is at most ``top_p``).
Greedy and sampled rows, filtered and unfiltered ones, share one batch: the work is a handful
of batched kernels (a max, a softmax, one sort for the rows that filter, a cumulative sum and
a search), and `SampleResult.to_host` brings everything the caller needs back in one copy.

Each sampled row draws one uniform number per step from its own ``torch.Generator`` (rows
without one share torch's default generator) and takes the token where that number falls in
its cumulative distribution: the inverse-CDF rule, summed in float64 so that the draw is
exact to far below the float32 probabilities. A seeded row therefore gives the same tokens
whatever else is in the batch and wherever it sits; rows that filter walk their distribution
in descending order, the others in vocabulary order.

Two hooks shape the distribution before any of that: ``allowed`` (bool (n, vocab): False
tokens are never chosen, greedy included) and ``bias`` (float (n, vocab), added to the
logits). Log-probabilities are always those of the model's raw logits (log_softmax), as the
server reports them, whatever the temperature, cut, bias or mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Token ids travel back to the host inside one float32 tensor: exact below 2**24.
_MAX_VOCAB = 2**24
# On the CPU, the top-k/top-p rule first looks at this many likeliest tokens (`_nucleus`).
_HEADS = (64, 1024)
_ERRORS = (
    None,
    "the model's logits are NaN or Inf: no text can be generated",
    "no token is allowed for this row (its mask or bias rules out every token)",
)


def check_sampling(temperature: float, top_p: float, top_k: int | None = None) -> None:
    """Raise ValueError naming the first sampling setting that cannot work: temperature
    must be finite and >= 0 (0: greedy), top_p in (0, 1], top_k None (off) or >= 1."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature {temperature}: must be a finite number >= 0 (0: greedy)")
    if not 0.0 < top_p <= 1.0:  # also refuses nan
        raise ValueError(f"top_p {top_p}: must be in (0, 1] (1: no nucleus cut)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k {top_k}: must be at least 1 (leave it unset for no top-k)")


@dataclass(frozen=True)
class RowSampling:
    """One row's sampling settings: ``temperature`` 0 is greedy; ``top_p`` Meta's nucleus cut
    (1: none); ``top_k`` the likeliest tokens kept (None: all); ``generator`` the source of the
    row's random numbers (None: torch's default one, shared); ``logprobs`` how many of the
    likeliest tokens' log-probabilities to report besides the chosen one's (None or 0:
    none). Bad values raise ValueError naming them."""

    temperature: float
    top_p: float = 1.0
    top_k: int | None = None
    generator: torch.Generator | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k)
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs {self.logprobs}: must be at least 0 (None: none)")

    def filters(self, vocab: int) -> bool:
        """Whether sampling this row cuts its distribution (top-k or top-p)."""
        return self.top_p < 1.0 or (self.top_k is not None and self.top_k < vocab)


@dataclass
class SampledToken:
    """One row's result on the host: the token, its log-probability under the model, the
    ``logprobs`` likeliest (token, log-probability) pairs when the row asked for them (else
    empty), and ``error`` when no token could be chosen (the token is then meaningless)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


@dataclass
class SampleResult:
    """What `sample_batch` computed, still on the device: ``tokens`` (n,), their
    log-probabilities ``logprobs`` (n,), ``status`` (n,) (0: fine, else an index into the
    errors), and for the rows ``top_rows`` (host list) that asked for ``top_counts`` (host
    list) likeliest tokens, ``top_ids`` and ``top_logprobs`` (len(top_rows), K) of their K
    likeliest (K: the most asked)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    status: torch.Tensor
    top_rows: list[int]
    top_counts: list[int]
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def to_host(self) -> list[SampledToken]:
        """Every row's result, brought to the host in one transfer."""
        n = self.tokens.shape[0]
        parts = [self.tokens.float(), self.logprobs.float(), self.status.float()]
        if self.top_ids is not None and self.top_logprobs is not None:
            parts += [self.top_ids.float().flatten(), self.top_logprobs.float().flatten()]
        flat = torch.cat(parts).tolist()  # the one device-to-host copy
        out = [
            SampledToken(int(t), lp, error=_ERRORS[int(s)])
            for t, lp, s in zip(flat[:n], flat[n : 2 * n], flat[2 * n : 3 * n])
        ]
        if self.top_rows:
            width = max(self.top_counts)
            ids_at, vals_at = 3 * n, 3 * n + len(self.top_rows) * width
            for j, (row, count) in enumerate(zip(self.top_rows, self.top_counts)):
                ids = flat[ids_at + j * width : ids_at + j * width + count]
                vals = flat[vals_at + j * width : vals_at + j * width + count]
                out[row].top = [(int(i), v) for i, v in zip(ids, vals)]
        return out


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``, copied without waiting for the device
    (a blocking copy would stall the host until the forward pass before it finishes)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check_batch(
    logits: torch.Tensor,
    rows: Sequence[RowSampling],
    allowed: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits of shape {tuple(logits.shape)}: expected (rows, vocab)")
    if len(rows) != logits.shape[0]:
        raise ValueError(f"{len(rows)} row settings for {logits.shape[0]} rows of logits")
    if logits.shape[1] >= _MAX_VOCAB:
        raise ValueError(f"vocab {logits.shape[1]}: the sampler supports fewer than 2**24")
    for name, t in (("allowed", allowed), ("bias", bias)):
        if t is not None and (t.shape != logits.shape or t.device != logits.device):
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} on {t.device}: expected "
                f"{tuple(logits.shape)} on {logits.device}, like the logits"
            )
    if allowed is not None and allowed.dtype != torch.bool:
        raise ValueError(f"allowed has dtype {allowed.dtype}: expected torch.bool")


def _scores(
    raw: torch.Tensor, allowed: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """The logits sampling works on: ``raw`` plus ``bias``, -inf where not ``allowed``."""
    scores = raw if bias is None else raw + bias.float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def _uniforms(rows: Sequence[RowSampling], device: torch.device) -> torch.Tensor:
    """One uniform draw in [0, 1) per row (float64, on ``device``), from each row's own
    generator; rows sharing a generator draw from it together, in row order."""
    groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(id(r.generator), (r.generator, []))[1].append(i)
    parts, order = [], []
    for gen, idx in groups.values():
        where = device if gen is None else gen.device
        u = torch.rand(len(idx), generator=gen, device=where, dtype=torch.float64)
        if u.device != device:
            u = u.pin_memory() if device.type == "cuda" else u
            u = u.to(device, non_blocking=True)
        parts.append(u)
        order += idx
    u = torch.cat(parts)
    if order == sorted(order):
        return u
    inverse = [0] * len(order)
    for at, i in enumerate(order):
        inverse[i] = at
    return u[_to_device(inverse, torch.long, device)]


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row of ``weights`` (m, V) (non-negative, any total), the first index where
    the running sum exceeds ``u`` (m,) times the total: a draw in proportion to the weights
    (an index of weight 0 is never chosen)."""
    cdf = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)


def _head(
    scaled: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Meta's rule on the ``width`` likeliest tokens of each row of ``scaled`` (m, V): their
    kept probabilities in descending order (the others 0; not renormalised), their token
    ids, and whether the rule keeps no token outside them (m,) (bool)."""
    vocab = scaled.shape[1]
    if width < vocab:
        ordered, ids = torch.topk(scaled, width, dim=-1)
    else:  # each row sorted on its own: its ties keep one order whatever the batch (on a
        # GPU, stable to be sure; on the CPU a stable sort costs twice as much)
        stable = scaled.device.type != "cpu"
        ordered, ids = torch.sort(scaled, dim=-1, descending=True, stable=stable)
    last = ordered[:, -1]
    in_head = top_k <= width  # a top-k cut that lies within the head
    kth = ordered.gather(-1, (top_k.clamp(max=width) - 1)[:, None])
    # The probabilities as Meta's code computes them (softmax over the whole row, top-k cut
    # first), so that the cumulative sums below are its own, rounding included.
    cut = in_head[:, None] & (scaled < kth)
    probs = torch.softmax(scaled.masked_fill(cut, float("-inf")), dim=-1).gather(-1, ids)
    mass = probs.cumsum(dim=-1)
    kept = probs.masked_fill(mass - probs > top_p[:, None], 0.0)
    # A token outside the head is cut when the head holds the whole top-k (no tie with the
    # k-th beyond it), or when the mass before it, the head's, is over top_p.
    covered = (in_head & (last < kth[:, 0])) | (mass[:, -1] > top_p)
    return kept, ids, covered | (width >= vocab)


def _nucleus(
    scaled: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta's rule on tempered logits ``scaled`` (m, V) with per-row ``top_p`` (m,) (inf: no
    cut) and ``top_k`` (m,) (V: none), as the sampler of Meta's code with a top-k cut first
    (tokens tied at the k-th logit all kept): the kept probabilities in descending order
    (not renormalised; the others 0) and the token id at each place. On a GPU the rows are
    sorted whole; on the CPU, where sorting dominates and reading a flag back costs nothing,
    only the rows whose cut reaches past the 64, then 1024, likeliest tokens are."""
    vocab = scaled.shape[1]
    heads = [w for w in _HEADS if w < vocab] if scaled.device.type == "cpu" else []
    kept, ids, covered = _head(scaled, top_p, top_k, heads[0] if heads else vocab)
    todo = (~covered).nonzero()[:, 0] if heads else None
    for width in heads[1:] + [vocab]:
        if todo is None or len(todo) == 0:
            break
        part, part_ids, covered = _head(scaled[todo], top_p[todo], top_k[todo], width)
        grow = (0, width - kept.shape[1])  # zero probabilities: never drawn
        kept, ids = torch.nn.functional.pad(kept, grow), torch.nn.functional.pad(ids, grow)
        kept[todo], ids[todo] = part, part_ids
        todo = todo[~covered]
    return kept, ids


@dataclass
class _Plan:
    """Which rows sample and how (host lists, known without asking the device)."""

    sampled: list[int]  # rows with temperature > 0
    plain: list[int]  # of those (positions in ``sampled``), the ones that do not filter
    filtered: list[int]  # and the ones that do

    @classmethod
    def of(cls, rows: Sequence[RowSampling], vocab: int) -> _Plan:
        sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
        plain = [j for j, i in enumerate(sampled) if not rows[i].filters(vocab)]
        filtered = [j for j, i in enumerate(sampled) if rows[i].filters(vocab)]
        return cls(sampled, plain, filtered)


def _subset(t: torch.Tensor, idx: list[int], total: int) -> torch.Tensor:
    """Rows ``idx`` of ``t`` (``t`` itself when they are all ``total`` rows in order)."""
    if len(idx) == total:
        return t
    return t.index_select(0, _to_device(idx, torch.long, t.device))


def _tempered(scores: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """``scores`` divided by each row's temperature (at least 1e-30, so that a float32
    quotient stays finite: below that, sampling is greedy anyway)."""
    floors = [max(r.temperature, 1e-30) for r in rows]
    temps = _to_device(floors, torch.float32, scores.device)
    return scores / temps[:, None]


def _filter_settings(
    rows: Sequence[RowSampling], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    top_p = [r.top_p if r.top_p < 1.0 else float("inf") for r in rows]
    top_k = [min(r.top_k, vocab) if r.top_k is not None else vocab for r in rows]
    return _to_device(top_p, torch.float32, device), _to_device(top_k, torch.long, device)


def _draw(scores: torch.Tensor, rows: Sequence[RowSampling], plan: _Plan) -> torch.Tensor:
    """Sampled tokens (m,) from the scores (m, V) of the rows that sample, ``rows``."""
    m, vocab = scores.shape
    scaled = _tempered(scores, rows)
    u = _uniforms(rows, scores.device)
    tokens = torch.empty(m, dtype=torch.long, device=scores.device)
    for group in (plan.plain, plan.filtered):
        if not group:
            continue
        at = None if len(group) == m else _to_device(group, torch.long, scores.device)
        part, part_u = (scaled, u) if at is None else (scaled[at], u[at])
        if group is plan.plain:
            drawn = _inverse_cdf(torch.softmax(part, dim=-1), part_u)
        else:
            top_p, top_k = _filter_settings([rows[j] for j in group], vocab, scores.device)
            kept, ids = _nucleus(part, top_p, top_k)
            drawn = ids.gather(-1, _inverse_cdf(kept, part_u)[:, None])[:, 0]
        if at is None:
            return drawn
        tokens[at] = drawn
    return tokens


def _choose(
    raw: torch.Tensor,
    rows: Sequence[RowSampling],
    allowed: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (n,) from float32 logits ``raw``, and whether each row had a token to
    choose (n,) (some finite score)."""
    scores = _scores(raw, allowed, bias)
    best, tokens = scores.max(dim=-1)  # the greedy rows' choice
    plan = _Plan.of(rows, raw.shape[1])
    if plan.sampled:
        picked = [rows[i] for i in plan.sampled]
        drawn = _draw(_subset(scores, plan.sampled, len(rows)), picked, plan)
        if len(plan.sampled) == len(rows):
            tokens = drawn
        else:
            tokens[_to_device(plan.sampled, torch.long, raw.device)] = drawn
    return tokens, torch.isfinite(best)


@torch.no_grad()
def choose(
    logits: torch.Tensor,
    rows: Sequence[RowSampling],
    *,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token (n,) of each row of ``logits`` (n, vocab), on the device: `sample_batch`
    without log-probabilities or errors (a row with no finite score gets some token)."""
    _check_batch(logits, rows, allowed, bias)
    return _choose(logits.float(), rows, allowed, bias)[0]


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (n,) of ``tokens`` (n,) under the raw ``logits`` (n, vocab)."""
    raw = logits.float()
    return raw.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(raw, dim=-1)


@torch.no_grad()
def sample_batch(
    logits: torch.Tensor,
    rows: Sequence[RowSampling],
    *,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> SampleResult:
    """Choose the next token of every row of ``logits`` (n, vocab) with its settings
    ``rows`` (see the module's docstring for ``allowed`` and ``bias``), with the chosen
    tokens' log-probabilities and, for the rows that ask, their likeliest tokens'. Nothing
    leaves the device until `SampleResult.to_host`. A row whose logits are NaN or Inf, or
    that allows no token, gets an error there; the other rows are unaffected."""
    _check_batch(logits, rows, allowed, bias)
    n = len(rows)
    raw = logits.float()
    tokens, some = _choose(raw, rows, allowed, bias)
    lse = torch.logsumexp(raw, dim=-1)
    status = torch.where(torch.isfinite(lse), torch.where(some, 0, 2), 1)
    chosen = raw.gather(-1, tokens[:, None])[:, 0] - lse
    top_rows = [i for i, r in enumerate(rows) if r.logprobs]
    counts = [min(rows[i].logprobs or 0, logits.shape[1]) for i in top_rows]
    result = SampleResult(tokens, chosen, status, top_rows, counts)
    if top_rows:
        vals, ids = _subset(raw, top_rows, n).topk(max(counts), dim=-1)
        result.top_ids = ids
        result.top_logprobs = vals - _subset(lse[:, None], top_rows, n)
    return result


@torch.no_grad()
def filtered_probs(
    logits: torch.Tensor,
    rows: Sequence[RowSampling],
    *,
    allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distribution (n, vocab) each row of `sample_batch` draws from, in vocabulary
    order: tempered, cut by top-k and Meta's nucleus rule, renormalised (a greedy row: all
    its mass on its choice). For speculative decoding's rejection rule, and for tests."""
    _check_batch(logits, rows, allowed, bias)
    n, vocab = logits.shape
    scores = _scores(logits.float(), allowed, bias)
    probs = torch.zeros_like(scores)
    probs.scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
    plan = _Plan.of(rows, vocab)
    if not plan.sampled:
        return probs
    picked = [rows[i] for i in plan.sampled]
    scaled = _tempered(_subset(scores, plan.sampled, n), picked)
    cut = torch.softmax(scaled, dim=-1)
    if plan.filtered:
        at = _to_device(plan.filtered, torch.long, logits.device)
        top_p, top_k = _filter_settings([picked[j] for j in plan.filtered], vocab, logits.device)
        kept, ids = _nucleus(scaled[at], top_p, top_k)
        part = scores.new_zeros(len(plan.filtered), vocab).scatter_add_(-1, ids, kept)
        cut[at] = part / part.sum(dim=-1, keepdim=True)
    probs[_to_device(plan.sampled, torch.long, logits.device)] = cut
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index (n,) from each row of ``probs`` (n, vocab) (non-negative weights, any
    total) with one uniform number per row from ``generator`` (None: torch's default): the
    inverse-CDF rule `sample_batch` draws with."""
    where = probs.device if generator is None else generator.device
    u = torch.rand(probs.shape[0], generator=generator, device=where, dtype=torch.float64)
    return _inverse_cdf(probs, u.to(probs.device))
