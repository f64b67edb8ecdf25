"""The ablation blocks (llamaforge.science.blocks): at LLaMA's setting of every switch the
variant is model.py's Transformer, weight for weight and logit for logit; the GELU and
SwiGLU MLPs hold the same weights at the study's sizes; each rung of the ladder changes
exactly the parameters its change names; the FLOPs a variant's MFU uses match a count by
hand; post-norm is its own block; and a variant pretrains, reports its FLOPs and resumes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from llamaforge.config import load_config
from llamaforge.model import ModelArgs, Transformer, build_model
from llamaforge.parallel import DistInfo
from llamaforge.science.blocks import (
    GPT2,
    LADDER,
    LLAMA,
    Architecture,
    FeedForward,
    VariantTransformer,
    build_variant,
)
from llamaforge.training.checkpointer import list_checkpoints
from llamaforge.training.flops import count_params, flops_per_token
from llamaforge.training.pretrain import PretrainConfig, run_pretrain
from llamaforge.training.trainer import TrainConfig, Trainer, model_args

from .conftest import story_corpus

# -- helpers --------------------------------------------------------------------------------


def mha_args(**overrides) -> ModelArgs:
    """A tiny multi-head model (the blocks have no grouped-query heads)."""
    fields = dict(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=32, max_seq_len=24)
    return ModelArgs(**{**fields, **overrides})


def rung(name: str) -> Architecture:
    return dict(LADDER)[name]


def randomize_gains(model: torch.nn.Module) -> None:
    """1-D parameters (norm gains, biases) away from their ones/zeros init, so that a swapped
    or dropped one changes the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def names(m: torch.nn.Module) -> set[str]:
    return set(m.state_dict())


# -- 1. LLaMA's setting of every switch is model.py's Transformer ---------------------------

PARITY_SHAPES = [
    # (args overrides, batch, positions)
    (dict(), 3, 24),  # max_seq_len positions, a batch of 3
    (dict(), 1, 1),  # one position (no causal mask)
    (dict(dim=32, n_heads=2, n_layers=3, multiple_of=2, max_seq_len=16), 2, 16),
    (dict(dim=48, n_heads=6, vocab_size=50, norm_eps=1e-5, rope_theta=500.0), 4, 7),
]


@pytest.mark.parametrize(("over", "bsz", "seqlen"), PARITY_SHAPES)
def test_llama_switches_load_model_py_weights_strictly_and_give_equal_logits(over, bsz, seqlen):
    args = mha_args(**over)
    torch.manual_seed(1)
    ref = build_model(args).eval()
    randomize_gains(ref)
    variant = VariantTransformer(args, LLAMA).eval()
    assert names(variant) == names(ref)
    variant.load_state_dict(ref.state_dict(), strict=True)
    tokens = torch.randint(0, args.vocab_size, (bsz, seqlen))
    with torch.no_grad():
        want, got = ref(tokens), variant(tokens)
    assert got.shape == (bsz, seqlen, args.vocab_size)
    assert torch.equal(got, want)
    assert variant.num_params() == ref.num_params() == count_params(args)["total"]
    assert variant.num_params(exclude_embedding=True) == ref.num_params(exclude_embedding=True)


@pytest.mark.parametrize(("over", "bsz", "seqlen"), PARITY_SHAPES[::2])
def test_a_llama_variants_state_dict_loads_into_model_py(over, bsz, seqlen):
    args = mha_args(**over)
    torch.manual_seed(2)
    variant = build_variant(args, LLAMA).eval()
    randomize_gains(variant)
    ref = Transformer(args).eval()
    ref.load_state_dict(variant.state_dict(), strict=True)
    tokens = torch.randint(0, args.vocab_size, (bsz, seqlen))
    with torch.no_grad():
        assert torch.equal(variant(tokens), ref(tokens))


ALL_BLOCKS = [(n, a) for n, a in LADDER] + [
    (f"{n} post", dataclasses.replace(a, norm_position="post")) for n, a in LADDER
]


@pytest.mark.parametrize("arch", [a for _, a in ALL_BLOCKS], ids=[n for n, _ in ALL_BLOCKS])
def test_every_block_is_causal_and_every_parameter_takes_part(arch):
    """No parameter is dead weight (a bias never added, a position table never read, a
    gate never multiplied): each gets a non-zero gradient; and position i never sees the
    tokens after it."""
    args = mha_args(dim=32, n_heads=2, multiple_of=2, max_seq_len=12)
    torch.manual_seed(4)
    model = build_variant(args, arch)
    randomize_gains(model)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    logits = model(tokens)
    logits.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % args.vocab_size
    with torch.no_grad():
        after = model(changed)
    assert torch.equal(after[:, :7], logits[:, :7].detach())
    assert not torch.allclose(after[:, 7:], logits[:, 7:].detach())


def test_learned_positions_are_added_at_their_position():
    args = mha_args(max_seq_len=12)
    torch.manual_seed(5)
    model = build_variant(args, GPT2).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 12))
    with torch.no_grad():
        before = model(tokens)
        model.pos_embeddings.weight[5] += 1.0
        after = model(tokens)
    assert torch.equal(after[:, :5], before[:, :5])
    assert not torch.allclose(after[:, 5:], before[:, 5:])


def test_gpt2_pieces_are_the_hand_formulas():
    """GPT-2's MLP, w2·gelu(w1·x + b1) + b2 with GELU's tanh form; LayerNorm with its bias;
    RMSNorm plus a bias — each against its formula written out."""
    from llamaforge.science.blocks import LayerNorm, RMSNormBias

    args = mha_args(dim=32, n_heads=2)
    torch.manual_seed(6)
    mlp = FeedForward(args, GPT2)
    x = torch.randn(2, 5, 32)
    a = x @ mlp.w1.weight.T + mlp.w1.bias
    gelu = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    want = gelu @ mlp.w2.weight.T + mlp.w2.bias
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want)
    assert mlp.w3 is None and mlp.w1.weight.shape == (4 * 32, 32)

    w, b = torch.rand(32) + 0.5, torch.randn(32)
    ln, rms = LayerNorm(32, 1e-5, bias=True), RMSNormBias(32, 1e-5)
    with torch.no_grad():
        for m in (ln, rms):
            m.weight.copy_(w)
            m.bias.copy_(b)
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        torch.testing.assert_close(ln(x), (x - mean) / torch.sqrt(var + 1e-5) * w + b)
        ms = x.pow(2).mean(-1, keepdim=True)
        torch.testing.assert_close(rms(x), x / torch.sqrt(ms + 1e-5) * w + b)
    assert LayerNorm(32, 1e-5, bias=False).bias is None


def test_init_is_model_py_scheme_with_zero_biases():
    args = mha_args()
    llama, ref = VariantTransformer(args, LLAMA), Transformer(args)
    for name, _ in ref.named_parameters():
        assert llama.init_std(name) == ref.init_std(name), name
    gpt2 = build_variant(args, GPT2)
    for name, p in gpt2.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # the residual projections scaled by 1/sqrt(2·n_layers), as model.py's
            residual = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
            std = 0.02 / math.sqrt(2 * args.n_layers) if residual else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.2), name


def test_variant_rejects_grouped_query_heads_and_too_many_positions():
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        VariantTransformer(mha_args(n_kv_heads=2), GPT2)
    args = mha_args()
    model = build_variant(args, GPT2)
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model(torch.zeros(1, args.max_seq_len + 1, dtype=torch.long))


# -- 2. parameter counts ------------------------------------------------------------------


def mlp_counts(dim: int, multiple_of: int, bias: bool) -> tuple[int, int, int]:
    """(SwiGLU's, GELU's parameters, SwiGLU's hidden size) of one block's MLP, by module;
    each checked against its count by hand."""
    args = ModelArgs(dim=dim, n_heads=2, vocab_size=8, multiple_of=multiple_of)
    h = args.ffn_hidden_dim
    swiglu = n_params(FeedForward(args, Architecture(mlp="swiglu", bias=bias)))
    gelu = n_params(FeedForward(args, Architecture(mlp="gelu", bias=bias)))
    assert swiglu == 3 * dim * h + (2 * h + dim if bias else 0)  # w1, w3: d→h, w2: h→d
    assert gelu == 8 * dim * dim + (5 * dim if bias else 0)  # w1: d→4d, w2: 4d→d
    return swiglu, gelu, h


@pytest.mark.parametrize("dim", [32, 48, 64, 96, 128, 256])
def test_swiglu_and_gelu_mlps_hold_equal_weights_at_multiple_of_2(dim):
    swiglu, gelu, h = mlp_counts(dim, 2, bias=False)
    assert h % 2 == 0 and abs(h - 8 * dim / 3) <= 2  # 2/3·4d, rounded up to even
    assert abs(swiglu - gelu) / gelu < 0.01
    if dim >= 64:  # with the biases of the "+swiglu" rung too (at dim 32: 1.3 %)
        swiglu_b, gelu_b, _ = mlp_counts(dim, 2, bias=True)
        assert abs(swiglu_b - gelu_b) / gelu_b < 0.01


@pytest.mark.parametrize("dim", [32, 64, 128])
def test_multiple_of_256_would_break_the_equal_weights_at_small_dims(dim):
    """LLaMA's own rounding (to 256) makes the small SwiGLUs up to 3× GELU's weights: the
    1 % above holds because of multiple_of=2, not whatever the width."""
    swiglu, gelu, _ = mlp_counts(dim, 256, bias=False)
    assert (swiglu - gelu) / gelu > 0.4


def test_the_study_trains_at_the_multiple_of_that_keeps_the_mlps_equal():
    from llamaforge.science.study import MULTIPLE_OF

    assert MULTIPLE_OF == 2


LADDER_ARGS = mha_args(dim=32, n_heads=2, vocab_size=70, multiple_of=2, max_seq_len=20)


def test_ladder_rungs_differ_by_exactly_their_change():
    args = LADDER_ARGS
    d, L, V, T, h = args.dim, args.n_layers, args.vocab_size, args.max_seq_len, args.ffn_hidden_dim
    assert [name for name, _ in LADDER] == [
        "gpt2",
        "+rmsnorm",
        "+swiglu",
        "+rope",
        "+no bias",
        "+untied = llama",
    ]
    assert LADDER[0][1] == GPT2 and LADDER[-1][1] == LLAMA
    for (_, a), (_, b) in zip(LADDER, LADDER[1:]):  # one field changes a rung
        diff = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
        assert len(diff) == 1, diff
    models = {name: VariantTransformer(args, arch) for name, arch in LADDER}
    count = {name: n_params(m) for name, m in models.items()}
    keys = {name: names(m) for name, m in models.items()}

    # GPT-2 by hand: tokens + positions + L · (attention, MLP 4d, two LayerNorms) + final LN
    gpt2 = V * d + T * d + L * ((4 * d * d + 4 * d) + (8 * d * d + 5 * d) + 4 * d) + 2 * d
    assert count["gpt2"] == gpt2

    # RMSNorm keeps the LayerNorm's gain and bias: same names, same count
    assert keys["+rmsnorm"] == keys["gpt2"] and count["+rmsnorm"] == gpt2

    # SwiGLU: w3 added, w1/w2 resized to h (biases kept)
    assert keys["+swiglu"] - keys["+rmsnorm"] == {
        f"layers.{i}.feed_forward.w3.{p}" for i in range(L) for p in ("weight", "bias")
    }
    assert keys["+rmsnorm"] <= keys["+swiglu"]
    swiglu_mlp, gelu_mlp = 3 * d * h + 2 * h + d, 8 * d * d + 5 * d
    assert count["+swiglu"] - count["+rmsnorm"] == L * (swiglu_mlp - gelu_mlp)

    # RoPE: the position table goes, max_seq_len · d weights
    assert keys["+swiglu"] - keys["+rope"] == {"pos_embeddings.weight"}
    assert keys["+rope"] < keys["+swiglu"]
    assert count["+swiglu"] - count["+rope"] == T * d

    # no bias: every bias goes, and only biases — attention 4d, MLP 2h + d, two norms 2d a
    # layer, and the final norm's d
    gone = keys["+rope"] - keys["+no bias"]
    assert keys["+no bias"] < keys["+rope"]
    assert gone == {k for k in keys["+rope"] if k.endswith(".bias")}
    assert len(gone) == L * (4 + 3 + 2) + 1
    assert count["+rope"] - count["+no bias"] == L * (4 * d + (2 * h + d) + 2 * d) + d

    # untied: an output layer of its own, vocab · d
    assert keys["+untied = llama"] - keys["+no bias"] == {"output.weight"}
    assert count["+untied = llama"] - count["+no bias"] == V * d
    assert count["+untied = llama"] == count_params(args)["total"]


# -- 3. FLOPs per token, as the MFU counts them ---------------------------------------------


def hand_weights(name: str, args: ModelArgs, post: bool = False) -> int:
    """N, the weights that take part in a matmul, written out per rung: the input token
    table and the position table are lookups; a tied output multiplies by the token table
    (V·d); post-norm has no final norm."""
    d, L, V, h = args.dim, args.n_layers, args.vocab_size, args.ffn_hidden_dim
    attn_b = 4 * d * d + 4 * d  # wq, wk, wv, wo with biases
    gelu_b = 8 * d * d + 5 * d  # w1 d→4d, w2 4d→d, with biases
    swiglu_b = 3 * d * h + 2 * h + d  # w1, w3 d→h, w2 h→d, with biases
    norms_b = 4 * d  # two norms, gain and bias
    n = {
        "gpt2": L * (attn_b + gelu_b + norms_b) + 2 * d + V * d,
        "+rmsnorm": L * (attn_b + gelu_b + norms_b) + 2 * d + V * d,
        "+swiglu": L * (attn_b + swiglu_b + norms_b) + 2 * d + V * d,
        "+rope": L * (attn_b + swiglu_b + norms_b) + 2 * d + V * d,
        "+no bias": L * (4 * d * d + 3 * d * h + 2 * d) + d + V * d,
        "+untied = llama": L * (4 * d * d + 3 * d * h + 2 * d) + d + V * d,
    }[name]
    final_norm = 2 * d if rung(name).bias else d
    return n - final_norm if post else n


FLOP_CFG = [
    "model.dim=32",
    "model.n_layers=3",
    "model.n_heads=2",
    "model.multiple_of=2",
    "model.max_seq_len=40",
    "model.vocab_size=70",
    "batch_tokens=32",
    "micro_batch=2",
    "device=cpu",
    "save_model=false",  # a native checkpoint is model.py's; the trainer refuses it here
]
FLOP_SEQ = 16  # T: the trained context, not max_seq_len


def meta_trainer(tmp_path: Path, arch: Architecture) -> Trainer:
    cfg = load_config(TrainConfig, None, [*FLOP_CFG, f"out={tmp_path}"])
    no_data: Any = iter(())
    t = Trainer(
        cfg,
        DistInfo(),
        args=model_args(cfg, 70, FLOP_SEQ),
        seq_len=FLOP_SEQ,
        loader=no_data,  # never drawn from
        model_fn=lambda a: VariantTransformer(a, arch),
    )
    model = t.meta_model()
    assert isinstance(model, VariantTransformer) and model.arch == arch
    assert all(p.is_meta for p in model.parameters())
    return t


@pytest.mark.parametrize("post", [False, True], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("name", [name for name, _ in LADDER])
def test_flops_per_token_of_every_rung_is_the_hand_count(tmp_path, name, post):
    arch = dataclasses.replace(rung(name), norm_position="post" if post else "pre")
    t = meta_trainer(tmp_path, arch)
    args = t.args
    assert (args.dim, args.n_layers, args.vocab_size, args.max_seq_len) == (32, 3, 70, 40)
    d, L, T = args.dim, args.n_layers, FLOP_SEQ
    n = hand_weights(name, args, post)
    assert t.param_counts == {"weights": n, "trained": n, "adapters": 0}
    assert t.flops_per_token == 6 * n + 12 * L * d * T
    # the lookups are all that the parameter count has beyond N
    model = VariantTransformer(args, arch)
    lookups = args.vocab_size * d * (not arch.tied) + args.max_seq_len * d * (
        arch.positions == "learned"
    )
    assert t.n_params == model.num_params() == n + lookups
    assert model.num_params(exclude_embedding=True) == n


def test_gpt2_flops_written_out(tmp_path):
    """GPT-2 in full: N = L·(4d²+4d + 8d²+5d + 4d) + 2d + V·d; 6N + 12·L·d·T."""
    t = meta_trainer(tmp_path, GPT2)
    d, L, V, T = 32, 3, 70, FLOP_SEQ
    n = L * (4 * d * d + 4 * d + 8 * d * d + 5 * d + 4 * d) + 2 * d + V * d
    assert n == 40_416
    assert t.flops_per_token == 6 * n + 12 * L * d * T == 260_928


def test_llama_variant_flops_are_model_py_flops(tmp_path):
    """LLaMA's switches count as model.py's default path: 6·(L·(4d²+3dh+2d)+d+V·d)+12·L·d·T,
    and as a Trainer without ``model_fn``."""
    t = meta_trainer(tmp_path, LLAMA)
    args = t.args
    d, L, V, T, h = args.dim, args.n_layers, args.vocab_size, FLOP_SEQ, args.ffn_hidden_dim
    hand = 6 * (L * (4 * d * d + 3 * d * h + 2 * d) + d + V * d) + 12 * L * d * T
    assert t.flops_per_token == flops_per_token(args, T) == hand
    no_data: Any = iter(())
    plain = Trainer(t.cfg, DistInfo(), args=args, seq_len=T, loader=no_data)
    plain.meta_model()
    assert plain.flops_per_token == hand and plain.param_counts == t.param_counts


# -- 4. post-norm and the switches' values --------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "+untied = llama"])
def test_post_norm_is_another_block_and_ends_normalised(name):
    args = mha_args()
    pre_arch = rung(name)
    post_arch = dataclasses.replace(pre_arch, norm_position="post")
    torch.manual_seed(3)
    pre = build_variant(args, pre_arch).eval()
    post = VariantTransformer(args, post_arch).eval()
    assert post.norm is None
    assert names(pre) - names(post) == {k for k in names(pre) if k.startswith("norm.")}
    assert names(post) < names(pre)
    post.load_state_dict({k: v for k, v in pre.state_dict().items() if k in names(post)})
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    seen = []
    last = post.layers[-1].ffn_norm
    hook = last.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        a, b = pre(tokens), post(tokens)
    hook.remove()
    assert not torch.allclose(a, b, atol=1e-3)
    # what reaches the output is the last block's ffn_norm: normalised rows (gains 1)
    (h,) = seen
    if pre_arch.norm == "layernorm":
        torch.testing.assert_close(h.mean(-1), torch.zeros(h.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(h.shape[:-1]))
    else:
        torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(h.shape[:-1]))


@pytest.mark.parametrize(
    ("field", "value"),
    [("norm", "bogus"), ("norm_position", "middle"), ("mlp", "relu"), ("positions", "alibi")],
)
def test_an_unknown_switch_value_is_a_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^architecture {field}={value!r}: expected one of"):
        Architecture(**{field: value})


def test_switch_values_and_dict_round_trip():
    assert GPT2.to_dict() == {
        "norm": "layernorm",
        "norm_position": "pre",
        "mlp": "gelu",
        "positions": "learned",
        "bias": True,
        "tied": True,
    }
    assert Architecture(**LLAMA.to_dict()) == LLAMA == Architecture()
    assert len({arch for _, arch in LADDER}) == len(LADDER)  # hashable, each rung its own


# -- 5. end to end: a variant pretrains, reports its FLOPs and resumes ---------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small prepared corpus with its own 300-piece tokenizer."""
    return story_corpus(tmp_path_factory.mktemp("blocks_data"), rows=400)


def pretrain_cfg(corpus: Path, out: Path, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        None,
        [
            "model.preset=1M",
            "model.dim=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.multiple_of=2",
            f"data.dir={corpus}",
            f"data.tokenizer={corpus / 'tokenizer.model'}",
            "data.seq_len=32",
            "batch_tokens=256",  # 8 sequences: 2 micro-batches of 4
            "micro_batch=4",
            "steps=8",
            "optim.lr=1e-2",
            "optim.warmup_steps=2",
            "eval_every=4",
            "eval_batches=2",
            "checkpoint.every=4",
            "checkpoint.keep=0",
            "progress=false",
            "tensorboard=false",
            "plot=false",
            "save_model=false",
            "device=cpu",
            "peak_flops=1.0",  # mfu = flops_per_token · tokens/s: the count shows in metrics
            f"out={out}",
            *extra,
        ],
    )


def metric_rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}  # a replayed step keeps its last row


def gpt2_fn(args: ModelArgs) -> VariantTransformer:
    return VariantTransformer(args, GPT2)


def test_gpt2_variant_pretrains_reports_its_flops_and_resumes(corpus, tmp_path):
    full_out = tmp_path / "full"
    full = run_pretrain(pretrain_cfg(corpus, full_out), model_fn=gpt2_fn)
    assert full["step"] == 8 and full["steps_this_run"] == 8 and not full["stopped"]
    assert full["skipped_steps"] == 0
    rows = metric_rows(full_out)
    assert sorted(rows) == list(range(1, 9))

    vocab = 300  # the tokenizer's: model_args takes the vocabulary from it
    d, L, T = 32, 2, 32
    first = rows[1]["loss"]
    assert abs(first - math.log(vocab)) < 0.1, first  # a near-uniform start
    assert full["loss"] < first - 1.0 and full["val_loss"] < math.log(vocab) - 1.0

    # the MFU's FLOPs are GPT-2's by hand (h: no SwiGLU here; positions a lookup)
    n = L * (4 * d * d + 4 * d + 8 * d * d + 5 * d + 4 * d) + 2 * d + vocab * d
    hand = 6 * n + 12 * L * d * T
    for row in rows.values():
        assert row["tokens_per_s"] > 0
        assert row["mfu"] == pytest.approx(hand * row["tokens_per_s"], rel=1e-9)
    assert hand != flops_per_token(
        ModelArgs(dim=d, n_layers=L, n_heads=2, vocab_size=vocab, multiple_of=2), T
    )  # (and not LLaMA's count of the same shape)

    # stop at step 3, then the same command resumes from its checkpoint and finishes
    part_out = tmp_path / "part"
    stopped = run_pretrain(pretrain_cfg(corpus, part_out, "stop_at=3"), model_fn=gpt2_fn)
    assert stopped["step"] == 3 and stopped["model"] is None
    assert [s for s, _ in list_checkpoints(part_out / "checkpoints")] == [3]
    resumed = run_pretrain(pretrain_cfg(corpus, part_out), model_fn=gpt2_fn)
    assert resumed["step"] == 8 and resumed["steps_this_run"] == 5
    assert [s for s, _ in list_checkpoints(part_out / "checkpoints")] == [3, 4, 8]
    part_rows = metric_rows(part_out)
    assert sorted(part_rows) == list(range(1, 9))
    # bitwise: the resumed run is the uninterrupted one (weights, AdamW, data position)
    assert {s: r["loss"] for s, r in part_rows.items()} == {s: r["loss"] for s, r in rows.items()}
    assert resumed["val_loss"] == full["val_loss"]


@pytest.mark.parametrize(
    "setting, words",
    [
        ("save_model=true", "save_model=true"),
        ("activation_checkpointing=manual", "activation_checkpointing=manual"),
    ],
)
def test_the_trainer_refuses_what_only_llamas_block_can_do(tmp_path, setting, words):
    from llamaforge.config import ConfigError

    cfg = load_config(TrainConfig, None, [*FLOP_CFG, f"out={tmp_path}", setting])
    args = model_args(cfg, 70, FLOP_SEQ)
    with pytest.raises(ConfigError, match=words):
        Trainer(
            cfg,
            DistInfo(),
            args=args,
            seq_len=FLOP_SEQ,
            loader=None,  # type: ignore[arg-type]
            model_fn=lambda a: VariantTransformer(a, GPT2),
        )
