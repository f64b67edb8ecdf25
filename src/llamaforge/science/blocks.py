"""The GPT-2 block and each of LLaMA's changes to it as a switch, for ablations.

``model.py`` is the paper's block, top to bottom; this module lives beside it and builds
the block the paper started from — GPT-2's pre-LayerNorm with biases, a GELU MLP of 4d,
learned absolute positions, an output layer tied to the embedding — with every change the
paper adopts (§2.2) as one field of `Architecture`:

    norm       layernorm → rmsnorm        (pre-normalisation with RMSNorm, from GPT-3 / Zhang)
    mlp        gelu (4d) → swiglu (2/3·4d) (PaLM; equal parameters)
    positions  learned → rope             (GPTNeo)
    bias       True → False               (LLaMA's linear layers and norms have none)
    tied       True → False               (a separate output layer)

plus ``norm_position`` pre / post (the original Transformer's post-norm), which LLaMA does
not change but whose stability the paper's choice rests on. With every switch at LLaMA's
setting the parameter names are Meta's and the forward pass is ``model.py``'s, operation
for operation: the same state dict gives the same logits (tests/test_science_blocks.py).

The reused pieces (RMSNorm, the rotary angles and rotation) are ``model.py``'s own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.model import ModelArgs, RMSNorm, Transformer, apply_rope, rope_cos_sin


@dataclass(frozen=True)
class Architecture:
    """Which block: the defaults are LLaMA's, `GPT2` the baseline."""

    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_position: Literal["pre", "post"] = "pre"
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    positions: Literal["learned", "rope"] = "rope"
    bias: bool = False
    tied: bool = False

    def __post_init__(self) -> None:
        allowed = {
            "norm": ("layernorm", "rmsnorm"),
            "norm_position": ("pre", "post"),
            "mlp": ("gelu", "swiglu"),
            "positions": ("learned", "rope"),
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(
                    f"architecture {name}={getattr(self, name)!r}: expected one of {values}"
                )
        for name in ("bias", "tied"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"architecture {name}={getattr(self, name)!r}: expected a bool")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LLAMA = Architecture()
GPT2 = Architecture(norm="layernorm", mlp="gelu", positions="learned", bias=True, tied=True)

# The ablation ladder: from GPT-2's block to LLaMA's, one of the paper's changes a rung.
LADDER: list[tuple[str, Architecture]] = [
    ("gpt2", GPT2),
    ("+rmsnorm", replace(GPT2, norm="rmsnorm")),
    ("+swiglu", replace(GPT2, norm="rmsnorm", mlp="swiglu")),
    ("+rope", replace(GPT2, norm="rmsnorm", mlp="swiglu", positions="rope")),
    ("+no bias", replace(GPT2, norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)),
    ("+untied = llama", LLAMA),
]


def gelu_hidden_dim(args: ModelArgs) -> int:
    """GPT-2's MLP width, 4d."""
    return 4 * args.dim


class LayerNorm(nn.Module):
    """LayerNorm in fp32 (as RMSNorm is), with or without its bias."""

    def __init__(self, dim: int, eps: float, bias: bool) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), b, self.eps)
        return out.type_as(x)


class RMSNormBias(RMSNorm):
    """RMSNorm plus a bias (the biased rungs keep every bias they had)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


def make_norm(arch: Architecture, dim: int, eps: float) -> nn.Module:
    if arch.norm == "layernorm":
        return LayerNorm(dim, eps, arch.bias)
    return RMSNormBias(dim, eps) if arch.bias else RMSNorm(dim, eps)


class Attention(nn.Module):
    """Multi-head causal self-attention; rotary or no position signal (learned positions
    are added to the embeddings), with or without biases. Meta's names: wq, wk, wv, wo."""

    def __init__(self, args: ModelArgs, arch: Architecture) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope = args.n_heads, args.head_dim, arch.positions
        d, b = args.dim, arch.bias
        self.wq = nn.Linear(d, d, bias=b)
        self.wk = nn.Linear(d, d, bias=b)
        self.wv = nn.Linear(d, d, bias=b)
        self.wo = nn.Linear(d, d, bias=b)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        if self.rope == "rope":
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=seqlen > 1)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU, w2(silu(w1 x) * w3 x), at LLaMA's hidden size; or GPT-2's w2(gelu(w1 x)) at
    4d — the same matrix weights, 8d², up to SwiGLU's rounding to ``multiple_of`` (biases,
    when on, add 2h + d against 5d: 1.3 % more at d = 32, under 0.4 % from d = 48)."""

    def __init__(self, args: ModelArgs, arch: Architecture) -> None:
        super().__init__()
        self.swiglu = arch.mlp == "swiglu"
        hidden = args.ffn_hidden_dim if self.swiglu else gelu_hidden_dim(args)
        self.w1 = nn.Linear(args.dim, hidden, bias=arch.bias)
        self.w2 = nn.Linear(hidden, args.dim, bias=arch.bias)
        self.w3 = nn.Linear(args.dim, hidden, bias=arch.bias) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, arch: Architecture) -> None:
        super().__init__()
        self.post = arch.norm_position == "post"
        self.attention = Attention(args, arch)
        self.feed_forward = FeedForward(args, arch)
        self.attention_norm = make_norm(arch, args.dim, args.norm_eps)
        self.ffn_norm = make_norm(arch, args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.post:  # the original Transformer: normalise after each residual sum
            h = self.attention_norm(x + self.attention(x, cos, sin))
            return self.ffn_norm(h + self.feed_forward(h))
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class VariantTransformer(nn.Module):
    """A decoder of ``args``'s shape (dim, layers, heads, vocabulary, SwiGLU width) and
    ``arch``'s block; trained by the same ``Trainer`` as ``model.Transformer``
    (``Trainer(model_fn=...)``). Multi-head attention only (no grouped-query heads)."""

    def __init__(self, args: ModelArgs, arch: Architecture = LLAMA) -> None:
        super().__init__()
        if args.kv_heads != args.n_heads:
            raise ValueError(
                f"n_kv_heads={args.n_kv_heads}: the ablation blocks are multi-head "
                f"(n_kv_heads = n_heads = {args.n_heads})"
            )
        self.args, self.arch = args.validate(), arch
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = (
            nn.Embedding(args.max_seq_len, args.dim) if arch.positions == "learned" else None
        )
        self.layers = nn.ModuleList(Block(args, arch) for _ in range(args.n_layers))
        # post-norm blocks end normalised; pre-norm ones need a final norm
        pre = arch.norm_position == "pre"
        self.norm = make_norm(arch, args.dim, args.norm_eps) if pre else None
        # tied: the output multiplies by the embedding table itself (in forward, so no
        # shared Parameter for to_empty, FSDP or a checkpoint to untie)
        self.output = None if arch.tied else nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) of a causal forward over ``tokens`` from position 0."""
        seqlen = tokens.shape[1]
        if seqlen > self.args.max_seq_len:
            raise ValueError(f"{seqlen} positions exceed max_seq_len={self.args.max_seq_len}")
        positions = torch.arange(seqlen, device=tokens.device)
        cos, sin = rope_cos_sin(self.args.head_dim, self.args.rope_theta, positions)
        h = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(positions)
        for layer in self.layers:
            h = layer(h, cos, sin)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    @property
    def lookups(self) -> set[str]:
        """Parameters used only as lookup tables (no matmul, no FLOPs): the position table,
        and the token table unless the output layer multiplies by it."""
        names = {"pos_embeddings.weight"} if self.pos_embeddings is not None else set()
        return names if self.arch.tied else names | {"tok_embeddings.weight"}

    def init_std(self, name: str, std: float = 0.02) -> float | None:
        """As ``Transformer.init_std`` (GPT-2's scheme): norm gains ones (None), biases zero,
        the residual projections std/sqrt(2·n_layers), everything else std."""
        if "norm" in name and name.endswith(".weight"):
            return None
        if name.endswith(".bias"):
            return 0.0
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            return std / math.sqrt(2 * self.args.n_layers)
        return std

    init_weights = Transformer.init_weights  # per init_std, from the global RNG

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Every parameter; ``exclude_embedding``: the lookup tables
        left out, as ``Transformer.num_params`` leaves out its token table."""
        named = dict(self.named_parameters())
        skip = self.lookups if exclude_embedding else set()
        return sum(p.numel() for n, p in named.items() if n not in skip)


def build_variant(
    args: ModelArgs, arch: Architecture, device: str | torch.device = "cpu", init: bool = True
) -> VariantTransformer:
    """As ``model.build_model``: built on the meta device, materialised on ``device``."""
    with torch.device("meta"):
        model = VariantTransformer(args, arch)
    model = model.to_empty(device=device)
    if init:
        model.init_weights()
    return model
