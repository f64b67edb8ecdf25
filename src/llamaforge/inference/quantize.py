"""Int8 weight-only quantisation for decoding: each linear layer's weight is stored as int8
with one scale per output channel, and activations stay in the model's dtype.

A row ``w`` of a weight becomes ``q = round(w / s)`` with ``s = max|w| / 127``, so the
largest entry of every row is exact and the others are off by at most ``s / 2``. Decoding
one token reads every weight once, so storing a quarter of fp32's bytes (half of bf16's)
is what makes it faster; the matrix product itself is unchanged.

The product runs through ``torch.ops.aten._weight_int8pack_mm`` on the CPU (torch's kernel
for exactly this layout; it never materialises the dequantised matrix; fp32 activations
enter it as bf16, see ``Int8Linear.cpu_bf16_compute``), and as
``linear(x, q.to(x.dtype)) * s`` elsewhere, which ``torch.compile`` fuses into one kernel on
a GPU. ``model.py`` is untouched: the attention, feed-forward and output layers are swapped
in place, and the embedding and norms stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.model import Transformer

__all__ = ["QUANTIZE_KINDS", "Int8Linear", "int8_converter", "is_quantized", "quantize_int8"]

#: ``--quantize``'s kinds: int8 weights; "int8-bf16" also runs fp32 activations through the
#: CPU kernel in bf16 (`Int8Linear.cpu_bf16_compute`).
QUANTIZE_KINDS = ("int8", "int8-bf16")


def _cpu_kernel_available() -> bool:
    try:
        x = torch.ones(1, 32)
        w = torch.ones(8, 32, dtype=torch.int8)
        out = torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(8))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(out, torch.full((1, 8), 32.0)))


_CPU_KERNEL: bool | None = None  # probed on first use
_BLOCK_BYTES = 4 << 20  # fp32 bytes of the rows `Int8Linear.from_linear` converts at a time


class Int8Linear(nn.Module):
    """``y = x @ (q * s[:, None]).T`` for an int8 ``q`` (out, in) and scales ``s`` (out,),
    ``s`` in the activations' dtype. No bias (LLaMA has none)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        # The scales for bf16 compute from fp32 activations, ready-made: inductor's lowering
        # of the CPU kernel fails on scales cast inside a compiled graph (torch 2.13).
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; LLaMA's linear layers have none")
        w = linear.weight.detach()
        # max|w| of each row, exact in w's dtype, without a |w| temporary
        peak = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg()).float()
        scales = (peak / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        # in blocks of rows: the fp32 temporaries stay small and of one size, so a loader
        # converting layer by layer holds the int8 weights and little else (one whole-matrix
        # temporary per layer fragments the CPU allocator's heap: hundreds of MB at 110M)
        rows = max(1, _BLOCK_BYTES // (4 * w.shape[1]))
        for i in range(0, w.shape[0], rows):
            block = w[i : i + rows].float() / scales[i : i + rows, None]
            q[i : i + rows] = block.round_().clamp_(-127, 127)
        return cls(q, scales.to(w.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight in the activations' dtype (materialised on each access:
        for code that reads ``layer.weight``'s dtype, device or values, not for the
        forward pass)."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    # torch's CPU kernel is vectorised for bf16 activations but not for fp32 (measured on
    # a Xeon, 110M shapes, bs 1: fp32 in, 3-4x slower than fp32 nn.Linear; bf16 in, 2-2.7x
    # faster). True: fp32 activations enter it as bf16 (the output is rounded to bf16 once
    # per layer) and come back as fp32: fast, but greedy text drifts from fp32's sooner.
    cpu_bf16_compute = False

    def _cpu_compute_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype in which torch's CPU kernel runs for ``dtype`` activations, or None to
        dequantise. Its vectorised (half-precision) path is only right when in_features is
        a multiple of 16 (torch 2.13 crashes or returns garbage otherwise); the fp32 one
        takes any shape."""
        if not _use_cpu_kernel():
            return None
        aligned = self.in_features % 16 == 0
        if dtype == torch.float32:
            return torch.bfloat16 if aligned and self.cpu_bf16_compute else torch.float32
        return dtype if aligned and dtype in (torch.bfloat16, torch.float16) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self._cpu_compute_dtype(x.dtype) if x.device.type == "cpu" else None
        if compute is not None:
            out = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, self.in_features).to(compute),
                self.weight_int8,
                self.scales_bf16 if compute == torch.bfloat16 else self.scales.to(compute),
            )
            return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _use_cpu_kernel() -> bool:
    global _CPU_KERNEL
    if _CPU_KERNEL is None:
        _CPU_KERNEL = _cpu_kernel_available()
    return _CPU_KERNEL


def int8_converter(kind: str) -> Callable[[nn.Linear], Int8Linear]:
    """The conversion of one ``nn.Linear`` to ``Int8Linear`` that ``--quantize kind`` asks
    for (``kind`` in `QUANTIZE_KINDS`; anything else is a ValueError naming it): what
    `quantize_int8` applies to a whole model and a loader to each layer as it is read."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"quantize={kind!r}: expected one of {', '.join(QUANTIZE_KINDS)}")
    cpu_bf16_compute = kind == "int8-bf16"

    def convert(linear: nn.Linear) -> Int8Linear:
        layer = Int8Linear.from_linear(linear)
        layer.cpu_bf16_compute = cpu_bf16_compute
        return layer

    return convert


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds int8 layers and no ``nn.Linear`` left to convert."""
    kinds = {type(m) for m in model.modules()}
    return Int8Linear in kinds and nn.Linear not in kinds


def quantize_int8(model: Transformer, *, cpu_bf16_compute: bool = False) -> Transformer:
    """Replace every ``nn.Linear`` of ``model`` (attention, feed-forward and output layer)
    by an ``Int8Linear`` with per-output-channel scales, in place, and return ``model``.

    The scales keep the layer's dtype (fp32 or bf16), so the activations do too. Memory:
    each weight drops from 4 (fp32) or 2 (bf16) bytes to 1, plus one scale per row. The
    quantised model is for inference; it has no trainable linear weights.
    ``cpu_bf16_compute``: on the CPU, run fp32 activations through the int8 kernel in bf16
    (2-3x faster matrix products there; fp32's exact path is slower than fp32 weights).
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"quantize_int8 expects a llamaforge Transformer, got {type(model)}")
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    if not targets:
        raise ValueError("quantize_int8: the model has no nn.Linear layers (already quantised?)")
    convert = int8_converter("int8-bf16" if cpu_bf16_compute else "int8")
    for parent, name in targets:  # each full-precision layer is dropped once converted
        setattr(parent, name, convert(getattr(parent, name)))
    return model
