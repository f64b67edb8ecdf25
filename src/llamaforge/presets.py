"""Named model sizes: the paper's Table 2, a 1B for GPU benchmarks, and small CPU sizes."""

from __future__ import annotations

from dataclasses import replace

from llamaforge.model import ModelArgs

# Table 2 of the paper (head_dim 128, vocabulary 32000, SwiGLU hidden rounded to 256).
# Small sizes use a smaller vocabulary and multiple_of so that they stay near their names.
PRESETS: dict[str, ModelArgs] = {
    "1M": ModelArgs(
        dim=64, n_layers=8, n_heads=4, vocab_size=4096, multiple_of=32, max_seq_len=256
    ),
    "15M": ModelArgs(
        dim=320, n_layers=8, n_heads=8, vocab_size=8192, multiple_of=32, max_seq_len=512
    ),
    "110M": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=16384, max_seq_len=1024),
    "1B": ModelArgs(dim=2048, n_layers=16, n_heads=16, vocab_size=32000),
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "33B": ModelArgs(dim=6656, n_layers=60, n_heads=52, vocab_size=32000),
    "65B": ModelArgs(dim=8192, n_layers=80, n_heads=64, vocab_size=32000),
}


def get_preset(name: str, **overrides) -> ModelArgs:
    """A copy of preset ``name`` with ``overrides`` applied (e.g. ``vocab_size=…``)."""
    key = name.upper() if name.upper() in PRESETS else name
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[key], **overrides)
