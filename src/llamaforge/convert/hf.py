"""Meta ↔ Hugging Face transformers tensor names, the q/k permute, and the config.

HF's Llama applies RoPE to the two halves of each head (``rotate_half``), Meta's to
interleaved pairs. ``permute_to_hf`` reorders the rows of wq/wk within each head from
``[x0, x1, x2, x3, …]`` to ``[x0, x2, …, x1, x3, …]`` so both give identical attention
(SPEC §3.1); ``permute_from_hf`` is its inverse. No other tensor is permuted.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..model import ModelArgs

_GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(w.shape)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(w.shape)


def meta_to_hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(f"no Hugging Face name for tensor {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta-named tensors → HF ``LlamaForCausalLM`` tensors (q/k permuted)."""
    out = {}
    for name, t in state.items():
        if name.endswith("attention.wq.weight"):
            t = permute_to_hf(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_to_hf(t, args.kv_heads)
        out[meta_to_hf_name(name)] = t
    return out


def hf_config(args: ModelArgs, bos_id: int = 1, eos_id: int = 2) -> dict[str, Any]:
    """A ``config.json`` for transformers' ``LlamaConfig`` with the same architecture."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
