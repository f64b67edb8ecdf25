"""Parameter, FLOP and memory arithmetic for a ModelArgs (no model needs to exist)."""

from __future__ import annotations

from dataclasses import dataclass

from .model import ModelArgs


def count_params(args: ModelArgs) -> dict[str, int]:
    """Parameter counts by part, from the shapes alone."""
    d, hd = args.dim, args.head_dim
    attn = d * args.n_heads * hd * 2 + d * args.kv_heads * hd * 2  # wq, wo + wk, wv
    ffn = 3 * d * args.ffn_hidden_dim
    per_layer = attn + ffn + 2 * d
    embedding = args.vocab_size * d
    output = args.vocab_size * d
    total = embedding + args.n_layers * per_layer + d + output
    return {
        "embedding": embedding,
        "layers": args.n_layers * per_layer,
        "output": output,
        "norm": d,
        "total": total,
        "non_embedding": total - embedding,
    }


def flops_per_token(args: ModelArgs, seq_len: int | None = None) -> int:
    """Training FLOPs per token, 6N + 12·L·d·T (PaLM appendix B).

    N counts every weight that takes part in a matmul: everything but the input
    embedding table, which is a lookup. The second term is attention's QKᵀ and AV over a
    context of T tokens (no causal discount, as PaLM and torchtitan count it).
    """
    t = seq_len or args.max_seq_len
    n = count_params(args)["non_embedding"]
    return 6 * n + 12 * args.n_layers * args.dim * t


@dataclass
class TrainingMemory:
    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def training_memory(args: ModelArgs) -> TrainingMemory:
    """Bytes for fp32 master weights, fp32 gradients and AdamW's two fp32 moments
    (what mixed-precision training keeps; activations come on top)."""
    n = count_params(args)["total"]
    return TrainingMemory(weights=4 * n, gradients=4 * n, optimizer=8 * n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
