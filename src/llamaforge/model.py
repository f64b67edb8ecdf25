"""The LLaMA transformer, as the paper and Meta's reference code define it.

Pre-norm RMSNorm, SwiGLU feed-forward (hidden 2/3·4d rounded up to ``multiple_of``),
rotary position embeddings on interleaved pairs, no biases, untied output layer, and
grouped-query attention so LLaMA-2-style checkpoints load. Parameter names are Meta's,
so a ``consolidated.00.pth`` state dict loads without renaming.

Everything about *how* the model runs — parallelism, torch.compile, activation
checkpointing, mixed precision — lives outside this file.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from llamaforge import config

# Keys of Meta's params.json that carry no architectural meaning for us.
_IGNORED_PARAMS = {"max_batch_size"}

# The range of each field a params.json (or a Hugging Face config) may declare: far above any
# released LLaMA (dim 16384, 126 layers, a 53k SwiGLU hidden size, a 256k vocabulary, a 1M
# context), low enough that a hostile file cannot make a server size a petabyte KV cache.
# The LLAMAFORGE_MAX_SEQ_LEN environment variable raises max_seq_len's bound.
INT_LIMITS = {
    "dim": 2**16,
    "n_layers": 2**10,
    "n_heads": 2**10,
    "vocab_size": 2**22,
    "multiple_of": 2**18,
    "max_seq_len": 2**20,
}
MAX_FFN_HIDDEN = 2**18
# the float fields: finite, > 0, and below the bound (or at most it: True)
FLOAT_LIMITS = {
    "norm_eps": (1.0, False),
    "rope_theta": (1e15, True),
    "ffn_dim_multiplier": (64.0, True),
}
MAX_SEQ_LEN_ENV = "LLAMAFORGE_MAX_SEQ_LEN"
_HINTS = {
    "max_seq_len": f" ({MAX_SEQ_LEN_ENV} raises the bound)",
    "vocab_size": " (-1 in a params.json: the tokenizer's size)",
}


def int_limits() -> dict[str, int]:
    """`INT_LIMITS`, with max_seq_len's from LLAMAFORGE_MAX_SEQ_LEN when it is set."""
    raw = os.environ.get(MAX_SEQ_LEN_ENV, "").strip()
    if not raw:
        return INT_LIMITS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_SEQ_LEN_ENV}={raw!r}: expected a positive integer")
    return {**INT_LIMITS, "max_seq_len": int(raw)}


def _in_range(value: Any, hi: float, inclusive: bool) -> bool:
    """Whether ``value`` is a finite number with 0 < value < hi (value <= hi: ``inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and (0 < value < hi or (inclusive and value == hi))


@dataclass
class ModelArgs:
    """Architecture hyper-parameters, with the field names of Meta's ``params.json``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many key/value heads as query heads (MHA)
    vocab_size: int = -1  # -1: take it from the tokenizer, as Meta's params.json does
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6  # LLaMA-1 checkpoints use 1e-6, LLaMA-2 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(
        self,
        source: str = "ModelArgs",
        *,
        vocab_from_tokenizer: bool = False,
        names: dict[str, str] | None = None,
    ) -> ModelArgs:
        """Raise ``ValueError`` naming ``source``, the field, its value and what is allowed
        for a field outside `INT_LIMITS` or `FLOAT_LIMITS` (a NaN or an Inf included) or for
        shapes that cannot work; ``vocab_from_tokenizer`` accepts vocab_size -1 (params.json's
        "the tokenizer's size"); ``names`` gives a field the name its file uses (an HF
        config's hidden_size for dim)."""
        label = {f: (names or {}).get(f, f) for f in self.__dataclass_fields__}
        for name, hi in int_limits().items():
            value = getattr(self, name)
            if name == "vocab_size" and value == -1 and vocab_from_tokenizer:
                continue
            if type(value) is not int or not 1 <= value <= hi:
                raise ValueError(
                    f"{source}: {label[name]}={value!r}: expected an integer "
                    f"1 <= {label[name]} <= {hi}" + _HINTS.get(name, "")
                )
        for name, (top, inclusive) in FLOAT_LIMITS.items():
            value = getattr(self, name)
            if value is None and name == "ffn_dim_multiplier" or _in_range(value, top, inclusive):
                continue
            raise ValueError(
                f"{source}: {label[name]}={value!r}: expected a finite number "
                f"0 < {label[name]} {'<=' if inclusive else '<'} {top:g}"
            )
        return self._check_shapes(source, label)

    def _check_shapes(self, source: str, label: dict[str, str]) -> ModelArgs:
        """The relations between fields: heads divide dim into even head sizes, key/value
        heads divide query heads, and the SwiGLU hidden size is in range."""
        dim, heads, kv = label["dim"], label["n_heads"], label["n_kv_heads"]
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(
                f"{source}: {dim}={self.dim} must split into {heads}={self.n_heads} heads of an "
                "even size (rotary embeddings rotate pairs)"
            )
        n_kv = self.n_kv_heads
        if n_kv is not None and (type(n_kv) is not int or n_kv < 1 or self.n_heads % n_kv):
            raise ValueError(
                f"{source}: {kv}={n_kv!r}: expected a divisor of {heads}={self.n_heads}"
            )
        hidden = self.ffn_hidden_dim
        if not 1 <= hidden <= MAX_FFN_HIDDEN:
            raise ValueError(
                f"{source}: the SwiGLU hidden size {hidden} (from dim, multiple_of and "
                f"ffn_dim_multiplier) must be 1 to {MAX_FFN_HIDDEN}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Meta's params.json fields; optional ones only when set."""
        d = asdict(self)
        if d["n_kv_heads"] is None:
            del d["n_kv_heads"]
        if d["ffn_dim_multiplier"] is None:
            del d["ffn_dim_multiplier"]
        return d

    @classmethod
    def from_dict(cls, params: dict[str, Any], source: str = "params") -> ModelArgs:
        """Build from a params.json-style dict (Meta's ``max_batch_size`` and our
        ``llamaforge`` block are ignored). Unknown keys and wrong types are a ``ConfigError``
        (a ``ValueError``) naming ``source`` and the key, values out of range (`validate`) a
        ``ValueError`` naming them; vocab_size -1 (the tokenizer's size) is accepted."""
        ignored = _IGNORED_PARAMS | {"llamaforge"}
        args = config.from_dict(cls, {k: v for k, v in params.items() if k not in ignored}, source)
        return args.validate(source, vocab_from_tokenizer=True)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the gain."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_cos_sin(
    head_dim: int, theta: float, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos·θ^(-2j/head_dim) for integer ``positions``, shape (..., head_dim/2).

    The fp32 angles of Meta's ``precompute_freqs_cis``, computed per call: a few
    kilobytes of work that no ``model.to(bfloat16)`` can degrade and no buffer has to carry.
    """
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (2j, 2j+1) of x (batch, seq, heads, head_dim) in fp32,
    by angles (seq, head_dim/2) shared by the batch or (batch, seq, head_dim/2) per row.

    The real-valued form of Meta's complex multiplication ``x * e^{iθ}``.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # the same angle for every head
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def document_mask(documents: torch.Tensor, flex: bool | None = None) -> torch.Tensor | BlockMask:
    """The attention mask of packed rows: position i attends to position j where j <= i and
    both lie in the same document. ``documents`` (batch, seq) holds an integer id per position
    (the packed loader's: each example, and the row's padding, a document of its own).

    ``flex=True``: a ``flex_attention`` ``BlockMask`` (causal AND same document), built once
    and shared by every layer — attention then computes only the blocks a document touches
    and serves grouped-query heads without copying keys and values. ``flex=False``: the dense
    boolean (batch, 1, seq, seq) mask, True = attend, for scaled_dot_product_attention.
    ``None`` chooses by device: the BlockMask on CUDA, the dense mask elsewhere — torch's CPU
    flex_attention has no backward, and without gradients (the 15M preset's packed forward,
    bench/packed_attention.py) it took about twice the time of SDPA with the dense mask eager
    and only matched it compiled.
    """
    if documents.dim() != 2 or documents.is_floating_point() or documents.is_complex():
        raise ValueError(
            f"documents: expected integer ids of shape (batch, seq), got {documents.dtype} "
            f"of shape {tuple(documents.shape)}"
        )
    bsz, seqlen = documents.shape
    if not (documents.is_cuda if flex is None else flex):
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=documents.device).tril()
        return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]

    def same_document_causal(
        b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor:
        return (k <= q) & (documents[b, q] == documents[b, k])

    return create_block_mask(
        same_document_causal, bsz, None, seqlen, seqlen, device=documents.device
    )


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention)


def attend_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask
) -> torch.Tensor:
    """softmax(q·kᵀ/√d, where ``block_mask`` allows)·v by ``flex_attention`` on q (batch,
    heads, seq, head_dim) and k, v with as many heads or a divisor of them (grouped-query:
    each key/value head serves its group of query heads, nothing copied).

    Compiled on CUDA — eager flex_attention materialises the scores instead of running the
    fused kernel — unless already inside a compiled region (a compiled block traces it)."""
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        fn = _compiled_flex_attention()
    if q.device.type == "cpu":  # Inductor's CPU template (torch 2.13) cannot lower the views
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])  # type: ignore[return-value]


class KVCache:
    """Keys and values of past positions for every layer, (n_layers, batch, kv_heads, max_len,
    head_dim) each: one object for the whole model, so no caller reaches into a layer."""

    def __init__(
        self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (args.n_layers, batch, args.kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's k, v at [start_pos, start_pos+seq) and return its keys and values
        up to there."""
        bsz, end = k.shape[0], start_pos + k.shape[2]
        self.k[layer, :bsz, :, start_pos:end] = k
        self.v[layer, :bsz, :, start_pos:end] = v
        return self.k[layer, :bsz, :, :end], self.v[layer, :bsz, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the batch rows ``rows``, in that order. A row may repeat (one prefix continued
        by several rows) or be left out (a finished sequence, a pruned beam)."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0) -> None:
        super().__init__()
        self.layer_id = layer_id  # its slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)
        if isinstance(mask, BlockMask):  # packed rows (document_mask): the blocks they touch
            out = attend_flex(q, k, v, mask)
            return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        if self.n_kv_heads != self.n_heads and mask is not None and x.is_cuda:
            # CUDA's kernels take a mask (memory-efficient) or enable_gqa (flash), not both;
            # SDPA would fall back to its slow math kernel, so copy the kv heads instead.
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # Causal within the chunk when there is no past; an explicit mask otherwise.
        is_causal = mask is None and seqlen > 1 and k.shape[2] == seqlen
        gqa = k.shape[1] != self.n_heads  # grouped-query: each kv head serves a group of q heads
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up and w2 the down projection."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args.validate()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.cache: KVCache | None = None  # the one setup_cache holds

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        *,
        mask: torch.Tensor | BlockMask | None = None,
        documents: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
        only: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) for ``tokens`` placed at positions ``start_pos…``.

        ``cache`` (default: the one ``setup_cache`` holds, if any) stores the chunk's keys and
        values at slots ``start_pos…``; the chunk attends to everything stored before it.
        ``mask``: boolean, True = attend, broadcastable to (batch, 1, seq, keys) where keys are
        ``start_pos + seq`` with a cache, else ``seq``; it replaces the causal mask (padding,
        a prefix shared by rows); a flex_attention ``BlockMask`` runs attention through
        ``flex_attention`` instead. ``documents``: (batch, seq) document ids of packed rows, in
        place of ``mask`` — each position attends to the earlier ones of its document, through
        ``document_mask``'s choice for the device (no cache, ``start_pos`` 0).
        ``positions``: (seq,) or (batch, seq) rotary positions instead of ``start_pos…``
        (packed examples restart at 0); the caller keeps them below ``max_seq_len``.
        ``return_hidden`` returns the final-norm hidden states (batch, seq, dim) instead of
        logits; ``last_only`` keeps the last position only (decoding); ``only``, a boolean
        (batch, seq) mask, keeps the positions it selects, flattened to (n, vocab) — the
        output layer then runs where a loss needs it (finetuning's answer tokens).
        """
        bsz, seqlen = tokens.shape
        cache = cache if cache is not None else self.cache
        slots = torch.arange(start_pos + seqlen, device=tokens.device)
        if positions is None:
            if start_pos + seqlen > self.args.max_seq_len:
                raise ValueError(
                    f"positions {start_pos}..{start_pos + seqlen - 1} exceed max_seq_len="
                    f"{self.args.max_seq_len}"
                )
            positions = slots[start_pos:]
        if documents is not None:
            if mask is not None or cache is not None or start_pos:
                raise ValueError(
                    "documents (packed rows) replaces mask and takes no cache or start_pos; got "
                    f"mask={'set' if mask is not None else None}, "
                    f"cache={'set' if cache is not None else None}, start_pos={start_pos}"
                )
            if documents.shape != tokens.shape:
                raise ValueError(
                    f"documents has shape {tuple(documents.shape)}, expected the tokens' "
                    f"{tuple(tokens.shape)}"
                )
            # one mask per call, shared by every layer
            mask = document_mask(documents)
        if mask is None and start_pos > 0 and seqlen > 1 and cache is not None:
            # query i (slot start_pos+i) sees keys 0..start_pos+i: right for any chunk.
            mask = slots[None, :] <= slots[start_pos:, None]
        cos, sin = rope_cos_sin(self.args.head_dim, self.args.rope_theta, positions)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, start_pos)
        h = self.norm(h)
        if last_only:
            h = h[:, -1:, :]
        if only is not None:
            h = h[only]
        return h if return_hidden else self.output(h)

    # -- set-up helpers, outside the forward path ---------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None) -> KVCache:
        """Hold (and return) a KV cache for incremental decoding, used by every forward call
        until ``clear_cache``."""
        weight = self.output.weight
        self.cache = KVCache(
            self.args,
            batch_size,
            max_seq_len or self.args.max_seq_len,
            dtype or weight.dtype,
            weight.device,
        )
        return self.cache

    def clear_cache(self) -> None:
        self.cache = None

    def init_std(self, name: str, std: float = 0.02) -> float | None:
        """How parameter ``name`` starts (GPT-2 style): None for the norm gains (ones), else
        the std of a zero-mean normal — ``std``, scaled by 1/sqrt(2·n_layers) for the
        residual projections (wo, w2)."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            return std / math.sqrt(2 * self.args.n_layers)
        return std

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Initialise every parameter per ``init_std`` from the global RNG. Works after
        ``to_empty`` from the meta device."""
        for name, p in self.named_parameters():
            p_std = self.init_std(name, std)
            if p_std is None:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=p_std)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embedding else n


def build_model(args: ModelArgs, device: str | torch.device = "cpu", dtype=None, init=True):
    """Construct on the meta device (no memory), then materialise on ``device``."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device)
    if dtype is not None:
        model = model.to(dtype)
    if init:
        model.init_weights()
    return model
