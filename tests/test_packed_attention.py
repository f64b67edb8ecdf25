"""Packed rows without a dense mask: document ids (the packed loader's) become a
flex_attention BlockMask (``model.document_mask``) shared by every layer, and attention —
the autograd one and the hand-written backward's — runs through ``flex_attention``; the
logits and gradients are those of the dense block-diagonal mask, with and without
grouped-query attention, and a packed example's are those it has alone.

torch's flex_attention refuses gradients on the CPU in its argument checks only
(``_validate_device``); its reference implementation — the one torch checks its CUDA kernels
against — has a backward. The ``cpu_flex_backward`` fixture lifts that one check so that the
CPU runs this path with gradients; the CUDA kernels run the same tests where there is a GPU
(bench/gpu_suite.sh, step packed-attention).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import BlockMask

from llamaforge.model import ModelArgs, build_model, document_mask, rope_cos_sin
from llamaforge.parallel import apply_activation_checkpointing, unwrapped_name
from llamaforge.parallel.manual_backward import BlockFunction, use_manual_backward
from llamaforge.presets import get_preset
from llamaforge.training.optim import cross_entropy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# fp32 everywhere; CUDA's fused kernels sum in another order than the CPU's reference
ATOL = {"cpu": 1e-5, "cuda": 1e-4}


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """flex_attention with gradients on the CPU (its reference backward; see the docstring)."""
    check = flex_module._validate_device

    def validate(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        if query.device.type != "cpu":
            check(query, key, value)

    monkeypatch.setattr(flex_module, "_validate_device", validate)


def packed_documents(lengths: list[list[int]], seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(documents, positions) of rows holding examples of ``lengths``, the tail of each row a
    padding document of its own, as ``PackedLoader`` lays them out."""
    docs = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    pos = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for r, row in enumerate(lengths):
        at = 0
        for d, n in enumerate(row + [seqlen - sum(row)]):
            docs[r, at : at + n], pos[r, at : at + n] = d, torch.arange(n)
            at += n
    return docs, pos


# three rows of 150 positions: documents across the 128-position blocks of a BlockMask, a
# one-token document, and a row that is a single document
LENGTHS = [[40, 1, 70, 30], [150], [7, 128]]
SEQLEN = 150


def loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor, **kw) -> tuple:
    model.zero_grad()
    logits = model(tokens[:, :-1], **kw)
    loss, n = cross_entropy(logits, tokens[:, 1:])
    (loss / n).backward()
    grads = {unwrapped_name(name): p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


def test_dense_document_mask_is_block_diagonal_causal():
    docs, _ = packed_documents([[3, 2]], 7)
    mask = document_mask(docs, flex=False)
    expect = torch.zeros(7, 7, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 7)):
        expect[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    assert mask.shape == (1, 1, 7, 7) and torch.equal(mask[0, 0], expect)
    assert isinstance(document_mask(docs, flex=True), BlockMask)


@pytest.mark.parametrize("device", DEVICES)
def test_documents_choose_the_devices_path(device):
    """CUDA: a BlockMask (flex_attention); CPU: the dense mask (no flex backward there)."""
    docs, _ = packed_documents(LENGTHS, SEQLEN)
    chosen = document_mask(docs.to(device))
    assert isinstance(chosen, BlockMask) == (device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_flex_forward_equals_the_dense_mask_and_each_example_alone(device, n_kv_heads):
    """No gradients: flex_attention runs on the CPU as it is."""
    torch.manual_seed(0)
    model = build_model(get_preset("1M", n_layers=2, n_kv_heads=n_kv_heads), device=device)
    docs, pos = (t.to(device) for t in packed_documents(LENGTHS, SEQLEN))
    tokens = torch.randint(0, 4096, docs.shape, device=device)
    with torch.no_grad():
        dense = model(tokens, mask=document_mask(docs, flex=False), positions=pos)
        flex = model(tokens, mask=document_mask(docs, flex=True), positions=pos)
        torch.testing.assert_close(flex, dense, rtol=0, atol=ATOL[device])
        torch.testing.assert_close(
            model(tokens, documents=docs, positions=pos), flex, rtol=0, atol=ATOL[device]
        )
        for r, row in enumerate(LENGTHS):
            at = 0
            for n in row:
                alone = model(tokens[r : r + 1, at : at + n])[0]
                torch.testing.assert_close(flex[r, at : at + n], alone, rtol=0, atol=ATOL[device])
                at += n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_kv_heads", [None, 2])
@pytest.mark.parametrize("ac", ["none", "selective", "manual"])
def test_flex_logits_and_gradients_equal_the_dense_mask(cpu_flex_backward, device, n_kv_heads, ac):
    """The packed step through flex_attention (autograd's, or the hand-written backward's)
    gives the dense block-diagonal mask's logits and gradients."""
    args = get_preset("1M", n_layers=2, n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    base = build_model(args, device=device)
    model = copy.deepcopy(base)
    apply_activation_checkpointing(model, ac)
    docs, pos = (t.to(device) for t in packed_documents(LENGTHS, SEQLEN))
    tokens = torch.randint(0, args.vocab_size, (len(LENGTHS), SEQLEN + 1), device=device)
    ref_logits, ref = loss_and_grads(
        base, tokens, mask=document_mask(docs, flex=False), positions=pos
    )
    logits, got = loss_and_grads(model, tokens, mask=document_mask(docs, flex=True), positions=pos)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL[device])
    assert list(got) == list(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=ATOL[device], msg=name)


def block_inputs(args, bsz: int, seqlen: int, dtype: torch.dtype) -> tuple:
    """A block's weights (leaves that want gradients, attention's scaled up) and input."""
    torch.manual_seed(0)
    block = build_model(args, dtype=dtype).layers[0]
    names = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
             "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]  # fmt: skip
    weights = [block.get_submodule(n).weight.detach().clone().requires_grad_() for n in names]
    with torch.no_grad():
        for w in weights[1:5]:
            w.mul_(25.0)  # attention far from uniform, so that every path weighs in
    x = torch.randn(bsz, seqlen, args.dim, dtype=dtype, requires_grad=True)
    return weights, x


def test_manual_block_gradcheck_fp64_through_flex(cpu_flex_backward):
    """The hand-written backward's flex path in double precision against finite differences,
    grouped-query heads included (gradcheck runs the backward again: ``retain_graph``)."""
    args = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=10, multiple_of=8)
    docs, pos = packed_documents([[2, 3], [6]], 7)
    weights, x = block_inputs(args, 2, 7, torch.float64)
    cos, sin = (t.double() for t in rope_cos_sin(args.head_dim, args.rope_theta, pos))
    mask = document_mask(docs, flex=True)

    def f(x: torch.Tensor, *w: torch.Tensor) -> torch.Tensor:
        return BlockFunction.apply(x, cos, sin, mask, *w, args.head_dim, args.norm_eps, "auto")

    assert torch.autograd.gradcheck(f, (x, *weights), fast_mode=True)


def test_manual_block_refuses_a_kernel_that_does_not_take_the_mask():
    args = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=10, multiple_of=8)
    docs, pos = packed_documents([[2, 3]], 7)
    weights, x = block_inputs(args, 1, 7, torch.float32)
    cos, sin = rope_cos_sin(args.head_dim, args.rope_theta, pos)
    for flex, kernel in ((True, "math"), (False, "flex")):
        mask = document_mask(docs, flex=flex)
        with pytest.raises(ValueError, match=f"kernel='{kernel}' with .*a BlockMask takes"):
            BlockFunction.apply(x, cos, sin, mask, *weights, args.head_dim, args.norm_eps, kernel)


class _Saved:
    """Bytes of the tensors autograd saves, parameters left out, each storage once."""

    def __init__(self, params: set[int]) -> None:
        self.params, self.bytes, self.shapes = params, 0, []
        self._seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if id(t) not in self.params and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
            self.shapes.append(tuple(t.shape))
        return t


def test_manual_flex_keeps_what_the_dense_path_keeps_but_the_mask(cpu_flex_backward):
    """Per block, the hand-written backward's flex path keeps what its dense path keeps — x,
    q, k, v (rotated: flex's node holds them), the attention output and its log-sum-exp, wo's,
    w1's and w3's outputs — less the (b, 1, s, s) mask, plus the documents, the BlockMask's
    block tables and flex's other per-query statistic."""
    args = get_preset("1M", n_kv_heads=2)
    model = build_model(args)
    apply_activation_checkpointing(model, "manual")
    docs, pos = packed_documents(LENGTHS, SEQLEN)
    bsz, seqlen = docs.shape
    cos, sin = rope_cos_sin(args.head_dim, args.rope_theta, pos)
    x = torch.randn(bsz, seqlen, args.dim, requires_grad=True)
    held = {}
    for flex in (False, True):
        held[flex] = _Saved({id(p) for p in model.parameters()})
        with torch.autograd.graph.saved_tensors_hooks(held[flex].pack, lambda t: t):
            model.layers[0](x, cos, sin, document_mask(docs, flex=flex))
    assert (bsz, 1, seqlen, seqlen) in held[False].shapes
    assert not any(s[-2:] == (seqlen, seqlen) for s in held[True].shapes), held[True].shapes
    stat, ids = 4 * bsz * args.n_heads * seqlen, docs.nbytes
    extra = held[True].bytes - (held[False].bytes - bsz * seqlen * seqlen)
    assert ids <= extra <= ids + stat + 1024, extra


@pytest.mark.parametrize("retain", [False, True])
def test_manual_flex_frees_its_graph_unless_retained(cpu_flex_backward, retain):
    """What flex_attention's node keeps goes with the backward that ran it; with
    ``retain_graph`` it stays, and a second backward gives the same gradients."""
    args = get_preset("1M", n_kv_heads=2)
    block = build_model(args).layers[0]
    use_manual_backward(block)
    docs, pos = packed_documents(LENGTHS, SEQLEN)
    cos, sin = rope_cos_sin(args.head_dim, args.rope_theta, pos)
    x = torch.randn(*docs.shape, args.dim, requires_grad=True)
    out = block(x, cos, sin, document_mask(docs, flex=True))
    ((_, graph),) = out.grad_fn.extras  # BlockFunction's context: the _FlexGraph
    (first,) = torch.autograd.grad(out.square().sum(), x, retain_graph=retain)
    assert (graph.inputs is not None) == retain
    if retain:
        (second,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        assert graph.inputs is None


def test_documents_are_checked():
    model = build_model(get_preset("1M", n_layers=1))
    tokens = torch.zeros(2, 8, dtype=torch.long)
    docs = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="documents .*replaces mask"):
        model(tokens, documents=docs, mask=document_mask(docs, flex=False))
    with pytest.raises(ValueError, match="start_pos=3"):
        model(tokens, 3, documents=docs)
    with pytest.raises(ValueError, match=r"documents has shape \(2, 7\), expected .*\(2, 8\)"):
        model(tokens, documents=docs[:, :7])
    with pytest.raises(ValueError, match="integer ids of shape"):
        document_mask(docs.float())
