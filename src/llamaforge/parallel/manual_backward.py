"""Activation checkpointing with a hand-written backward for the transformer block
(``activation_checkpointing = "manual"``), the paper's approach (SPEC §1.6).

``BlockFunction`` is the whole block — pre-norm attention and SwiGLU feed-forward with their
residual adds — as one ``torch.autograd.Function``. Its forward keeps exactly

* the block input ``x`` (the residual stream, needed anyway),
* the outputs of the linear layers that the backward reads: ``wq``, ``wk``, ``wv`` (before
  RoPE), ``wo``, ``w1`` and ``w3`` (``w2``'s output is not needed),
* the attention output (before ``wo``) and its softmax statistics (log-sum-exp per query),

and its backward recomputes the element-wise work — both RMSNorms, RoPE, SiLU and the
gate product — and runs every gradient by hand, top to bottom, the reverse of the forward.
Nothing else of the forward survives it: no norm outputs, no rotated q/k, no SiLU output,
no fp32 copies, no attention probabilities.

``use_manual_backward(block)`` makes a ``TransformerBlock`` use it by replacing the
instance's ``forward``: the module is still called as a module, so FSDP2's hooks gather its
parameters before and reshard them after, and parameter names do not change. The normal
forward still runs where nothing is trained (no gradients: evaluation, generation) and with
a KV cache. ``model.py`` is unchanged.

Attention runs on the fused kernels that return the log-sum-exp, with their own backward
kernels: ``_scaled_dot_product_flash_attention_for_cpu`` on the CPU (causal, or any mask as
an additive bias), ``_scaled_dot_product_flash_attention`` on CUDA for bf16/fp16 without a
mask; anything else (fp32 or a mask on CUDA, other devices) uses a plain matmul-softmax
implementation that saves the same statistics. Grouped-query attention expands the key/value
heads for the kernel and sums their gradients back over each group.

Packed rows with a flex_attention ``BlockMask`` (``model.document_mask``) take the model's
path, ``model.attend_flex`` (the fused kernels on CUDA, grouped-query heads served without
copies): torch has no public flex_attention backward to call with a saved output and
log-sum-exp, so the forward keeps flex_attention's own autograd node (``_FlexGraph``), which
holds the rotated q and k, v, the output and its log-sum-exp, and the backward runs it. q and
k before RoPE are then not kept: the node's rotated ones take their place, the same bytes.

Under tensor parallelism (DTensor weights: ``distributed.apply_tensor_parallel``) it runs on
each rank's heads and hidden units with the collectives written in — all-reduces for plain
column/row-split blocks, and with sequence parallelism (training's layout) all-gathers and
reduce-scatters along the sequence, so that the block input and output stay this rank's
sequence slice (see ``BlockFunction``).

Dtypes follow the model's: under autocast (the single-process bf16 path) the linear layers
compute in the autocast dtype, their fp32 weights cast where used (in the forward, again in
the backward: no bf16 copy of the weights is kept, as selective checkpointing keeps none)
and their gradients returned in fp32; the residual stream keeps its dtype; RMSNorm and RoPE
compute in fp32.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from llamaforge.model import attend_flex

__all__ = ["BlockFunction", "use_manual_backward", "attention_forward", "attention_backward"]

# -- element-wise pieces and their gradients -----------------------------------------------


def _up(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 at least, as the model computes norms and RoPE (fp64 stays fp64, so that
    ``gradcheck`` can check the Function in double precision)."""
    return x if x.dtype == torch.float64 else x.float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """The model's RMSNorm, returning (output, y, r): y = x·r in fp32, r = 1/rms(x)."""
    xf = _up(x)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * r
    return y.type_as(x) * weight, y, r


def _rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx, dweight) of out = y.type_as(x)·weight, y = x·r, r = (mean(x²)+eps)^-½.

    dy = grad·weight; dx = r·(dy − y·mean(dy·y)) (the norm's Jacobian, applied per row)."""
    dweight = (grad * y.type_as(x)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
    dy = _up(grad * weight)
    dx = r * (dy - y * (dy * y).mean(-1, keepdim=True))
    return dx.to(x.dtype), dweight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as ``model.apply_rope`` computes it (fp32, interleaved pairs), on x (b, s, h, d).
    A rotation: its gradient is the rotation by the opposite angle, ``_rope(g, cos, -sin)``."""
    xf = _up(x).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def _linear_backward(
    grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d input, d weight) of out = inp @ weight.T over flattened tokens, computed in the
    compute dtype (grad's); d weight in the weight's own dtype (fp32 master weights)."""
    dweight = grad.reshape(-1, grad.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])
    return grad @ weight.to(grad.dtype), dweight.to(weight.dtype)


# -- attention with its log-sum-exp ------------------------------------------------------------


def _attention_kind(q: torch.Tensor, mask: torch.Tensor | BlockMask | None) -> str:
    if isinstance(mask, BlockMask):
        return "flex"
    if q.device.type == "cpu":
        return "cpu-flash"
    if (
        q.device.type == "cuda"
        and mask is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    ):
        return "cuda-flash"
    return "math"


def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = attend) as the additive bias the kernels take."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf")
    )


class _FlexGraph:
    """flex_attention's autograd graph over detached q, k, v, from the block's forward to its
    backward: its node keeps the inputs, the output and the log-sum-exp, and its backward (the
    fused kernel on CUDA) runs from them once — again only while the caller's backward keeps
    its graph (``retain_graph``, as ``gradcheck`` does)."""

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
    ) -> None:
        self.inputs: tuple[torch.Tensor, ...] | None = tuple(
            t.detach().requires_grad_() for t in (q, k, v)
        )
        with torch.enable_grad():  # (an autograd.Function's forward runs without)
            self.out = attend_flex(*self.inputs, block_mask)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.inputs is None:
            raise RuntimeError(
                "manual backward: a second backward through flex attention's graph, which the "
                "first one freed; pass retain_graph=True to the first"
            )
        keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", bool)()
        grads = torch.autograd.grad(self.out, self.inputs, grad, retain_graph=keep)
        if not keep:  # free what flex_attention's node holds as soon as it has run
            self.inputs = self.out = None  # type: ignore[assignment]
        return grads


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | BlockMask | None,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[Any, ...]]:
    """softmax(q·kᵀ/√d [+ mask, else causal])·v on (b, h, s, d) with as many heads in k, v
    as in q (kind "flex": a BlockMask, and k, v with their own key/value heads). Returns
    (out, lse (b, h, s) fp32, kernel extras for the backward); "flex" returns no lse, its
    extras being the ``_FlexGraph`` that holds it."""
    aten = torch.ops.aten
    causal = mask is None
    if kind == "flex":
        graph = _FlexGraph(q, k, v, mask)  # type: ignore[arg-type]
        return graph.out.detach(), None, (graph,)
    if kind == "cpu-flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_bias(mask, q.dtype)
        )
        return out, lse, ()
    if kind == "cuda-flash":
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    # math: the scores in fp32, the statistics saved, the probabilities not
    scores = (_up(q) @ _up(k).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores + _math_bias(mask, q)
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.exp(scores - lse[..., None]) @ _up(v)).to(q.dtype)
    return out, lse, ()


def _math_bias(mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if mask is None:
        s = q.shape[-2]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    return _bias(mask, torch.float32)  # type: ignore[return-value]


def attention_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    mask: torch.Tensor | BlockMask | None,
    kind: str,
    extras: tuple[Any, ...],
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of ``attention_forward``, from its saved output and log-sum-exp ("flex":
    from the graph in ``extras``, which holds them; q, k, v, out and lse are unused)."""
    aten = torch.ops.aten
    causal = mask is None
    if kind == "flex":
        return extras[0].backward(grad)
    if kind == "cpu-flash":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, causal, attn_mask=_bias(mask, q.dtype)
        )
    if kind == "cuda-flash":
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset
        )
        return dq, dk, dv
    # math: p = exp(s − lse) recomputed; ds = p·(dp − rowsum(dO·O)); dq = ds·k/√d, dk = dsᵀ·q/√d
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf, gf = _up(q), _up(k), _up(v), _up(grad)
    scores = (qf @ kf.transpose(-2, -1)) * scale + _math_bias(mask, q)
    p = torch.exp(scores - lse[..., None])
    dv = p.transpose(-2, -1) @ gf
    dp = gf @ vf.transpose(-2, -1)
    ds = p * (dp - (gf * _up(out)).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-2, -1) @ qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# -- the block -------------------------------------------------------------------------------


class BlockFunction(torch.autograd.Function):
    """out = h + w2(silu(w1·n₂) ⊙ w3·n₂), n₂ = ffn_norm(h); h = x + wo(attn(rope(wq·n₁),
    rope(wk·n₁), wv·n₁)), n₁ = attention_norm(x) — ``TransformerBlock.forward`` without a
    cache. ``mask``: None (causal), boolean broadcastable to (b, 1, s, s), True = attend, or a
    flex_attention ``BlockMask`` (packed rows: ``model.document_mask``).
    The linear layers compute in ``compute_dtype`` (default: the weights'), their weights are
    cast to it where used; x and the norm gains keep their dtypes.
    ``kernel``: the attention implementation, "auto" (the fused kernel of the device where
    there is one; "flex" with a BlockMask) or "cpu-flash" | "cuda-flash" | "math" | "flex".

    Tensor parallelism (Megatron's layout) with ``tp_group``: the weights are this rank's
    shards — wq/wk/wv/w1/w3 split by output rows (whole heads, hidden units), wo/w2 by input
    columns — and x is replicated. The outputs of wo and w2 are then partial sums, all-reduced
    in the forward; the gradients of the norms' outputs likewise in the backward.

    With ``sequence_parallel`` as well (Korthikanti et al. 2022, training's layout), x is this
    rank's slice of the sequence (dim 1) and so is the output: each norm runs on the slice and
    its output is all-gathered along the sequence before the column-split layers; the outputs
    of wo and w2 are reduce-scattered along it instead of all-reduced. The backward reverses
    them: the output gradient (and the residual stream's before wo) is all-gathered, the
    gradients of the gathered norm outputs reduce-scattered, and the norm gains' gradients (a
    sum over this rank's tokens) all-reduced. The gathered norm outputs are not kept: the
    backward re-gathers them for the weight gradients, as Megatron does."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        attn_norm: torch.Tensor,
        wq: torch.Tensor,
        wk: torch.Tensor,
        wv: torch.Tensor,
        wo: torch.Tensor,
        ffn_norm: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        w3: torch.Tensor,
        head_dim: int,
        eps: float,
        kernel: str = "auto",
        tp_group: Any = None,
        compute_dtype: torch.dtype | None = None,
        sequence_parallel: bool = False,
    ) -> torch.Tensor:
        # the linear layers' compute dtype (autocast's): weights are cast where they are used,
        # as temporaries, so that no low-precision copy of them is kept for the backward
        cd = compute_dtype or wq.dtype
        n_heads, n_kv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
        comm = _Comm(tp_group, sequence_parallel)
        # attention (on the whole sequence: with sequence parallelism, n₁ is gathered)
        n1 = comm.gather(_rms_norm(x, attn_norm, eps)[0].to(cd))
        q, k, v = F.linear(n1, wq.to(cd)), F.linear(n1, wk.to(cd)), F.linear(n1, wv.to(cd))
        del n1
        flex = isinstance(mask, BlockMask)  # flex_attention takes the key/value heads as they are
        qh, kh, vh = _heads(q, k, v, cos, sin, head_dim, n_heads, n_kv, expand=not flex)
        kind = _attention_kind(qh, mask) if kernel == "auto" else kernel
        if (kind == "flex") != flex:
            raise ValueError(
                f"BlockFunction: kernel={kind!r} with {type(mask).__name__} as mask; a "
                "BlockMask takes kernel 'flex' (or 'auto'), no mask or a boolean one the others"
            )
        o, lse, extras = attention_forward(qh, kh, vh, mask, kind)
        del qh, kh, vh
        bsz, seqlen = q.shape[:2]
        ao = comm.reduce(F.linear(o.transpose(1, 2).reshape(bsz, seqlen, -1), wo.to(cd)))
        h = x + ao
        # feed-forward
        n2 = comm.gather(_rms_norm(h, ffn_norm, eps)[0].to(cd))
        u, t = F.linear(n2, w1.to(cd)), F.linear(n2, w3.to(cd))
        del n2
        out = h + comm.reduce(F.linear(F.silu(u) * t, w2.to(cd)))

        tensors = [x, cos, sin, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3]
        # flex: its graph (in extras) holds the rotated q, k and v in place of these
        tensors += [None, None, None] if flex else [q, k, v]
        tensors += [o, lse, ao, u, t]
        has_mask = isinstance(mask, torch.Tensor)  # (a BlockMask lives in flex's graph)
        tensors += [mask] if has_mask else []
        tensors += [e for e in extras if isinstance(e, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.has_mask, ctx.kind, ctx.head_dim, ctx.eps = has_mask, kind, head_dim, eps
        ctx.comm, ctx.cd = comm, cd
        # the kernel's extras: tensors go through save_for_backward, the rest (sizes, and
        # the None a kernel returns for an undefined tensor) is kept as it is
        ctx.extras = [(isinstance(e, torch.Tensor), None if isinstance(e, torch.Tensor) else e)
                      for e in extras]  # fmt: skip
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        x, cos, sin, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3 = saved[:12]
        q, k, v, o, lse, ao, u, t = saved[12:20]
        rest = saved[20:]
        mask = rest.pop(0) if ctx.has_mask else None
        extras = tuple(rest.pop(0) if saved else value for saved, value in ctx.extras)
        eps, head_dim, cd, comm = ctx.eps, ctx.head_dim, ctx.cd, ctx.comm
        bsz, seqlen = o.shape[0], o.shape[2]  # the whole sequence (x: a slice of it under SP)
        n_heads, n_kv = wq.shape[0] // head_dim, wk.shape[0] // head_dim

        # out = h + w2(m): recompute h, n₂ and m = silu(u)·t
        h = x + ao
        n2, y2, r2 = _rms_norm(h, ffn_norm, eps)
        silu = F.silu(u)
        dm, dw2 = _linear_backward(comm.gather(grad.to(cd)), silu * t, w2)
        # m = silu(u)·t; silu'(u) = σ(u)·(1 + u·(1 − σ(u))), in fp32 as autograd's kernel does
        dt = dm * silu
        uf = _up(u)
        sig = torch.sigmoid(uf)
        du = (_up(dm * t) * (sig * (1 + uf * (1 - sig)))).to(cd)
        del sig, uf, silu, dm
        n2c = comm.gather(n2.to(cd))
        dn2_u, dw1 = _linear_backward(du, n2c, w1)
        dn2_t, dw3 = _linear_backward(dt, n2c, w3)
        del du, dt, n2c
        dn2 = comm.reduce(dn2_u + dn2_t)  # each rank's hidden units: a partial sum
        dh, dffn_norm = _rms_norm_backward(dn2.to(n2.dtype), h, ffn_norm, y2, r2)
        dffn_norm = comm.gain_grad(dffn_norm)
        del n2, y2, r2, dn2_u, dn2_t, dn2
        dh = grad + dh  # the residual path, then h = x + ao

        # ao = wo(o)
        o_flat = o.transpose(1, 2).reshape(bsz, seqlen, -1)
        do_flat, dwo = _linear_backward(comm.gather(dh.to(cd)), o_flat, wo)
        del o_flat
        do = do_flat.view(bsz, seqlen, n_heads, head_dim).transpose(1, 2)
        # attention, from the saved output and log-sum-exp; RoPE recomputed (flex: its graph)
        flex = ctx.kind == "flex"
        heads = (q, k, v) if flex else _heads(q, k, v, cos, sin, head_dim, n_heads, n_kv)
        dqh, dkh, dvh = attention_backward(do, *heads, o, lse, mask, ctx.kind, extras)
        del heads, do, do_flat
        if dkh.shape[1] != n_kv:  # the kernel's copies of each kv head: sum over its group
            dkh = dkh.unflatten(1, (n_kv, -1)).sum(2)
            dvh = dvh.unflatten(1, (n_kv, -1)).sum(2)
        # RoPE is a rotation: its gradient rotates back
        dq = _rope(dqh.transpose(1, 2), cos, -sin).flatten(2)
        dk = _rope(dkh.transpose(1, 2), cos, -sin).flatten(2)
        dv = dvh.transpose(1, 2).flatten(2)
        del dqh, dkh, dvh
        # q, k, v = wq·n₁, wk·n₁, wv·n₁, n₁ = attention_norm(x)
        n1, y1, r1 = _rms_norm(x, attn_norm, eps)
        n1c = comm.gather(n1.to(cd))
        dn1_q, dwq = _linear_backward(dq, n1c, wq)
        dn1_k, dwk = _linear_backward(dk, n1c, wk)
        dn1_v, dwv = _linear_backward(dv, n1c, wv)
        del n1c, dq, dk, dv
        dn1 = comm.reduce(dn1_q + dn1_k + dn1_v).to(n1.dtype)  # over the heads
        dx, dattn_norm = _rms_norm_backward(dn1, x, attn_norm, y1, r1)
        dattn_norm = comm.gain_grad(dattn_norm)
        dx = dh.to(x.dtype) + dx
        return (
            dx, None, None, None,
            dattn_norm, dwq, dwk, dwv, dwo,
            dffn_norm, dw1, dw2, dw3,
            None, None, None, None, None, None,
        )  # fmt: skip


def _heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
    n_heads: int,
    n_kv: int,
    expand: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The linear outputs as the kernel's (b, heads, s, d) q, k, v: RoPE on q and k, the
    key/value heads repeated to one per query head (unless not ``expand``)."""
    bsz, seqlen, _ = q.shape
    qh = _rope(q.view(bsz, seqlen, n_heads, head_dim), cos, sin).transpose(1, 2)
    kh = _rope(k.view(bsz, seqlen, n_kv, head_dim), cos, sin).transpose(1, 2)
    vh = v.view(bsz, seqlen, n_kv, head_dim).transpose(1, 2)
    if expand and n_kv != n_heads:
        kh = kh.repeat_interleave(n_heads // n_kv, dim=1)
        vh = vh.repeat_interleave(n_heads // n_kv, dim=1)
    return qh, kh, vh


# -- making a block use it ---------------------------------------------------------------------


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``t`` over the tensor-parallel group in place (nothing without one)."""
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


class _Comm:
    """The block's tensor-parallel communication over ``group`` (none without one).

    ``gather``: a norm output (or a gradient of the residual stream) as the column-split
    layers take it — all-gathered along the sequence (dim 1) with sequence parallelism, as it
    is without. ``reduce``: the partial sums of the row-split layers (or of the gradients of
    the gathered inputs) — reduce-scattered along the sequence with sequence parallelism,
    all-reduced without. ``gain_grad``: a norm gain's gradient, a sum over this rank's tokens
    only with sequence parallelism, all-reduced then (the gain is replicated)."""

    def __init__(self, group: Any, sequence_parallel: bool) -> None:
        self.group, self.sp = group, sequence_parallel and group is not None

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        if not self.sp:
            return t
        from torch.distributed import _functional_collectives as funcol

        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        return _waited(gather(t.contiguous(), 1, self.group))

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        if not self.sp:
            return _all_reduce(t, self.group)
        from torch.distributed import _functional_collectives as funcol

        scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
        return _waited(scatter(t.contiguous(), "sum", 1, self.group))

    def gain_grad(self, t: torch.Tensor) -> torch.Tensor:
        return _all_reduce(t, self.group) if self.sp else t


def _waited(t: torch.Tensor) -> torch.Tensor:
    """A functional collective's result as a plain tensor (its wait done)."""
    wait = getattr(t, "wait", None)
    return wait() if wait is not None else t


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _refuse_layout(why: str) -> NotImplementedError:
    return NotImplementedError(
        f"activation_checkpointing='manual' with this tensor-parallel layout ({why}) is not "
        "supported; use 'selective' (the same tensors kept, by torch's checkpointing)"
    )


def _tp_local(
    weights: tuple[torch.Tensor, ...], gains: tuple[torch.Tensor, ...], x: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], Any, bool]:
    """This rank's shards of tensor-parallel (DTensor) weights and gains, the tensor-parallel
    group, and whether the layout is sequence-parallel.

    Supported: one mesh dimension, wq/wk/wv/w1/w3 ``Shard(0)`` (colwise), wo/w2 ``Shard(1)``
    (rowwise), and either plain norm gains with a replicated block input, or (sequence
    parallelism, ``distributed.apply_tensor_parallel``'s training layout: torch's
    ``SequenceParallel`` on the norms) replicated DTensor gains with the block input this
    rank's slice of the sequence — a plain tensor, as the row-split layers before it return
    one, or a ``Shard(1)`` DTensor. ``to_local`` is differentiable: the shards' gradients come
    back as DTensors of the same layout (the gains' must then be whole sums: the Function
    all-reduces them)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    refuse = _refuse_layout
    if not all(isinstance(w, DTensor) for w in weights):
        raise refuse("some linear weights are DTensors, others not")
    mesh = weights[0].device_mesh
    expected = (Shard(0), Shard(0), Shard(0), Shard(1), Shard(0), Shard(1), Shard(0))
    for w, want in zip(weights, expected):
        if w.device_mesh != mesh or tuple(w.placements) != (want,):
            raise refuse(f"a weight placed {tuple(w.placements)} on {w.device_mesh}")
    split_gains = [isinstance(g, DTensor) for g in gains]
    sp = all(split_gains)
    if any(split_gains) and not sp:
        raise refuse("one norm sequence-parallel, the other not")
    if sp:
        for g in gains:
            if g.device_mesh != mesh or tuple(g.placements) != (Replicate(),):  # type: ignore[attr-defined]
                raise refuse(f"a norm gain placed {tuple(g.placements)}")  # type: ignore[attr-defined]
        gains = tuple(g.to_local() for g in gains)  # type: ignore[attr-defined]
    want_x = (Shard(1),) if sp else (Replicate(),)
    if isinstance(x, DTensor) and (x.device_mesh != mesh or tuple(x.placements) != want_x):
        raise refuse(
            f"block input placed {tuple(x.placements)}, expected {want_x} "
            f"({'with' if sp else 'without'} sequence parallelism on the norms)"
        )
    return tuple(w.to_local() for w in weights), gains, mesh.get_group(), sp


def _linears(block: nn.Module) -> list[tuple[str, nn.Module]]:
    attn, ffn = block.attention, block.feed_forward
    names = ("wq", "wk", "wv", "wo")
    return [(f"attention.{n}", getattr(attn, n)) for n in names] + [
        (f"feed_forward.{n}", getattr(ffn, n)) for n in ("w1", "w2", "w3")
    ]


def _check_plain_linears(block: nn.Module) -> None:
    """The Function computes ``x @ weight.T``: a layer that does more (a LoRA adapter, a
    quantized weight, a bias) would be silently dropped, so it is refused."""
    for name, layer in _linears(block):
        if type(layer) is not nn.Linear or layer.bias is not None:
            raise ValueError(
                f"activation_checkpointing='manual' needs plain bias-free nn.Linear layers, but "
                f"layers.{block.layer_id}.{name} is a {type(layer).__name__} (LoRA or "
                "quantized weights?); use 'selective' there"
            )


def _manual_forward(
    self: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | BlockMask | None,
    cache: Any = None,
    start_pos: int = 0,
) -> torch.Tensor:
    """``TransformerBlock.forward`` through ``BlockFunction`` when gradients are wanted."""
    attn, ffn = self.attention, self.feed_forward
    if cache is not None or not torch.is_grad_enabled():
        # decoding or evaluation: nothing to save, the normal forward is the cheaper one
        return type(self).forward(self, x, cos, sin, mask, cache, start_pos)
    _check_plain_linears(self)  # (cheap; adapters could be added after use_manual_backward)
    weights = (attn.wq.weight, attn.wk.weight, attn.wv.weight, attn.wo.weight)
    weights += (ffn.w1.weight, ffn.w2.weight, ffn.w3.weight)
    gains = (self.attention_norm.weight, self.ffn_norm.weight)
    tp_group, sp, x_dtensor = None, False, x if _is_dtensor(x) else None
    if any(_is_dtensor(t) for t in (*weights, *gains)) or x_dtensor is not None:
        # tensor parallelism: the Function runs on this rank's heads and hidden units (and,
        # with sequence parallelism, its slice of the sequence outside attention and FFN)
        weights, gains, tp_group, sp = _tp_local(weights, gains, x)
        if x_dtensor is not None:
            x = x.to_local()  # type: ignore[attr-defined]
    device = x.device.type
    # autocast (one process, bf16): the linear layers compute in its dtype, as F.linear would
    cd = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    wq, wk, wv, wo, w1, w2, w3 = weights
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        raise ValueError(f"manual backward: the attention mask must be boolean, got {mask.dtype}")
    with torch.autocast(device, enabled=False):
        out = BlockFunction.apply(
            x, cos, sin, mask,
            gains[0], wq, wk, wv, wo,
            gains[1], w1, w2, w3,
            attn.head_dim, self.attention_norm.eps, "auto", tp_group, cd, sp,
        )  # fmt: skip
    if x_dtensor is not None:  # placed as it came: replicated, or a sequence slice
        from torch.distributed.tensor import DTensor

        out = DTensor.from_local(out, x_dtensor.device_mesh, x_dtensor.placements)
    return out


def use_manual_backward(block: nn.Module) -> nn.Module:
    """Make ``block`` (a ``TransformerBlock``) run through ``BlockFunction`` when training;
    in place (the instance's ``forward`` is replaced), returns the block."""
    if not all(hasattr(block, n) for n in ("attention", "feed_forward", "attention_norm")):
        raise TypeError(f"use_manual_backward: {type(block).__name__} is not a TransformerBlock")
    _check_plain_linears(block)
    if block.attention_norm.eps != block.ffn_norm.eps:
        raise ValueError("use_manual_backward: the block's two norms have different eps")
    block.forward = types.MethodType(_manual_forward, block)  # type: ignore[method-assign]
    return block
