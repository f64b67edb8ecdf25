"""Fast single-stream decoding: the static cache (eager and compiled), int8 weights on the
real llama2.c model, and speculative decoding, against ``generate_completions``."""

from __future__ import annotations

import copy

import pytest
import torch

import llamaforge
from llamaforge.checkpoint.convert.llama2c import import_llama2c
from llamaforge.cli.main import main
from llamaforge.inference.generate import FastGenerator, generate_completions
from llamaforge.inference.quantize import Int8Linear, quantize_int8

from .conftest import shared_file, tiny_model

GREEDY = dict(max_new_tokens=24, temperature=0.0, stop_at_eos=False)


@pytest.fixture(scope="module")
def model(small_tokenizer):
    return tiny_model(small_tokenizer.vocab_size)


@pytest.fixture(scope="module")
def llama2c(tmp_path_factory):
    out = tmp_path_factory.mktemp("l2c") / "aidreams260K"
    import_llama2c(
        shared_file("weights/llama2c/aidreams260K.bin"),
        shared_file("weights/llama2c/tok512.bin"),
        out,
    )
    return llamaforge.load(out)


PROMPTS = ["The value of", "def f(x):\n    return", "a"]


def test_static_cache_greedy_equals_generate_completions(model, small_tokenizer):
    fast = FastGenerator(model, small_tokenizer)
    for p in PROMPTS:
        ref = generate_completions(model, small_tokenizer, [p], **GREEDY)[0]
        got = fast.generate(p, **GREEDY)
        assert got.tokens == ref.tokens and got.text == ref.text
        assert got.finish_reason == ref.finish_reason == "length"
        assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert fast.stats.new_tokens == 24 and fast.stats.acceptance_rate is None


def test_static_cache_stops_like_generate_completions(model, small_tokenizer):
    """Stop strings, the end of the context, streaming and echo behave as in the batch path."""
    fast = FastGenerator(model, small_tokenizer)
    free = fast.generate("The", **GREEDY)
    stop = free.text[3:5]
    kw = dict(GREEDY, stop=[stop])
    ref = generate_completions(model, small_tokenizer, ["The"], **kw)[0]
    streamed: list[str] = []
    got = fast.generate("The", **kw, on_text=lambda row, d: streamed.append(d))
    assert (got.text, got.finish_reason) == (ref.text, "stop") and "".join(streamed) == got.text
    long = "word " * 20
    kw = dict(GREEDY, max_new_tokens=200, echo=True)
    ref = generate_completions(model, small_tokenizer, [long], **kw)[0]
    got = fast.generate(long, **kw)
    assert got.finish_reason == ref.finish_reason == "context"
    assert (got.tokens, got.text) == (ref.tokens, ref.text)


@pytest.mark.slow
def test_compiled_decoding_equals_generate_completions(small_tokenizer):
    """torch.compile'd steps (fullgraph, static shapes): the same greedy tokens."""
    m = tiny_model(small_tokenizer.vocab_size, n_layers=1, dim=32)
    draft = copy.deepcopy(m)
    ref = generate_completions(m, small_tokenizer, ["The value of"], **GREEDY)[0]
    fast = FastGenerator(m, small_tokenizer, compile=True, draft=draft, draft_k=2)
    assert fast.generate("The value of", **GREEDY).tokens == ref.tokens
    assert fast.stats.acceptance_rate == 1.0
    q = quantize_int8(copy.deepcopy(m), cpu_bf16_compute=True)  # torch's int8 kernel, compiled
    eager = FastGenerator(q, small_tokenizer).generate("The value of", **GREEDY)
    compiled = FastGenerator(q, small_tokenizer, compile=True)
    assert compiled.generate("The value of", **GREEDY).tokens == eager.tokens


def test_int8_layers_and_dtypes(model):
    q = quantize_int8(copy.deepcopy(model))
    layers = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 2 * 7 + 1  # wq wk wv wo w1 w2 w3 per layer, and the output
    assert not any(type(m) is torch.nn.Linear for m in q.modules())
    assert q.output.weight.dtype == torch.float32  # dequantised view, for setup_cache & co
    x = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.inference_mode():
        ref = model(x)
        for m, dtype in (
            (q, torch.float32),
            (quantize_int8(copy.deepcopy(model).bfloat16()), None),
        ):
            out = m(x)
            assert out.dtype == (dtype or torch.bfloat16)
            # per-channel int8 of N(0, 0.02) weights: about 1 % of the logits' scale
            assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    lin = torch.nn.Linear(40, 24, bias=False)
    w = Int8Linear.from_linear(lin)
    err = (w.weight - lin.weight).abs()
    assert bool((err <= w.scales[:, None] / 2 + 1e-7).all())  # round to nearest, per row
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_int8(q)


def test_int8_on_the_llama2c_weights(llama2c):
    """Tolerance: every logit within 3 % of the largest |logit| (measured: 0.15 of 11.1) and
    every probability within 0.05; the same greedy text for 64 tokens."""
    model, tok = llama2c
    q = quantize_int8(copy.deepcopy(model))
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl", bos=True)])
    with torch.inference_mode():
        ref, got = model(ids), q(ids)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
    assert (got.softmax(-1) - ref.softmax(-1)).abs().max() <= 0.05
    kw = dict(max_new_tokens=64, temperature=0.0, stop_at_eos=False)
    plain = generate_completions(model, tok, ["Once upon a time"], **kw)[0]
    assert generate_completions(q, tok, ["Once upon a time"], **kw)[0].text == plain.text
    assert FastGenerator(q, tok).generate("Once upon a time", **kw).text == plain.text
    fast = quantize_int8(copy.deepcopy(model), cpu_bf16_compute=True)  # bf16 activations
    with torch.inference_mode():
        assert (fast(ids) - ref).abs().max() <= 0.05 * ref.abs().max()


def test_speculative_greedy_is_identical(model, small_tokenizer):
    v = small_tokenizer.vocab_size
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 1e-4)
    drafts = {"smaller": tiny_model(v, n_layers=1, dim=32, seed=1), "perturbed": perturbed}
    refs = {p: generate_completions(model, small_tokenizer, [p], **GREEDY)[0] for p in PROMPTS}
    for name, draft in drafts.items():
        for k in (1, 4):
            fast = FastGenerator(model, small_tokenizer, draft=draft, draft_k=k)
            for p, ref in refs.items():
                got = fast.generate(p, **GREEDY)
                assert got.tokens == ref.tokens, (name, k, p)
                assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
                rate = fast.stats.acceptance_rate
                assert rate is not None and 0.0 <= rate <= 1.0
    assert fast.stats.accepted > 0  # a near-copy agrees on some tokens
    same = FastGenerator(model, small_tokenizer, draft=model, draft_k=4)
    same.generate(PROMPTS[0], **GREEDY)
    assert same.stats.acceptance_rate == 1.0
    assert same.stats.target_forwards == 1 + 5  # prefill, then 5 tokens per verification


def test_speculative_sampling(model, small_tokenizer):
    """Sampling with a draft: seeded runs repeat, and a draft equal to the model is always
    accepted (p / q = 1)."""
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, stop_at_eos=False, seed=5)
    same = FastGenerator(model, small_tokenizer, draft=model, draft_k=3)
    a, b = same.generate("The", **kw), same.generate("The", **kw)
    assert a.tokens == b.tokens and len(a.tokens) == 16
    assert same.stats.acceptance_rate == 1.0
    other = FastGenerator(
        model, small_tokenizer, draft=tiny_model(512, n_layers=1, dim=32, seed=2), draft_k=3
    )
    c = other.generate("The", **kw)
    assert len(c.tokens) == 16 and 0.0 <= other.stats.acceptance_rate < 1.0


def test_rejection_rule_gives_the_models_distribution(model, small_tokenizer):
    """The accept/resample rule alone, on fixed distributions p (model) and q (draft) over
    five tokens: the first token it yields, with d ~ q drafted, is distributed as p."""
    fast = FastGenerator(model, small_tokenizer, draft=model, draft_k=1)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5], [0.0] * 5])  # (k+1, vocab)
    q_logits = torch.tensor([[-1.0, 0.0, 2.0, 1.0, 0.5]])  # (k, vocab): disagrees with p
    p = torch.softmax(p_logits[0], -1)
    g = torch.Generator().manual_seed(0)
    sampling = (1.0, 1.0, None, g)
    n, counts = 2000, torch.zeros(5)
    drafted = torch.multinomial(torch.softmax(q_logits[0], -1), n, replacement=True, generator=g)
    for d in drafted:
        accepted, extra = fast._accept(p_logits, q_logits, d[None], sampling)
        counts[int(d) if accepted else int(extra)] += 1
    assert 0.5 * (counts / n - p).abs().sum() < 0.04, (counts / n, p)  # q: 0.67 away


@pytest.mark.slow
def test_speculative_sampling_keeps_the_models_distribution():
    """The first two tokens after a prompt, sampled many times with a bad draft: their
    empirical distribution matches the model's own (exact, by enumeration), within
    sampling error."""
    torch.manual_seed(0)
    model = tiny_model(6, n_layers=1, dim=16, seed=3)
    draft = tiny_model(6, n_layers=1, dim=16, seed=4)
    with torch.no_grad():  # sharpen both so that they disagree in a visible way
        model.output.weight.mul_(40)
        draft.output.weight.mul_(40)

    class Ids:
        vocab_size, bos_id, eos_id, pad_id = 6, 1, 2, -1

        def decode(self, ids):
            return " ".join(map(str, ids))

    prompt = [1, 3]
    with torch.inference_mode():
        p1 = model(torch.tensor([prompt])).softmax(-1)[0, -1]
        seconds = model(torch.tensor([[*prompt, t] for t in range(6)])).softmax(-1)[:, -1]
    exact = p1[:, None] * seconds  # P(t1, t2)
    fast = FastGenerator(model, Ids(), draft=draft, draft_k=2)
    counts = torch.zeros(6, 6)
    n = 1500
    for seed in range(n):
        t1, t2 = fast.generate(
            prompt, max_new_tokens=2, temperature=1.0, top_p=1.0, stop_at_eos=False, seed=seed
        ).tokens
        counts[t1, t2] += 1
    tv = 0.5 * (counts / n - exact).abs().sum()
    assert tv < 0.06, (tv, counts / n, exact)


def test_cli_fast_flags(tmp_path, small_tokenizer_path, capsys):
    ckpt, draft = tmp_path / "ckpt", tmp_path / "draft"
    for out, seed in ((ckpt, 0), (draft, 1)):
        init = ["init", "--preset", "1M", "--tokenizer", small_tokenizer_path, "--out", out]
        assert main([str(a) for a in init + ["--seed", str(seed), "max_seq_len=64"]]) == 0
    capsys.readouterr()

    def gen(*flags):
        argv = ["generate", "--ckpt", ckpt, "--prompt", "The value", "--temperature", "0"]
        status = main([str(a) for a in argv + ["--max-new-tokens", "12", *flags]])
        out, err = capsys.readouterr()
        assert status == 0, err
        return out, err

    plain, _ = gen()
    out, err = gen("--draft", ckpt, "--draft-k", "3")  # the model as its own draft
    assert (
        out == plain
        and err == "speculative decoding: 9/9 drafted tokens accepted (100.0%), draft_k=3\n"
    )
    out, err = gen("--draft", draft)
    assert out == plain and "drafted tokens accepted" in err
    q, _ = gen("--quantize", "int8")
    assert q == gen("--quantize", "int8", "--draft", draft)[0]
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "x", "--draft-k", "0"]) == 2
    assert "--draft-k 0" in capsys.readouterr().err
