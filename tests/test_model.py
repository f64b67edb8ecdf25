import json

import pytest
import torch
import torch.nn.functional as F

from llamaforge.model import (
    KVCache,
    ModelArgs,
    RMSNorm,
    Transformer,
    apply_rope,
    build_model,
    rope_cos_sin,
)
from llamaforge.presets import PRESETS, get_preset
from llamaforge.training.optim import build_optimizer, cross_entropy

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=32, max_seq_len=64)

# Exact parameter counts of Table 2's models with a 32000-piece vocabulary (SPEC §1.4).
TABLE2 = {"7B": 6_738_415_616, "13B": 13_015_864_320, "33B": 32_528_943_616, "65B": 65_285_660_672}
TABLE2_FFN = {"7B": 11008, "13B": 13824, "33B": 17920, "65B": 22016}


@pytest.mark.parametrize("name", list(TABLE2))
def test_table2_parameter_counts_on_meta_device(name):
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    assert model.num_params() == TABLE2[name]
    assert all(p.is_meta for p in model.parameters())
    assert get_preset(name).ffn_hidden_dim == TABLE2_FFN[name]
    assert get_preset(name).head_dim == 128


def test_small_presets_are_near_their_names():
    for name, target in (("1M", 1e6), ("15M", 15e6), ("110M", 110e6), ("1B", 1e9)):
        with torch.device("meta"):
            n = Transformer(PRESETS[name]).num_params()
        assert 0.8 * target < n < 1.2 * target, (name, n)


def test_meta_state_dict_names():
    with torch.device("meta"):
        model = Transformer(ModelArgs(**TINY))
    names = set(model.state_dict())
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    assert names == expected


def test_params_json_roundtrip_and_errors():
    meta_7b = {
        "dim": 4096,
        "multiple_of": 256,
        "n_heads": 32,
        "n_layers": 32,
        "norm_eps": 1e-06,
        "vocab_size": -1,
    }
    args = ModelArgs.from_dict(meta_7b)
    assert args.norm_eps == 1e-6 and args.kv_heads == 32 and args.vocab_size == -1
    assert json.loads(json.dumps(args.to_dict()))["dim"] == 4096
    llama2_70b = {
        "dim": 8192,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
        "n_heads": 64,
        "n_kv_heads": 8,
        "n_layers": 80,
        "norm_eps": 1e-05,
        "vocab_size": -1,
    }
    args70 = ModelArgs.from_dict(llama2_70b)
    assert args70.ffn_hidden_dim == 28672 and args70.kv_heads == 8
    with pytest.raises(ValueError, match="use_scaled_rope"):
        ModelArgs.from_dict({**meta_7b, "use_scaled_rope": True}, source="x/params.json")
    with pytest.raises(ValueError, match="n_heads"):
        ModelArgs(dim=100, n_heads=3, vocab_size=10).validate()
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3, vocab_size=10).validate()
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelArgs(dim=64, n_heads=4))
    with pytest.raises(ValueError, match="dim"):
        ModelArgs.from_dict({"dim": "4096"})


def test_rmsnorm_computes_in_fp32_and_casts_back():
    x = torch.randn(3, 64, dtype=torch.bfloat16) * 100
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref * norm.weight)


def test_rope_matches_meta_complex_formulation():
    hd, seq, theta = 16, 40, 10000.0
    x = torch.randn(2, seq, 3, hd)
    # Meta's reference: complex multiplication on interleaved pairs (SPEC §2.3).
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(seq, hd // 2), torch.outer(torch.arange(seq).float(), freqs))
    xc = torch.view_as_complex(x.reshape(2, seq, 3, -1, 2))
    ref = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    cos, sin = rope_cos_sin(hd, theta, torch.arange(seq))
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, atol=1e-6, rtol=1e-6)
    # an offset slice equals the same rows of the full table
    cos5, sin5 = rope_cos_sin(hd, theta, torch.arange(5, 15))
    torch.testing.assert_close(cos5, cos[5:15])
    torch.testing.assert_close(sin5, sin[5:15])


def test_rope_tables_survive_bf16_cast():
    model = build_model(ModelArgs(**TINY)).to(torch.bfloat16)
    assert not list(model.buffers())  # nothing to be degraded by .to(dtype)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_kv_cache_incremental_equals_full_forward(n_kv_heads):
    torch.manual_seed(0)
    model = build_model(ModelArgs(**TINY, n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(3, 30)
        # prefill 7, then chunks of various sizes starting at arbitrary positions, then 1s
        pieces, pos = [7, 5, 1, 9, 1, 1, 6], 0
        out = []
        for n in pieces:
            out.append(model(tokens[:, pos : pos + n], pos))
            pos += n
        model.clear_cache()
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_only_and_context_limit():
    model = build_model(ModelArgs(**TINY)).eval()
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True), model(tokens)[:, -1:])
        with pytest.raises(ValueError, match="max_seq_len=64"):
            model(torch.zeros(1, 65, dtype=torch.long))


def test_causality_future_tokens_do_not_change_past_logits():
    model = build_model(ModelArgs(**TINY)).eval()
    a = torch.randint(0, 97, (1, 20))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :12], model(b)[:, :12])
        assert not torch.allclose(model(a)[:, 12:], model(b)[:, 12:])


def test_init_statistics():
    model = build_model(ModelArgs(**{**TINY, "n_layers": 8}))
    assert torch.all(model.norm.weight == 1)
    std = model.layers[0].attention.wq.weight.std().item()
    residual = model.layers[0].attention.wo.weight.std().item()
    assert abs(std - 0.02) < 0.003
    assert abs(residual - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)


def test_a_few_steps_on_a_repeated_batch_drive_the_loss_down():
    torch.manual_seed(0)
    model = build_model(ModelArgs(**TINY)).train()
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1)
    batch = torch.randint(0, 97, (4, 33))
    x, y = batch[:, :-1], batch[:, 1:]
    losses = []
    for _ in range(30):
        loss, n = cross_entropy(model(x), y)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append((loss / n).item())
    assert losses[0] > 4.0  # about ln(97) at init
    assert losses[-1] < 0.5 * losses[0]


def test_decoding_a_batch_of_unequal_prompts_matches_full_forwards():
    """Meta's batched decoding of prompts of different lengths (prefill to the shortest
    prompt, then one position at a time for every row, rows still inside their prompt
    keeping their own tokens) gives each row the logits of a full forward over that row
    alone, at every position it predicts."""
    torch.manual_seed(0)
    model = build_model(ModelArgs(**TINY, n_kv_heads=2)).eval()
    prompts = [torch.randint(0, 97, (n,)) for n in (5, 11, 8)]
    lengths, total = [len(p) for p in prompts], 24
    tokens = torch.zeros((len(prompts), total), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    steps = {}
    with torch.no_grad():
        cache = KVCache(model.args, len(prompts), total, torch.float32, torch.device("cpu"))
        prev = 0
        for cur in range(min(lengths), total):
            logits = model(tokens[:, prev:cur], prev, cache=cache, last_only=True)[:, -1]
            steps[cur - 1] = logits  # the prediction for position cur
            greedy = logits.argmax(-1)
            inside = torch.tensor([cur < n for n in lengths])
            tokens[:, cur] = torch.where(inside, tokens[:, cur], greedy)
            prev = cur
        for i, p in enumerate(prompts):
            assert torch.equal(tokens[i, : len(p)], p)  # the prompt was kept, then generated
            alone = model(tokens[i : i + 1, :-1])[0]
            for pos, logits in steps.items():
                torch.testing.assert_close(logits[i], alone[pos], atol=1e-5, rtol=1e-5)
            assert torch.equal(tokens[i, len(p) :], alone[len(p) - 1 :].argmax(-1))


def test_packed_examples_equal_each_example_alone():
    """Examples packed into one row, with a block-diagonal causal mask and positions that
    restart at each example, get the logits each example gets alone."""
    torch.manual_seed(0)
    model = build_model(ModelArgs(**TINY, n_kv_heads=2)).eval()
    a, b, c = (torch.randint(0, 97, (n,)) for n in (7, 12, 19))
    rows = [[a, b], [b, a], [c]]  # per-row packings: (batch, seq) positions and masks
    tokens = torch.stack([torch.cat(r) for r in rows])
    doc = torch.stack(
        [torch.cat([torch.full((len(x),), j) for j, x in enumerate(r)]) for r in rows]
    )
    positions = torch.stack([torch.cat([torch.arange(len(x)) for x in r]) for r in rows])
    causal = torch.ones(19, 19, dtype=torch.bool).tril()
    mask = causal & (doc[:, :, None] == doc[:, None, :])  # (batch, queries, keys)
    with torch.no_grad():
        packed = model(tokens, mask=mask[:, None], positions=positions)
        for i, r in enumerate(rows):
            start = 0
            for x in r:
                alone = model(x[None])[0]
                got = packed[i, start : start + len(x)]
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
                start += len(x)
        # (seq,) positions are shared by the batch, (batch, seq) ones apply to their own row
        # (rotary attention only sees differences: a different spacing changes the logits)
        spaced = torch.stack([torch.arange(19), 2 * torch.arange(19)])
        two = model(torch.stack([c, c]), positions=spaced)
        torch.testing.assert_close(two[:1], model(c[None]))
        torch.testing.assert_close(two[1:], model(c[None], positions=spaced[1]))
        assert not torch.allclose(two[0], two[1], atol=1e-3)


def test_return_hidden_then_output_layer_equals_logits():
    model = build_model(ModelArgs(**TINY)).eval()
    tokens = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        assert hidden.shape == (2, 10, 64)
        torch.testing.assert_close(model.output(hidden), model(tokens))
        last = model(tokens, return_hidden=True, last_only=True)
        torch.testing.assert_close(last, hidden[:, -1:])


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_cache_reorder_equals_running_the_reordered_rows(n_kv_heads):
    """reorder(rows) keeps, repeats and permutes cached rows: what follows is scored as if
    the reordered rows had been run from scratch."""
    torch.manual_seed(0)
    model = build_model(ModelArgs(**TINY, n_kv_heads=n_kv_heads)).eval()
    tokens = torch.randint(0, 97, (3, 10))
    rows = torch.tensor([2, 0, 2, 1])  # a row repeated, the order changed
    more = torch.randint(0, 97, (4, 4))
    with torch.no_grad():
        cache = model.setup_cache(3, 14)
        model(tokens)
        cache.reorder(rows)
        chunk = model(more[:, :3], 10)  # a chunk, then one next token
        step = model(more[:, 3:], 13)
        model.clear_cache()
        ref = model(torch.cat([tokens[rows], more], dim=1))
    torch.testing.assert_close(chunk, ref[:, 10:13], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, ref[:, 13:], atol=1e-5, rtol=1e-5)
    assert model.cache is None


def test_gqa_through_enable_gqa_equals_repeating_kv_heads():
    """SDPA's enable_gqa gives what repeat_interleave of the kv heads gave, with the causal
    mask, an explicit mask and a cache."""
    torch.manual_seed(0)
    model = build_model(ModelArgs(**TINY, n_kv_heads=2)).eval()
    attn = model.layers[0].attention
    bsz, seq, hd = 2, 9, model.args.head_dim
    x = torch.randn(bsz, seq, 64)
    cos, sin = rope_cos_sin(hd, model.args.rope_theta, torch.arange(seq))

    def repeated_kv(mask):  # the former path, written out
        q = apply_rope(attn.wq(x).view(bsz, seq, 4, hd), cos, sin).transpose(1, 2)
        k = apply_rope(attn.wk(x).view(bsz, seq, 2, hd), cos, sin).transpose(1, 2)
        v = attn.wv(x).view(bsz, seq, 2, hd).transpose(1, 2)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return attn.wo(out.transpose(1, 2).reshape(bsz, seq, -1))

    mask = torch.rand(bsz, 1, seq, seq) > 0.5
    mask |= torch.eye(seq, dtype=torch.bool)  # every query sees at least itself
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(attn(x, cos, sin, m), repeated_kv(m))
            cache = KVCache(model.args, bsz, seq, torch.float32, torch.device("cpu"))
            torch.testing.assert_close(attn(x, cos, sin, m, cache, 0), repeated_kv(m))


def test_only_computes_the_selected_positions():
    torch.manual_seed(0)
    model = build_model(ModelArgs(**TINY)).eval()
    x = torch.randint(0, TINY["vocab_size"], (3, 20))
    keep = torch.rand(3, 20) < 0.3
    with torch.no_grad():
        full = model(x)
        part = model(x, only=keep)
    assert part.shape == (int(keep.sum()), TINY["vocab_size"])
    torch.testing.assert_close(part, full[keep], rtol=1e-5, atol=1e-6)
