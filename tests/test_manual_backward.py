"""activation_checkpointing="manual": the transformer block's hand-written backward
(llamaforge.parallel.manual_backward) gives autograd's gradients, keeps only what it says, and
trains like the plain model through the trainer (one process, and two with FSDP2)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llamaforge.model import ModelArgs, build_model, rope_cos_sin
from llamaforge.parallel import apply_activation_checkpointing
from llamaforge.parallel.manual_backward import BlockFunction
from llamaforge.presets import get_preset
from llamaforge.training.optim import cross_entropy

from .conftest import json_objects
from .test_pretrain import corpus, metrics, run  # noqa: F401 (corpus: a fixture)

TINY = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=10, multiple_of=8)


def _packed(bsz: int, seqlen: int, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-diagonal causal mask (examples of ``cut`` tokens) and positions restarting at 0
    in each, as finetuning's packed rows have them."""
    idx = torch.arange(seqlen)
    seg = idx // cut
    mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    return mask[None, None].expand(bsz, 1, seqlen, seqlen), (idx % cut)[None].expand(bsz, -1)


def _block_inputs(args: ModelArgs, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    block = build_model(args, dtype=dtype).layers[0]
    weights = [
        block.attention_norm.weight, block.attention.wq.weight, block.attention.wk.weight,
        block.attention.wv.weight, block.attention.wo.weight, block.ffn_norm.weight,
        block.feed_forward.w1.weight, block.feed_forward.w2.weight, block.feed_forward.w3.weight,
    ]  # fmt: skip
    weights = [w.detach().clone().requires_grad_() for w in weights]
    with torch.no_grad():
        # gains other than one, so that their gradients are checked in general; larger
        # weights than the init's, so that attention is far from uniform and every path of
        # the backward (RoPE on k included) weighs in the check
        weights[0].add_(0.1 * torch.randn_like(weights[0]))
        weights[5].add_(0.1 * torch.randn_like(weights[5]))
        for w in weights[1:5]:
            w.mul_(25.0)
    return weights


@pytest.mark.parametrize("kernel", ["auto", "math"])
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_fp64_with_gqa(kernel, packed):
    weights = _block_inputs(TINY, torch.float64)
    bsz, seqlen = 2, 6
    if packed:  # per-row positions (batch, seq, head_dim/2) and a block-diagonal mask
        mask, positions = _packed(bsz, seqlen, 4)
    else:
        mask, positions = None, torch.arange(seqlen)
    cos, sin = rope_cos_sin(TINY.head_dim, TINY.rope_theta, positions)
    cos, sin = cos.double(), sin.double()
    x = torch.randn(bsz, seqlen, TINY.dim, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, *w: torch.Tensor) -> torch.Tensor:
        return BlockFunction.apply(x, cos, sin, mask, *w, TINY.head_dim, TINY.norm_eps, kernel)

    # fast mode: the Jacobian checked along random directions (the full one takes minutes)
    assert torch.autograd.gradcheck(f, (x, *weights), fast_mode=True)


def _loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor, **kw) -> tuple:
    logits = model(tokens[:, :-1], **kw)
    loss, n = cross_entropy(logits, tokens[:, 1:])
    (loss / n).backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_1m_preset_fp32_matches_autograd(n_kv_heads, packed):
    args = get_preset("1M", n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    base = build_model(args)
    manual = copy.deepcopy(base)
    apply_activation_checkpointing(manual, "manual")
    tokens = torch.randint(0, args.vocab_size, (3, 65), generator=torch.Generator().manual_seed(1))
    kw = {}
    if packed:
        mask, positions = _packed(3, 64, 24)
        kw = {"mask": mask, "positions": positions}
    loss_ref, ref = _loss_and_grads(base, tokens, **kw)
    loss, got = _loss_and_grads(manual, tokens, **kw)
    assert list(got) == list(ref)  # the same parameter names: checkpoints are unchanged
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=name)


def test_no_grad_and_kv_cache_take_the_normal_forward():
    args = get_preset("1M")
    torch.manual_seed(0)
    base = build_model(args)
    manual = copy.deepcopy(base)
    apply_activation_checkpointing(manual, "manual")
    prompt = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(manual(prompt), base(prompt), rtol=0, atol=0)
        for m in (base, manual):
            m.setup_cache(2, 16)
        a, b = base(prompt), manual(prompt)  # prefill into the cache, then one decoding step
        nxt = a[:, -1].argmax(-1, keepdim=True)
        torch.testing.assert_close(manual(nxt, 9), base(nxt, 9), rtol=0, atol=0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lora_layers_are_refused_not_silently_dropped():
    from llamaforge.finetune.lora import LoraConfig, apply_lora

    model = build_model(get_preset("1M", n_layers=1))
    apply_lora(model, LoraConfig(enabled=True, targets=["wq", "w2"]))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq is a LoraLinear.*selective"):
        apply_activation_checkpointing(model, "manual")


class _Saved:
    """Bytes of the tensors autograd saves for the backward pass, parameters left out."""

    def __init__(self, params: set[int]) -> None:
        self.params, self.bytes = params, 0
        self._seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if id(t) not in self.params and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t


def test_saved_tensors_are_the_linear_outputs_and_attention_with_its_lse():
    """Per block: x, q, k, v, attention output, log-sum-exp, wo's, w1's and w3's outputs —
    and nothing else (cos/sin are shared by the blocks, the weights are parameters)."""
    args = get_preset("1M", n_kv_heads=2)
    model = build_model(args)
    apply_activation_checkpointing(model, "manual")
    bsz, seqlen = 2, 64
    saved = _Saved({id(p) for p in model.parameters()})
    x = torch.randn(bsz, seqlen, args.dim, requires_grad=True)
    cos, sin = rope_cos_sin(args.head_dim, args.rope_theta, torch.arange(seqlen))
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        model.layers[0](x, cos, sin, None)
    kv_dim = args.kv_heads * args.head_dim
    per_token = 4 * args.dim + 2 * kv_dim + 2 * args.ffn_hidden_dim  # x q k v o ao u t (fp32)
    per_token_lse = args.n_heads  # one fp32 statistic per head and query
    expected = 4 * bsz * seqlen * (per_token + per_token_lse) + cos.nbytes + sin.nbytes
    assert saved.bytes == expected


def test_autocast_bf16_keeps_no_weight_copies_and_matches_autograd():
    """Under autocast the linear layers compute in bf16 from fp32 weights cast where used:
    the saved tensors are the bf16 activations (x and the log-sum-exp in fp32), no bf16 copy
    of any weight; the gradients are autograd's up to bf16 rounding."""
    args = get_preset("1M", n_kv_heads=2)
    torch.manual_seed(0)
    base = build_model(args)
    manual = copy.deepcopy(base)
    apply_activation_checkpointing(manual, "manual")
    bsz, seqlen = 2, 64
    saved = _Saved({id(p) for p in manual.parameters()})
    x = torch.randn(bsz, seqlen, args.dim, requires_grad=True)
    cos, sin = rope_cos_sin(args.head_dim, args.rope_theta, torch.arange(seqlen))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            manual.layers[0](x, cos, sin, None)
    kv_dim = args.kv_heads * args.head_dim
    bf16 = 2 * (3 * args.dim + 2 * kv_dim + 2 * args.ffn_hidden_dim)  # q k v o ao u t
    fp32 = 4 * (args.dim + args.n_heads)  # x, lse
    assert saved.bytes == bsz * seqlen * (bf16 + fp32) + cos.nbytes + sin.nbytes

    tokens = torch.randint(0, args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(4))
    grads = []
    for model in (base, manual):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads.append(_loss_and_grads(model, tokens)[1])
    for name, ref in grads[0].items():
        got = grads[1][name]
        assert got.dtype == torch.float32
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2, name


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created inside the mode that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self._seen:
                    self._seen.add(key)
                    self.live += n
                    weakref.finalize(storage, self._free, key, n)
        return out


def test_memory_after_forward_is_below_selective_and_none():
    """What a forward pass leaves alive for the backward (the activations): manual keeps
    less than selective (which also keeps w2's output) and far less than none."""
    args = get_preset("1M")
    torch.manual_seed(0)
    base = build_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 129), generator=torch.Generator().manual_seed(3))
    held = {}
    for mode in ("none", "selective", "manual", "full"):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, mode)
        with _LiveBytes() as live:
            loss, n = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
            held[mode] = live.live
        (loss / n).backward()
    assert held["full"] < held["manual"] < held["selective"] < held["none"], held
    # what manual keeps beyond full's: per block and token, q k v o ao u t less x
    per_token = 4 * (3 * args.dim + 2 * args.dim + 2 * args.ffn_hidden_dim + args.n_heads)
    extra = per_token * 2 * 128 * args.n_layers
    assert held["manual"] - held["full"] == pytest.approx(extra, rel=0.02), held


@pytest.mark.slow
def test_pretrain_manual_matches_none_in_one_and_two_processes(corpus, tmp_path):  # noqa: F811
    short = ("steps=4", "eval_every=0", "checkpoint.every=0", "model.n_kv_heads=1")
    manual = "activation_checkpointing=manual"
    run(corpus, tmp_path / "none", *short)
    run(corpus, tmp_path / "one", *short, manual)
    run(corpus, tmp_path / "two", *short, manual, "parallel=fsdp", nproc=2)
    ref, one, two = (metrics(tmp_path / name) for name in ("none", "one", "two"))
    assert sorted(ref) == sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in ref:
        assert abs(one[step] - ref[step]) < 1e-5, (step, one[step], ref[step])
        assert abs(two[step] - ref[step]) < 1e-4, (step, two[step], ref[step])


@pytest.mark.slow
def test_tensor_parallel_blocks_match_autograd_on_the_full_model():
    """Two torchrun processes (Gloo), each block's linear layers split colwise/rowwise over
    them: the manual backward on the local shards, with its all-reduces, gives the loss and
    gradients of the unsharded model under autograd; and so it does with training's layout
    (``apply_tensor_parallel``: sequence parallelism, the block input a sequence slice, the
    Function's all-gathers and reduce-scatters along it). A layout it does not know is
    refused with the reason."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    port = str(29500 + (os.getpid() + 11) % 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", port, str(REPO / "tests" / "scripts" / "manual_backward_tp.py")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json_objects(proc.stdout)
    assert len(rows) == 2
    for r in rows:
        plain, sp = r["plain"], r["sp"]
        assert plain["sharded"] == 7 * 8 and plain["n_grads"] == 75, r  # 7 linears, 8 blocks
        assert sp["sharded"] == sp["n_grads"] == 75, r  # every parameter a DTensor
        for layout in (plain, sp):
            assert layout["loss_diff"] < 1e-6 and layout["grad_diff"] < 1e-5, r
            assert not layout["block_input_dtensor"], r
        assert plain["block_input_len"] == 48 and sp["block_input_len"] == 24, r
        assert "one norm sequence-parallel" in r["odd_refused"], r
        assert "use 'selective'" in r["odd_refused"], r


@pytest.mark.slow
def test_pretrain_with_tensor_parallelism_matches_one_process(corpus, tmp_path):  # noqa: F811
    """``parallel.tp=2`` (training's sequence-parallel layout) with ``manual``: the losses of
    one process without checkpointing, step by step."""
    short = ("steps=4", "eval_every=0", "checkpoint.every=0", "model.n_kv_heads=2")
    short += ("model.vocab_size=300",)  # heads, FFN, vocabulary and sequence split by 2
    run(corpus, tmp_path / "none", *short)
    run(corpus, tmp_path / "tp", *short, "parallel.tp=2", "activation_checkpointing=manual",
        nproc=2)  # fmt: skip
    ref, tp = metrics(tmp_path / "none"), metrics(tmp_path / "tp")
    assert sorted(ref) == sorted(tp) == [1, 2, 3, 4]
    for step in ref:
        assert abs(tp[step] - ref[step]) < 1e-4, (step, tp[step], ref[step])


@pytest.mark.slow
def test_pretrain_dp2_tp2_manual_matches_one_process(corpus, tmp_path):  # noqa: F811
    """4 processes, FSDP2 over 2 × tensor (+ sequence) parallelism over 2, ``manual``: the
    losses of one process without checkpointing."""
    short = ("steps=3", "eval_every=0", "checkpoint.every=0", "model.n_kv_heads=2")
    short += ("model.vocab_size=300",)
    run(corpus, tmp_path / "none", *short)
    run(corpus, tmp_path / "four", *short, "parallel.tp=2", "parallel.dp_shard=2",
        "activation_checkpointing=manual", nproc=4)  # fmt: skip
    ref, four = metrics(tmp_path / "none"), metrics(tmp_path / "four")
    assert sorted(ref) == sorted(four) == [1, 2, 3]
    for step in ref:
        assert abs(four[step] - ref[step]) < 1e-4, (step, four[step], ref[step])


def test_info_estimates_manual_from_what_the_function_keeps(capsys):
    """``llamaforge info``: per token and layer, manual keeps the block input (fp32), q k v,
    the attention output, wo's, w1's and w3's outputs (act_bytes) and the fp32 log-sum-exp
    per head, plus one block's backward working set; per GPU (bf16, sequence parallelism)
    all of it split tp ways."""
    import json

    from llamaforge.cli.main import main
    from llamaforge.training.flops import activation_memory, layout_memory

    args = get_preset("7B", vocab_size=32000)
    d, kvd, ffn, heads = args.dim, args.kv_heads * args.head_dim, args.ffn_hidden_dim, 32
    per_token = 4 * d + 2 * (3 * d + 2 * kvd + 2 * ffn) + 4 * heads
    logits = 10 * args.vocab_size
    working_set = 6 * 2 * ffn + 16 * d  # one block's backward at a time
    assert activation_memory(args, 100, "manual") == 100 * (32 * per_token + working_set + logits)
    s, tp = 2048, 2
    mem = layout_memory(args, tp=tp, dp_shard=4, seq_len=s, mode="manual")
    bf16 = 2 * d + 2 * (3 * d + 2 * kvd + 2 * ffn) + 4 * heads
    working_set = s * (12 * ffn + 16 * d) / tp
    logits = 10 * s * args.vocab_size / tp
    assert mem["activations"] == int(32 * s * bf16 / tp + working_set + logits)
    assert mem["activations"] < layout_memory(args, tp=tp, dp_shard=4, seq_len=s)["activations"]
    assert main(["info", "--preset", "7B", "--tp", "2", "--dp", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["activation_bytes"]["manual"] < info["activation_bytes"]["selective"]
    assert info["layout"]["bytes_per_gpu"]["manual"] == mem
    assert main(["info", "--layouts"]) == 0
    assert "act. manual" in capsys.readouterr().out
