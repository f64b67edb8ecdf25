import pytest
import torch

from llamaforge.inference.generate import generate, generate_completions, sample, sample_top_p

from .conftest import tiny_model


@pytest.fixture(scope="module")
def model(small_tokenizer):
    return tiny_model(small_tokenizer.vocab_size, max_seq_len=48)


def test_sample_top_p_is_metas_rule():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # mass before each sorted token: 0, .5, .8, .95 -> with p=0.7 only tokens 1 and 3 remain
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_top_p(probs.clone(), 0.7, g)) for _ in range(200)}
    assert drawn == {1, 3}
    drawn = {int(sample_top_p(probs.clone(), 0.4, g)) for _ in range(50)}
    assert drawn == {1}


def test_sample_greedy_and_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sample(logits, 0.0).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, 1.0, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert drawn == {1, 3}


def test_batched_unequal_prompts_equal_one_at_a_time(model, small_tokenizer):
    prompts = ["The value of", "a", "Return the list of all the"]
    kw = dict(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    batched = generate_completions(model, small_tokenizer, prompts, **kw)
    for p, b in zip(prompts, batched):
        single = generate_completions(model, small_tokenizer, [p], **kw)[0]
        assert single.tokens == b.tokens and single.text == b.text
        assert len(b.tokens) == 12 and b.finish_reason == "length"
    assert isinstance(generate(model, small_tokenizer, "a", **kw), str)
    assert model.cache is None  # generation drops the KV cache it set up


def test_seeded_sampling_is_reproducible(model, small_tokenizer):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, stop_at_eos=False)
    a = generate(model, small_tokenizer, ["x", "y"], seed=3, **kw)
    b = generate(model, small_tokenizer, ["x", "y"], seed=3, **kw)
    c = generate(model, small_tokenizer, ["x", "y"], seed=4, **kw)
    assert a == b and a != c


def test_stop_strings_eos_and_streaming(model, small_tokenizer):
    kw = dict(max_new_tokens=20, temperature=0.0, stop_at_eos=False)
    free = generate_completions(model, small_tokenizer, ["The"], **kw)[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = generate_completions(model, small_tokenizer, ["The"], stop=[stop], **kw)[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.find(stop)]
    streamed: dict[int, str] = {}
    res = generate_completions(
        model,
        small_tokenizer,
        ["The", "def f"],
        **kw,
        on_text=lambda i, d: streamed.__setitem__(i, streamed.get(i, "") + d),
    )
    assert [streamed.get(0, ""), streamed.get(1, "")] == [r.text for r in res]
    assert len(res[0].logprobs) == len(res[0].tokens) and all(lp <= 0 for lp in res[0].logprobs)


def test_eos_stops_a_row(small_tokenizer):
    # A model whose residual stream is all ones and whose output row for eos is all ones:
    # eos has the top logit at every position.
    m = tiny_model(
        small_tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=None, max_seq_len=32
    )
    with torch.no_grad():
        m.tok_embeddings.weight.fill_(1.0)
        m.layers[0].attention.wo.weight.zero_()
        m.layers[0].feed_forward.w2.weight.zero_()
        m.output.weight.zero_()
        m.output.weight[small_tokenizer.eos_id] = 1.0
    res = generate_completions(
        m, small_tokenizer, ["a", "bb cc"], max_new_tokens=5, temperature=0.0
    )
    assert [(r.finish_reason, r.tokens, r.text) for r in res] == [("eos", [], "")] * 2
    res = generate_completions(
        m, small_tokenizer, ["a"], max_new_tokens=5, temperature=0.0, stop_at_eos=False
    )[0]
    assert res.finish_reason == "length" and res.tokens == [small_tokenizer.eos_id] * 5


def test_echo_and_context_errors(model, small_tokenizer):
    r = generate_completions(
        model,
        small_tokenizer,
        ["hello"],
        max_new_tokens=3,
        temperature=0.0,
        echo=True,
        stop_at_eos=False,
    )[0]
    assert r.text.startswith("hello") and r.tokens[: len(r.prompt_tokens)] == r.prompt_tokens
    long_prompt = list(range(3, 60))
    with pytest.raises(ValueError, match="context is 48"):
        generate_completions(model, small_tokenizer, [long_prompt], max_new_tokens=3)
    r = generate_completions(
        model,
        small_tokenizer,
        [long_prompt],
        max_new_tokens=3,
        temperature=0.0,
        truncate=True,
        stop_at_eos=False,
    )[0]
    assert len(r.prompt_tokens) < 48 and r.prompt_tokens == long_prompt[-len(r.prompt_tokens) :]
    assert len(r.tokens) == 3
    # a row that reaches the end of the context stops with reason "context"
    near = list(range(3, 46))
    r = generate_completions(
        model, small_tokenizer, [near], max_new_tokens=10, temperature=0.0, stop_at_eos=False
    )[0]
    assert r.finish_reason == "context" and len(near) + len(r.tokens) == 48
