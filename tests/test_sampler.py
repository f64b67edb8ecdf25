"""The batched sampler (`inference.sampler`): greedy rows, Meta's top-k/top-p supports, seeds
per row whatever the batch, the drawn distribution, log-probabilities, the allowed/bias hooks
and bad settings. Every check uses fixed seeds: nothing here is left to chance."""

import pytest
import torch

from llamaforge.inference.generate import sample, sample_top_p
from llamaforge.inference.sampler import (
    RowSampling,
    filtered_probs,
    sample_batch,
)

from .conftest import tiny_model


def _logits(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _metas_support(logits: torch.Tensor, row: RowSampling) -> set[int]:
    """The tokens Meta's rule can draw, computed directly: logits / temperature, all but the
    top_k largest at -inf, softmax, then keep the sorted tokens whose mass before them is at
    most top_p."""
    x = logits.float() / row.temperature
    if row.top_k is not None and row.top_k < x.shape[-1]:
        x = x.masked_fill(x < torch.topk(x, row.top_k).values[-1], float("-inf"))
    probs = torch.softmax(x, -1)
    ordered, ids = torch.sort(probs, descending=True)
    keep = ordered > 0
    if row.top_p < 1.0:
        keep &= ordered.cumsum(-1) - ordered <= row.top_p
    return set(ids[keep].tolist())


def _mixed_rows(seed: int | None = None) -> list[RowSampling]:
    g = None if seed is None else _gen(seed)
    return [
        RowSampling(0.0, logprobs=2),
        RowSampling(1.0, generator=g),
        RowSampling(0.7, top_p=0.9),
        RowSampling(1.2, top_k=5, logprobs=0),
        RowSampling(0.0),
        RowSampling(0.5, top_p=0.6, top_k=40, logprobs=4),
    ]


def test_greedy_rows_are_the_argmax_in_a_mixed_batch():
    logits = _logits(6, 1000, 0)
    rows = _mixed_rows()
    out = sample_batch(logits, rows).to_host()
    best = logits.argmax(-1).tolist()
    assert [out[0].token, out[4].token] == [best[0], best[4]]
    assert [o.token for o in sample_batch(logits, [RowSampling(0.0)] * 6).to_host()] == best
    assert sample(logits, 0.0).tolist() == best
    # a temperature too small for a float32 quotient samples as greedy, not from NaN
    tiny = [RowSampling(1e-40, generator=_gen(1)), RowSampling(1e-40, top_p=0.5, top_k=3)]
    assert [o.token for o in sample_batch(logits[:2], tiny).to_host()] == best[:2]


def test_supports_are_metas_top_k_and_top_p_rule():
    """Per row temperature, top-k and top-p in one batch: the tokens with probability > 0
    are exactly those of Meta's rule computed directly, and draws stay inside them."""
    vocab, settings = 300, []
    for t in (0.5, 1.0, 1.7):
        for p in (0.2, 0.5, 0.9, 0.99, 1.0):
            for k in (None, 1, 7, 60, vocab):
                settings.append(RowSampling(t, top_p=p, top_k=k))
    logits = _logits(len(settings), vocab, 1)
    probs = filtered_probs(logits, settings)
    supports = [_metas_support(logits[i], r) for i, r in enumerate(settings)]
    for i in range(len(settings)):
        assert set(probs[i].nonzero()[:, 0].tolist()) == supports[i], settings[i]
    assert torch.allclose(probs.sum(-1), torch.ones(len(settings)))
    assert {len(s) for s in supports} > {1, 7}  # the cuts really differ between rows
    g = _gen(2)
    rows = [RowSampling(r.temperature, r.top_p, r.top_k, generator=g) for r in settings]
    for _ in range(20):
        for i, o in enumerate(sample_batch(logits, rows).to_host()):
            assert o.token in supports[i]
    # the worked example of Meta's rule: mass before each sorted token 0, .5, .8, .95
    probs4 = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert {int(sample_top_p(probs4, 0.7, g)) for _ in range(200)} == {1, 3}
    assert {int(sample_top_p(probs4, 0.4, g)) for _ in range(50)} == {1}


def test_supports_whatever_the_nucleus_width():
    """Distributions from peaked to flat over 5000 tokens, so that the rule's cut falls
    within the 64 likeliest tokens, within 1024, or beyond (on the CPU the sampler looks
    at those heads first), and top-k with ties at the k-th logit spilling past a head:
    always Meta's support, float32 rounding included."""
    vocab, rows, logits = 5000, [], []
    for i, scale in enumerate((12.0, 6.0, 3.0, 1.5, 0.5, 0.1)):
        for p in (0.5, 0.9, 0.999):
            rows.append(RowSampling(1.0, top_p=p))
            logits.append(_logits(1, vocab, 20 + i, scale)[0])
    tied = _logits(3, vocab, 30).round()  # integer logits: large groups of equal values
    for k in (50, 900, 1500):
        for t in range(3):
            rows.append(RowSampling(1.0, top_k=k))
            logits.append(tied[t])
    logits = torch.stack(logits)
    probs = filtered_probs(logits, rows)
    sizes = []
    for i, r in enumerate(rows):
        want = _metas_support(logits[i], r)
        assert set(probs[i].nonzero()[:, 0].tolist()) == want, (i, r)
        sizes.append(len(want))
    assert min(sizes) < 64 and any(64 < s < 1024 for s in sizes) and max(sizes) > 1024
    g = _gen(21)
    seeded = [RowSampling(r.temperature, r.top_p, r.top_k, generator=g) for r in rows]
    for _ in range(5):
        for i, o in enumerate(sample_batch(logits, seeded).to_host()):
            assert probs[i, o.token] > 0


def test_a_seeded_row_ignores_the_rest_of_the_batch():
    """A row with its own generator draws the same tokens alone, at any position, next to
    greedy, filtered and unseeded rows, on a real model's logits."""
    model = tiny_model(512)
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 40, 41, 42], [1, 7, 8, 9], [1, 300, 2, 5]]))[:, -1]
    seeded = [RowSampling(1.0), RowSampling(0.8, top_p=0.9, top_k=50)]

    def run(row: int, settings: RowSampling, batch: list[RowSampling], at: int) -> list[int]:
        mine = RowSampling(settings.temperature, settings.top_p, settings.top_k, _gen(11))
        rows = batch[:at] + [mine] + batch[at:]
        others = logits[[i % 3 for i in range(len(batch))]]
        stack = torch.cat([others[:at], logits[row : row + 1], others[at:]])
        return [sample_batch(stack, rows).to_host()[at].token for _ in range(40)]

    for row in range(3):
        for settings in seeded:
            alone = run(row, settings, [], 0)
            assert len(set(alone)) > 1  # really sampled
            assert run(row, settings, _mixed_rows(5), 3) == alone
            assert run(row, settings, _mixed_rows(), 6) == alone
            assert run(row, settings, [RowSampling(0.0)] * 4, 1) == alone
    # the same settings and generator through `generate.sample`, one row: the same tokens
    g, mine = _gen(11), RowSampling(1.0, generator=_gen(11))
    via_sample = [int(sample(logits[:1], 1.0, generator=g)) for _ in range(10)]
    assert via_sample == [sample_batch(logits[:1], [mine]).to_host()[0].token for _ in range(10)]


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0),
        dict(temperature=0.6, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_p=0.9, top_k=7, bias=True, allowed=True),
    ],
)
def test_draws_follow_the_filtered_distribution(settings):
    """20,000 seeded draws of one row's distribution (over 12 tokens): total variation from
    `filtered_probs` under 0.02 and a chi-square far below any real disagreement; tokens
    outside the support never drawn."""
    vocab, n = 12, 20_000
    logits = torch.tensor([[2.0, 1.5, 1.4, 1.0, 0.5, 0.3, 0.0, -0.2, -0.5, -1.0, -1.5, -3.0]])
    bias = allowed = None
    if settings.pop("bias", False):
        bias = torch.zeros(1, vocab)
        bias[0, 6] = 2.0
    if settings.pop("allowed", False):
        allowed = torch.ones(1, vocab, dtype=torch.bool)
        allowed[0, [0, 4]] = False
    row = RowSampling(**settings, generator=_gen(3))
    hooks = dict(
        allowed=None if allowed is None else allowed.expand(n, vocab),
        bias=None if bias is None else bias.expand(n, vocab),
    )
    probs = filtered_probs(logits, [row], allowed=allowed, bias=bias)[0]
    drawn = sample_batch(logits.expand(n, vocab), [row] * n, **hooks).tokens
    freq = torch.bincount(drawn, minlength=vocab).float() / n
    assert (freq[probs == 0] == 0).all()
    assert 0.5 * (freq - probs).abs().sum() < 0.02, (freq, probs)
    kept = probs > 0
    chi2 = float((n * (freq[kept] - probs[kept]) ** 2 / probs[kept]).sum())
    assert chi2 < 40, (chi2, freq, probs)  # df <= 11: p < 1e-4 for a fair sampler


def test_logprobs_are_the_models_log_softmax():
    """The chosen and top logprobs are log_softmax of the raw logits, whatever the
    temperature, cut, bias or mask; rows that did not ask get no top list."""
    logits = _logits(6, 700, 4)
    bias = torch.zeros(6, 700)
    bias[:, 3] = 5.0
    allowed = torch.rand(6, 700, generator=_gen(5)) > 0.3
    lsm = torch.log_softmax(logits, -1)
    rows = _mixed_rows(6)
    for hooks in (dict(), dict(bias=bias, allowed=allowed)):
        out = sample_batch(logits, rows, **hooks).to_host()
        for i, (o, r) in enumerate(zip(out, rows)):
            assert o.error is None
            assert o.logprob == pytest.approx(float(lsm[i, o.token]), abs=1e-5)
            want = torch.topk(lsm[i], r.logprobs or 0)
            assert [t for t, _ in o.top] == want.indices.tolist()
            assert [v for _, v in o.top] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert [len(o.top) for o in out] == [2, 0, 0, 0, 0, 4]


def test_allowed_and_bias_shape_every_row():
    """A masked token is never chosen (greedy included), a bias moves greedy and sampled
    rows alike, and a row with nothing allowed or with NaN logits fails alone."""
    n, vocab = 6, 200
    logits = _logits(n, vocab, 7)
    allowed = torch.zeros(n, vocab, dtype=torch.bool)
    allowed[:, 100:110] = True
    rows = _mixed_rows(8)
    for _ in range(30):
        out = sample_batch(logits, rows, allowed=allowed).to_host()
        assert all(100 <= o.token < 110 for o in out)
    best_allowed = 100 + logits[:, 100:110].argmax(-1)
    assert out[0].token == best_allowed[0] and out[4].token == best_allowed[4]

    bias = torch.zeros(n, vocab)
    bias[:, 42] = 1e4
    assert {o.token for o in sample_batch(logits, rows, bias=bias).to_host()} == {42}
    bias = torch.zeros(n, vocab)
    bias[torch.arange(n), logits.argmax(-1)] = float("-inf")  # rule out each row's best
    out = sample_batch(logits, [RowSampling(0.0)] * n, bias=bias).to_host()
    assert [o.token for o in out] == torch.topk(logits, 2).indices[:, 1].tolist()

    allowed = torch.ones(n, vocab, dtype=torch.bool)
    allowed[2] = False
    broken = logits.clone()
    broken[4, 9] = float("nan")
    out = sample_batch(broken, rows, allowed=allowed).to_host()
    assert [o.error is None for o in out] == [True, True, False, True, False, True]
    assert "no token is allowed" in out[2].error and "NaN" in out[4].error
    assert out[0].token == int(logits[0].argmax())


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=-0.5), "temperature -0.5"),
        (dict(temperature=float("nan")), "temperature nan"),
        (dict(temperature=1.0, top_p=0.0), "top_p 0.0"),
        (dict(temperature=1.0, top_p=1.5), "top_p 1.5"),
        (dict(temperature=1.0, top_k=0), "top_k 0"),
        (dict(temperature=1.0, logprobs=-1), "logprobs -1"),
    ],
)
def test_bad_settings_raise_naming_the_value(settings, message):
    with pytest.raises(ValueError, match=message):
        RowSampling(**settings)


def test_bad_batches_raise_naming_the_value():
    logits, rows = _logits(3, 50, 9), [RowSampling(1.0)] * 3
    with pytest.raises(ValueError, match="2 row settings for 3 rows"):
        sample_batch(logits, rows[:2])
    with pytest.raises(ValueError, match=r"logits of shape \(50,\)"):
        sample_batch(logits[0], rows)
    with pytest.raises(ValueError, match=r"allowed of shape \(3, 49\)"):
        sample_batch(logits, rows, allowed=torch.ones(3, 49, dtype=torch.bool))
    with pytest.raises(ValueError, match="allowed has dtype torch.float32"):
        sample_batch(logits, rows, allowed=torch.ones(3, 50))
    with pytest.raises(ValueError, match=r"bias of shape \(1, 50\)"):
        sample_batch(logits, rows, bias=torch.zeros(1, 50))
