"""Our model against Hugging Face transformers' LlamaForCausalLM on the same random weights."""

import pytest
import torch

from llamaforge.checkpoint.convert.hf import (
    hf_config,
    permute_from_hf,
    permute_to_hf,
    to_hf_state_dict,
)
from llamaforge.inference.generate import generate_completions

from .conftest import tiny_model

transformers = pytest.importorskip("transformers")


def _pair(n_kv_heads, vocab_size=97, rope_theta=10000.0):
    ours = tiny_model(
        vocab_size,
        norm_gains=True,  # non-trivial norm gains, so a swapped norm would show
        dim=128,
        n_layers=3,
        n_kv_heads=n_kv_heads,
        max_seq_len=96,
        norm_eps=1e-5,
        rope_theta=rope_theta,
    )
    args = ours.args
    config = transformers.LlamaConfig(**hf_config(args), attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(
        to_hf_state_dict(ours.state_dict(), args), strict=False
    )
    assert not unexpected and all("rotary" in k for k in missing)
    return ours, hf


@pytest.mark.parametrize("n_kv_heads,theta", [(None, 10000.0), (2, 10000.0), (1, 500000.0)])
def test_logits_match_hf(n_kv_heads, theta):
    ours, hf = _pair(n_kv_heads, rope_theta=theta)
    tokens = torch.randint(0, 97, (2, 80))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_permute_roundtrip():
    w = torch.randn(64, 32)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 4), 4), w)
    assert not torch.equal(permute_to_hf(w, 4), w)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_greedy_generations_identical(n_kv_heads, small_tokenizer):
    ours, hf = _pair(n_kv_heads, vocab_size=small_tokenizer.vocab_size)
    prompts = [[1, 45, 300, 12, 7], [1, 99, 3]]
    ours_out = generate_completions(
        ours, small_tokenizer, prompts, max_new_tokens=24, temperature=0.0, stop_at_eos=False
    )
    for prompt, result in zip(prompts, ours_out):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert result.tokens == ref[0, len(prompt) :].tolist()
