"""Parameter, FLOP and memory arithmetic for a ModelArgs (no model needs to exist), and the
paper's carbon estimate. The hardware facts (accelerator table, ``resolve_device``) live in
``llamaforge.device``."""

from __future__ import annotations

from dataclasses import dataclass

from llamaforge.model import ModelArgs


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


def flops_per_token(
    args: ModelArgs,
    seq_len: int | None = None,
    *,
    trained: int | None = None,
    adapters: int = 0,
    weights: int | None = None,
) -> int:
    """Training FLOPs per token, 6N + 12·L·d·T (PaLM appendix B) when every weight trains.

    N counts every weight that takes part in a matmul: everything but the input
    embedding table, which is a lookup, plus ``adapters`` (e.g. LoRA's A and B). Each
    weight costs 2 FLOPs a token forward, 2 backward to its input and 2 more for its own
    gradient, which only the ``trained`` ones (default: all N) compute: 4N + 2·trained,
    so a frozen base (LoRA) is not counted as work it skips. The last term is attention's
    QKᵀ and AV over a context of T tokens (no causal discount, as PaLM and torchtitan
    count it). ``weights``: N when the model is not ``model.py``'s (an ablation block, its
    biases and tied output counted by ``Trainer``'s ``trained_params``); default LLaMA's.
    """
    t = seq_len or args.max_seq_len
    n = (count_params(args)["non_embedding"] if weights is None else weights) + adapters
    return 4 * n + 2 * (n if trained is None else trained) + 12 * args.n_layers * args.dim * t


def quantized_weight_bytes(numel: int, rows: int, mode: str) -> int:
    """Bytes of a frozen weight of ``numel`` values in ``rows`` output rows stored as
    ``int8`` (a byte a value and an fp32 scale a row) or ``nf4`` (torchao's NF4Tensor, as
    QLoRA: half a byte a value, an int8 scale per block of 64 values, and an fp32 factor
    per group of 256 blocks), as LoRA's quantised base keeps it."""
    if mode == "int8":
        return numel + 4 * rows
    if mode == "nf4":
        return -(-numel // 2) + -(-numel // 64) + 4 * -(-numel // (64 * 256))
    raise ValueError(f"quantize={mode!r}: expected int8 or nf4")


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


def activation_memory(
    args: ModelArgs, tokens: int, mode: str = "selective", act_bytes: int = 2
) -> int:
    """Estimated bytes of activations a training step keeps for its backward pass over
    ``tokens`` tokens (micro-batch × sequence), with the residual stream in fp32 and the
    matmul outputs in ``act_bytes`` (2 for bf16 compute, 4 for fp32).

    Per token and layer: ``selective`` keeps the block input and the residual after
    attention (8·d) and the outputs of the seven linear layers and of attention
    (act_bytes · (4·d + 2·kv_dim + 2·ffn)); ``none`` also keeps the RMSNorm intermediates
    and SwiGLU's two products (roughly 8·d + 2·act_bytes·ffn more); ``full`` keeps the
    block input (4·d) and recomputes one block at a time (its ``none`` set, plus the
    residual gradients in flight); ``manual`` (the hand-written block backward,
    ``manual_backward.py``) keeps the block input (4·d), the outputs of wq, wk, wv, wo, w1,
    w3 and of attention (act_bytes · (3·d + 2·kv_dim + 2·ffn)) and attention's fp32
    log-sum-exp per head (4·n_heads), plus one block's backward working set at a time (the
    recomputed SwiGLU terms and their gradients, about 6·act_bytes·ffn, and the recomputed
    norm and residual-gradient rows, 16·d). Output layer and loss: logits,
    their fp32 copy and log-softmax (act_bytes + 8 bytes per logit). An estimate: on the
    CPU in fp32 it is within 25 % of what a step keeps (tests/test_parallelize.py).
    """
    d, h, kvd, n = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim, args.n_layers
    selective = 8 * d + act_bytes * (4 * d + 2 * kvd + 2 * h)
    everything = selective + 8 * d + 2 * act_bytes * h
    manual = 4 * d + act_bytes * (3 * d + 2 * kvd + 2 * h) + 4 * args.n_heads
    per_layer = {
        "selective": selective * n,
        "manual": manual * n + 6 * act_bytes * h + 16 * d,
        "none": everything * n,
        # block inputs, one block recomputed in full, the residual gradients in flight
        "full": 4 * d * n + everything + 16 * d,
    }
    if mode not in per_layer:
        raise ValueError(f"mode={mode!r}: expected one of {sorted(per_layer)}")
    logits = (act_bytes + 8) * args.vocab_size
    return tokens * (per_layer[mode] + logits)


def inference_memory(args: ModelArgs, *, dtype_bytes: float, batch: int, length: int) -> int:
    """Bytes one device needs to generate with the whole model: its weights and the key /
    value cache of ``batch`` rows of ``length`` positions, both ``dtype_bytes`` a value,
    and the last position's fp32 logits."""
    weights = count_params(args)["total"] * dtype_bytes
    cache = 2 * args.n_layers * args.kv_heads * args.head_dim * batch * length * dtype_bytes
    return int(weights + cache + 4 * batch * args.vocab_size)


# -- the paper's carbon estimate (SPEC §1.10) ----------------------------------------------

PUE = 1.1  # the paper's datacenter power usage effectiveness (SPEC §1.10)
KG_CO2_PER_KWH = 0.385  # US national average used by the paper


def carbon(gpu_hours: float, watts: float, pue: float = PUE) -> dict[str, float]:
    """The paper's estimate: Wh = GPU-h × power × PUE; tCO2eq = MWh × 0.385."""
    mwh = gpu_hours * watts * pue / 1e6
    return {
        "gpu_hours": gpu_hours,
        "watts": watts,
        "pue": pue,
        "mwh": mwh,
        "tco2eq": mwh * KG_CO2_PER_KWH,
    }


# -- memory per GPU for a parallel layout ---------------------------------------------------

AC_FOR_LAYOUT = ("none", "selective", "manual", "full")


def layout_memory(
    args: ModelArgs,
    *,
    tp: int = 1,
    dp_shard: int = 1,
    seq_len: int = 2048,
    micro_batch: int = 1,
    mode: str = "selective",
    sequence_parallel: bool = True,
) -> dict[str, int]:
    """Bytes per GPU of a bf16 mixed-precision run laid out as ``dp_shard`` FSDP2 ranks ×
    ``tp`` tensor-parallel ranks (dp_replicate copies change nothing per GPU).

    Parameters, gradients and AdamW states: fp32 master weights (4 bytes a parameter),
    fp32 gradients (4) and two fp32 moments (8), split tp ways by tensor parallelism and
    dp_shard ways by FSDP2 (the RMSNorm gains, replicated over tp, are counted as split:
    d per layer, negligible). ``gathered``: FSDP2's working set of bf16 parameters, the
    block computing and the one prefetched (2 × 2 bytes × a block's parameters / tp).

    Activations per micro-batch of s = seq_len tokens, b = micro_batch, h = dim, a = heads,
    L = layers, from Korthikanti et al. 2022 (§4, bf16, per layer):
    ``none`` sbh(34 + 5as/h) / t with sequence parallelism (sbh(10 + 24/t + 5as/(ht))
    without); ``selective`` 34·sbh / t (attention's a·s² scores are recomputed — which a
    fused attention kernel does anyway); ``full`` 2sbh / t per layer (the block inputs)
    plus one block's ``none`` set being recomputed; ``manual`` (the hand-written block
    backward) LLaMA's own count instead of theirs, in bf16: the block input and wo's output
    (2 · 2sbh, split over the sequence with sequence parallelism), the outputs of wq, wk,
    wv, w1, w3 and of attention (2sb · (2h + 2·kv_dim + 2·ffn) / t, split by heads and
    hidden units) and the fp32 log-sum-exp (4·sba / t), plus one block's backward working
    set, sb · (12·ffn + 16·h) / t. Assumptions: their block (a 4h MLP and
    dropout masks; LLaMA's SwiGLU of 3 × 8h/3 matrices keeps about as much and it has no
    dropout, so this is slightly pessimistic); plus the vocabulary-parallel output layer's
    logits (bf16, fp32 copy and log-softmax: 10·sbV / t bytes). Temporary buffers,
    the CUDA context and fragmentation (typically several GB) are not counted."""
    if mode not in AC_FOR_LAYOUT:
        raise ValueError(f"mode={mode!r}: expected one of {AC_FOR_LAYOUT}")
    if tp < 1 or dp_shard < 1:
        raise ValueError(f"tp={tp} and dp_shard={dp_shard} must be >= 1")
    n = count_params(args)
    shards = tp * dp_shard
    s, b, h, a, L = seq_len, micro_batch, args.dim, args.n_heads, args.n_layers
    sbh = s * b * h
    scores = 5 * a * s / h
    if sequence_parallel or tp == 1:
        no_recompute = sbh * (34 + scores) / tp
    else:
        no_recompute = sbh * (10 + 24 / tp + scores / tp)
    kvd, ffn = args.kv_heads * args.head_dim, args.ffn_hidden_dim
    residual = 4 * s * b * h / (tp if sequence_parallel else 1)
    per_layer = {
        "manual": residual + s * b * (2 * (2 * h + 2 * kvd + 2 * ffn) + 4 * a) / tp,
        "none": no_recompute,
        "selective": sbh * (34 if sequence_parallel or tp == 1 else 10 + 24 / tp) / tp,
        "full": 2 * sbh / (tp if sequence_parallel else 1),
    }[mode]
    activations = L * per_layer + (no_recompute if mode == "full" else 0)
    if mode == "manual":  # one block's backward working set at a time (as activation_memory)
        activations += s * b * (12 * ffn + 16 * h) / tp
    activations += 10 * s * b * args.vocab_size / tp
    block = n["layers"] // L
    return {
        "weights": 4 * n["total"] // shards,
        "gradients": 4 * n["total"] // shards,
        "optimizer": 8 * n["total"] // shards,
        "gathered": 2 * 2 * block // tp,
        "activations": int(activations),
    }


def layout_total(mem: dict[str, int]) -> int:
    return sum(mem.values())


def layout_table(gpu_gib: float = 80.0, seq_len: int = 2048, micro_batch: int = 1) -> str:
    """A markdown table of ``layout_memory`` for the paper's Table 2 sizes on GPUs of
    ``gpu_gib`` GiB: per layout, the sharded states and the activations by checkpointing
    mode, and whether the total fits (✓) with a 10 % margin for what is not counted."""
    from llamaforge.presets import get_preset

    gib = 1024**3
    rows = [
        f"Per-GPU memory (GiB) of bf16 mixed-precision training, seq {seq_len}, micro-batch "
        f"{micro_batch}, vocab 32000, on {gpu_gib:g} GiB GPUs (`llamaforge info --layouts`; "
        "arithmetic, Korthikanti et al. 2022 for the activations; fits: total ≤ 90 % of the "
        "GPU).",
        "",
        "| model | tp × dp_shard | weights+grads+AdamW | gathered bf16 | act. none | "
        "act. selective | act. manual | act. full | fits: none / selective / manual / full |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, gpus in (("7B", (8, 64)), ("13B", (8, 64)), ("33B", (64, 512)), ("65B", (64, 2048))):
        args = get_preset(name, vocab_size=32000)
        for world in gpus:
            for tp in (1, 2, 4, 8):
                mem = {
                    m: layout_memory(
                        args,
                        tp=tp,
                        dp_shard=world // tp,
                        seq_len=seq_len,
                        micro_batch=micro_batch,
                        mode=m,
                    )  # fmt: skip
                    for m in AC_FOR_LAYOUT
                }
                m0 = mem["none"]
                states = m0["weights"] + m0["gradients"] + m0["optimizer"]
                fits = " / ".join(
                    "✓" if layout_total(mem[m]) <= 0.9 * gpu_gib * gib else "✗"
                    for m in AC_FOR_LAYOUT
                )
                acts = " | ".join(f"{mem[m]['activations'] / gib:.1f}" for m in AC_FOR_LAYOUT)
                rows.append(
                    f"| {name} | {tp} × {world // tp} | {states / gib:.1f} | "
                    f"{m0['gathered'] / gib:.2f} | {acts} | {fits} |"
                )
    return "\n".join(rows) + "\n"
