"""LoRA (Hu et al. 2021) adapters for the LLaMA model, in PEFT's on-disk format.

``apply_lora`` swaps each targeted ``nn.Linear`` for a :class:`LoraLinear`, a subclass that
keeps the base ``weight`` under its own name (``layers.0.attention.wq.weight`` still loads
from a native checkpoint) and adds ``lora_A`` (rank × in) and ``lora_B`` (out × rank)::

    y = W x + scaling · B A dropout(x),     scaling = alpha / rank

A starts like PEFT's (kaiming-uniform, a=√5, i.e. U(±1/√in)), B at zero, so the adapted
model starts equal to the base. Every base parameter is frozen: only adapters train.

On disk an adapter is PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` for the
Hugging Face Llama layout (what ``peft.PeftModel.from_pretrained`` loads onto the
``convert --target hf`` export of the base), plus ``llamaforge_adapter.json`` with the base's
identity (files' weights_sha256, architecture). That block lives in its own file because peft
0.21 loads an ``adapter_config.json`` with unknown keys only after a warning telling the user
to upgrade peft. HF's q/k rows are per-head half-split where Meta's are interleaved:
P(W + BA) = PW + (PB)A, so ``lora_B`` of wq/wk is permuted (``permute_to_hf`` with n_heads /
n_kv_heads) and ``lora_A`` is unchanged.

Quantised base (QLoRA, Dettmers et al. 2023): ``quantize="nf4"`` stores the frozen base
weight of every adapted layer (``quantize_scope="all"``: every linear layer of the blocks) as
torchao's ``NF4Tensor`` (4-bit NormalFloat, blocks of 64, double-quantised scales; about
0.53 bytes a weight) and ``"int8"`` as int8 with per-output-channel fp32 scales (absmax /
127). Both are frozen parameters, not buffers (DDP does not broadcast them every forward
pass; FSDP2 shards them), dequantised per call in the forward pass and again in the backward
pass by an autograd function that saves only the quantised weight (torchao's
``linear_nf4``; ``_Int8BaseLinear``); the adapters stay in the compute dtype. Under FSDP2 the
base loads with ``load_base_state_dict`` (each full tensor quantised whole, then sharded),
which the finetuning trainer uses. Tested on the CPU, one process, DDP and FSDP2 over two
gloo processes (tests/test_qlora.py); not run on a GPU here.

Training (the trainer's order; tested with FSDP2 on two processes in tests/test_lora.py)::

    model = build_model(args, device="meta", init=False)
    apply_lora(model, cfg)                      # before checkpointing / compile / FSDP2
    model = parallelize(model, ...)             # FSDP2: frozen and trainable params mix
    model = model.to_empty(device=...)
    init_params(model, seed)                    # optional: overwritten below
    load_base_state_dict(model, base_state)     # the base (set_model_state_dict, quantised
                                                # layers loaded whole); missing: the adapters
    init_lora_(model, seed)                     # A kaiming-uniform, B = 0, shard-independent
    optimizer = build_optimizer(model, ...)     # takes requires_grad params: the adapters

Then ``save_adapter`` (every rank: it gathers DTensors); ``llamaforge.finetune.merge`` folds
a saved adapter into its base's files, shard by shard (``lora merge``, ``lora.merge``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.config import setting
from llamaforge.files import atomic_dir, read_json_object
from llamaforge.model import ModelArgs
from llamaforge.parallel import unwrapped_name
from llamaforge.parallel.apply import is_quantised, shard_of

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
BLOCK_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
ALL_TARGETS = (*BLOCK_TARGETS, "output")
QUANTIZE_MODES = ("none", "int8", "nf4")
QUANTIZE_SCOPES = ("adapted", "all")
# QLoRA's NF4 (Dettmers et al. 2023): one absmax per 64 weights, the absmaxes quantised again
# to int8 in groups of 256 ("double quantisation")
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
# ... dequantised to bf16, QLoRA's compute dtype, whatever the model's: bf16 moves the 16
# NF4 levels and the scales by at most 2⁻⁹ of their value, nothing next to NF4's own error
# (9 % RMS on Gaussian weights), and it halves the dequantised weight's transient bytes
NF4_DTYPE = torch.bfloat16

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
LLAMAFORGE_FILE = "llamaforge_adapter.json"
# 2: base_sha256 is the base checkpoint's weights_sha256 (its files); 1 recorded the hash of
# its fp32 tensor values (``tensors_sha256``), still checked for adapters written then
FORMAT_VERSION = 2

# Meta short name -> HF module path inside a decoder layer (PEFT target name = last part)
_HF_MODULE = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w1": "mlp.gate_proj",
    "w2": "mlp.down_proj",
    "w3": "mlp.up_proj",
}
_META_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention"}
_META_PARENT.update({"w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"})
HF_TARGET = {k: v.split(".")[1] for k, v in _HF_MODULE.items()} | {"output": "lm_head"}
_FROM_HF_TARGET = {v: k for k, v in HF_TARGET.items()}
_PEFT_PREFIX = "base_model.model."
_PEFT_LAYER_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
    r"(?:\.[^.]+)?\.weight$"
)
_PEFT_HEAD_RE = re.compile(r"^base_model\.model\.lm_head\.lora_([AB])(?:\.[^.]+)?\.weight$")
_META_LORA_RE = re.compile(
    r"^(?:layers\.(\d+)\.(?:attention|feed_forward)\.)?(\w+)\.lora_([AB])\.weight$"
)
# Wrappers that insert a level into parameter names without changing the model.


class LoraError(ValueError):
    """A LoRA configuration, model or adapter directory that cannot be used; names the value."""


@dataclass
class LoraConfig:
    """Low-rank adapters on the frozen base (finetuning's ``lora`` table)."""

    enabled: bool = setting(False, "finetune adapters on the frozen base instead of all weights")
    rank: int = setting(8, "r: the rank of the update B·A (positive)")
    alpha: float = setting(16.0, "lora_alpha: the update is scaled by alpha / rank")
    dropout: float = setting(
        0.05,
        "dropout on the adapter's input (x → A), in [0, 1); 0.05 as in the QLoRA and "
        "Alpaca-LoRA recipes for 7B–13B models (PEFT's own default is 0)",
    )
    targets: list[str] | str = setting(
        doc="layers to adapt: any of wq wk wv wo w1 w2 w3 output; 'all' (or ['all']) is "
        "every linear layer of the blocks (wq wk wv wo w1 w2 w3), add 'output' for the "
        "output layer",
        factory=lambda: list(ATTENTION_TARGETS),
    )
    rslora: bool = setting(False, "scale by alpha / sqrt(rank) (rsLoRA, PEFT's use_rslora)")
    quantize: str = setting(
        "none",
        "storage of the frozen base weights: none, int8 (per-output-channel scales) or nf4 "
        "(QLoRA's 4-bit NormalFloat, torchao: pip install 'llamaforge[qlora]')",
    )
    quantize_scope: str = setting(
        "adapted",
        "which base weights 'quantize' applies to: adapted layers, or all (every "
        "linear layer of the blocks)",
    )
    merge: bool = setting(
        False, "after training, fold the adapters into the base and export a plain checkpoint"
    )

    def validate(self) -> LoraConfig:
        """Raise ``LoraError`` naming the field and value if the settings cannot work."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"lora.rank={self.rank!r}: must be a positive integer")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LoraError(f"lora.alpha={self.alpha!r}: must be positive")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout={self.dropout!r}: must be in [0, 1)")
        if self.quantize not in QUANTIZE_MODES:
            raise LoraError(f"lora.quantize={self.quantize!r}: expected one of {QUANTIZE_MODES}")
        if self.quantize_scope not in QUANTIZE_SCOPES:
            raise LoraError(
                f"lora.quantize_scope={self.quantize_scope!r}: expected one of {QUANTIZE_SCOPES}"
            )
        self.target_names()
        return self

    def target_names(self) -> tuple[str, ...]:
        """The targets as Meta's short names, in model order (``'all'`` expanded)."""
        items = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if not items:
            raise LoraError("lora.targets=[]: name at least one layer (or 'all')")
        names: set[str] = set()
        for t in items:
            if t == "all":
                names.update(BLOCK_TARGETS)
            elif t in ALL_TARGETS:
                names.add(t)
            else:
                raise LoraError(
                    f"lora.targets: {t!r} matches no layer; expected 'all' or some of "
                    f"{list(ALL_TARGETS)}"
                )
        return tuple(t for t in ALL_TARGETS if t in names)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# -- modules ------------------------------------------------------------------------------


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and fp32 per-row scales with ``q * scale ≈ w`` (symmetric, absmax / 127)."""
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


class _Int8BaseLinear(torch.autograd.Function):
    """``x Wᵀ`` for the frozen ``W = q · scale[:, None]``: dequantised for the product in the
    forward pass and again in the backward pass, so only ``q`` and the scales are saved, never
    the dequantised matrix (the base is frozen: no weight gradient is computed)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, _dequantize_int8(q, scale, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        q, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ _dequantize_int8(q, scale, grad.dtype), None, None


def _torchao_nf4() -> Any:
    """torchao's NF4 module (``NF4Tensor``, ``to_nf4``, ``linear_nf4``), or a LoraError that
    says what to install. It is found through the class, which ``torchao.quantization``
    exports: the module's own path has moved between releases."""
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:
        raise LoraError(
            "lora.quantize='nf4' needs torchao >= 0.18 (pip install 'llamaforge[qlora]'); "
            "quantize='int8' needs nothing more"
        ) from None
    return sys.modules[NF4Tensor.__module__]


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight may be stored quantised (``quantize``).

    ``"none"``: the ordinary ``weight`` parameter, frozen. ``"int8"``: ``weight`` is an int8
    parameter (same name, so state dicts keep Meta's names) plus ``weight_scale`` (fp32, one
    per output channel). ``"nf4"``: ``weight`` is a torchao ``NF4Tensor`` parameter
    (QLoRA's 4-bit NormalFloat: one absmax per 64 weights, those double-quantised in groups
    of 256, dequantised to bf16; ``in × out`` must be a multiple of 64 · 256). Quantised
    weights are parameters with ``requires_grad=False``, not buffers: DDP does not
    broadcast them before every forward pass, FSDP2 shards them. The forward pass
    dequantises per call and the backward pass again (torchao's ``linear_nf4``,
    ``_Int8BaseLinear``): no dequantised weight is kept for the backward pass. A
    floating-point ``weight`` given to ``load_state_dict`` is quantised on the way in;
    under FSDP2 load with ``load_base_state_dict``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quantize: str = "none",
        weight: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device="meta", dtype=dtype)
        if quantize not in QUANTIZE_MODES:
            raise LoraError(f"quantize={quantize!r}: expected one of {QUANTIZE_MODES}")
        self.quantize = quantize
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.base_loaded = weight is not None
        shape = (out_features, in_features)
        if quantize == "nf4":
            nf4 = _torchao_nf4()
            if (in_features * out_features) % (NF4_BLOCK * NF4_SCALER_BLOCK):
                raise LoraError(
                    f"lora.quantize='nf4': a layer of {shape} has {in_features * out_features} "
                    f"weights, not a multiple of {NF4_BLOCK * NF4_SCALER_BLOCK} (NF4 blocks of "
                    f"{NF4_BLOCK}, their scales in groups of {NF4_SCALER_BLOCK}); use 'int8'"
                )
        if weight is not None:
            self.set_base_weight(weight)
        elif quantize == "none":
            self.weight = _frozen(torch.empty(shape, device=device, dtype=dtype))
        elif quantize == "int8":
            self.weight = _frozen(torch.empty(shape, dtype=torch.int8, device=device))
            self.weight_scale = _frozen(torch.ones(out_features, device=device))
        else:  # a placeholder of the right layout (FSDP2 shards it on the meta device)
            empty = torch.zeros(shape, device=device, dtype=NF4_DTYPE)
            self.weight = _frozen(nf4.to_nf4(empty, NF4_BLOCK, NF4_SCALER_BLOCK))

    @torch.no_grad()
    def set_base_weight(self, w: torch.Tensor) -> None:
        """Store the base weight ``w`` (the full out × in tensor), quantising it if configured.

        Sharded by FSDP2, the full tensor is quantised and this rank keeps its rows: NF4's
        double quantisation centres the scales on their mean over the whole tensor, which
        shards quantised one by one would not share. A new NF4 shard replaces the parameter,
        which FSDP2 takes up in its ``load_state_dict`` hook: load through
        ``load_state_dict`` (``load_base_state_dict`` does) rather than calling this."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise LoraError(
                f"base weight of shape {tuple(w.shape)} for a layer of "
                f"{(self.out_features, self.in_features)}"
            )
        current = self._parameters.get("weight")
        sharded = _is_sharded(current)
        if self.quantize == "none":
            if isinstance(w, nn.Parameter):
                w.requires_grad_(False)
                self.weight = w
            else:
                self.weight = _frozen(w.detach())
        elif self.quantize == "int8":
            q, scale = _quantize_int8(w)
            if sharded:
                _copy_shard(current, q)
                _copy_shard(self.weight_scale, scale)
            else:
                self.weight, self.weight_scale = _frozen(q), _frozen(scale.to(w.device))
        else:
            nf4 = _torchao_nf4().to_nf4(
                w.detach().to(NF4_DTYPE).contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK
            )
            if sharded:
                from torch.distributed.tensor import DTensor

                _check_nf4_shards(current)
                nf4 = DTensor.from_local(
                    shard_of(nf4, current),
                    current.device_mesh,
                    current.placements,
                    shape=current.shape,
                    stride=current.stride(),
                    run_check=False,
                )
            self.weight = _frozen(nf4)
        self.base_loaded = True

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (dequantised) base weight in ``dtype`` (default: the compute dtype)."""
        if self.quantize == "none":
            return self.weight if dtype is None else self.weight.to(dtype)
        dtype = dtype or self.compute_dtype
        if self.quantize == "int8":
            return _dequantize_int8(self.weight, self.weight_scale, dtype)
        return self.weight.get_original_weight().to(dtype)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize == "none":
            return F.linear(x, self.weight)
        if self.quantize == "int8":
            return _Int8BaseLinear.apply(x, self.weight, self.weight_scale)
        return _torchao_nf4().linear_nf4(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args) -> None:
        if self.quantize == "none":
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)
            return
        missing_keys, unexpected_keys = args[0], args[1]
        key, scale_key = prefix + "weight", prefix + "weight_scale"
        w = state_dict.get(key)
        if w is None:
            if not (_is_sharded(self.weight) and self.base_loaded):  # else load_base_state_dict
                missing_keys.append(key)  # took it out, having loaded it whole
        elif w is not self.weight:
            self._load_base(key, w, state_dict.get(scale_key))
        elif _is_sharded(w) and not self.base_loaded:
            # torch's set_model_state_dict hands each FSDP2 parameter back to itself after
            # copying its shard of the full tensor into it: a shard quantised on its own
            raise LoraError(_SHARDED_LOAD.format(key=key, quantize=self.quantize))
        if strict:
            for k in state_dict:
                name = k[len(prefix) :].split(".", 1)[0] if k.startswith(prefix) else None
                if name is not None and name not in self._parameters and name not in self._modules:
                    unexpected_keys.append(k)

    def _load_base(self, key: str, w: torch.Tensor, scale: torch.Tensor | None) -> None:
        if _is_sharded(w):
            raise LoraError(_SHARDED_LOAD.format(key=key, quantize=self.quantize))
        if w.is_floating_point() and not is_quantised(w):
            self.set_base_weight(w)
        elif self.quantize == "int8" and w.dtype == torch.int8 and scale is not None:
            with torch.no_grad():  # an int8 state dict, e.g. this class's own
                self.weight, self.weight_scale = _frozen(w.clone()), _frozen(scale.float().clone())
            self.base_loaded = True
        elif self.quantize == "nf4" and is_quantised(w) and w.is_floating_point():
            self.weight, self.base_loaded = _frozen(w), True  # an NF4Tensor
        else:
            raise LoraError(
                f"{key}: a {w.dtype} {type(w).__name__} cannot be the base of a "
                f"quantize={self.quantize!r} layer; expected a floating-point weight"
                + (" or int8 with its weight_scale" if self.quantize == "int8" else "")
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantize={self.quantize}"


_SHARDED_LOAD = (
    "{key}: a quantize={quantize!r} base sharded by FSDP2 loads from the full tensors with "
    "llamaforge.finetune.lora.load_base_state_dict (it quantises each whole tensor, then "
    "keeps this rank's rows); torch's set_model_state_dict would quantise each shard alone"
)


def _is_sharded(t: torch.Tensor | None) -> bool:
    return hasattr(t, "to_local")  # a DTensor (FSDP2's shard)


def _check_nf4_shards(p: Any) -> None:
    """NF4 shards are torchao's row blocks of whole scale groups, on a 1-D mesh (FSDP2)."""
    rows, cols = p.shape
    n = p.device_mesh.size()
    if p.device_mesh.ndim != 1:
        raise LoraError(
            "lora.quantize='nf4' shards over one mesh dimension (FSDP2); HSDP "
            "(parallel.dp_replicate > 1) is not supported, use DDP or dp_replicate = 1"
        )
    group = NF4_BLOCK * NF4_SCALER_BLOCK
    if rows % n or (rows // n * cols) % group:
        raise LoraError(
            f"lora.quantize='nf4': a weight of {(rows, cols)} does not split into {n} FSDP2 "
            f"shards of whole rows and whole groups of {group} weights; use another number "
            "of processes, or quantize='int8'"
        )


def _copy_shard(p: torch.Tensor, full: torch.Tensor) -> None:
    local = p.to_local()  # type: ignore[attr-defined]
    local.copy_(shard_of(full.to(local.device), p))


class LoraLinear(QuantLinear):
    """``QuantLinear`` plus the low-rank update ``scaling · lora_B(lora_A(dropout(x)))``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        quantize: str = "none",
        weight: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, quantize=quantize, weight=weight, device=device, dtype=dtype
        )
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        if torch.device(device or "cpu").type != "meta":
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ U(±1/√in) (PEFT: kaiming_uniform_ with a=√5), B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.lora_A.weight.uniform_(-bound, bound, generator=generator)
        self.lora_B.weight.zero_()

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling · B A`` (out × in)."""
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return (result + self.lora_B(self.lora_A(lora_x)) * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


# -- applying, initialising, merging --------------------------------------------------------


def _linear_targets(model: nn.Module) -> Iterator[tuple[str, str, nn.Linear]]:
    """(module name, Meta short name, module) of the block linears and the output layer."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name:
            continue
        clean = unwrapped_name(name)
        if clean == "output":
            yield name, "output", module
            continue
        m = re.fullmatch(r"layers\.\d+\.(attention|feed_forward)\.(w[qkvo123])", clean)
        if m and _META_PARENT.get(m.group(2)) == m.group(1):
            yield name, m.group(2), module


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Put LoRA adapters on ``cfg.targets`` and freeze every other parameter, in place.

    Returns the adapted module names (``layers.0.attention.wq``, …). Works on a model on
    the meta device: then nothing is initialised, and after ``to_empty`` the caller loads
    the base weights and calls ``init_lora_`` (see the module's notes). Call it before
    activation checkpointing, ``torch.compile`` and FSDP2/DDP wrapping.
    """
    cfg.validate()
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LoraError("apply_lora: the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(cfg.target_names())
    adapted: list[str] = []
    found: set[str] = set()
    for name, short, module in list(_linear_targets(model)):
        found.add(short)
        w = module.weight
        quantize_here = cfg.quantize != "none" and (
            short in targets or (cfg.quantize_scope == "all" and short != "output")
        )
        if short not in targets and not quantize_here:
            continue
        float_dtype = w.dtype if w.is_floating_point() else torch.float32
        kwargs: dict[str, Any] = {
            "quantize": cfg.quantize if quantize_here else "none",
            "weight": None if w.device.type == "meta" else w,
            "device": w.device,
            "dtype": float_dtype,
        }
        new: QuantLinear
        if short in targets:
            new = LoraLinear(
                module.in_features,
                module.out_features,
                rank=cfg.rank,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                rslora=cfg.rslora,
                **kwargs,
            )
            adapted.append(unwrapped_name(name))
        else:
            new = QuantLinear(module.in_features, module.out_features, **kwargs)
        new.train(module.training)
        _swap(model, name, new)
    missing = sorted(targets - found, key=ALL_TARGETS.index)
    if missing:
        raise LoraError(f"lora.targets: {missing} match no layer of this model")
    return adapted


def load_base_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], options: Any = None
) -> None:
    """``set_model_state_dict`` (torch.distributed.checkpoint.state_dict) for a model whose
    base may be quantised and sharded: what the trainer loads ``init`` with under LoRA.

    ``state``: full tensors under Meta's names; with ``options.broadcast_from_rank0`` only
    rank 0's are read (the other ranks pass {}). Each quantised layer that FSDP2 sharded takes
    its full weight, one at a time (broadcast from rank 0 when asked), quantises it whole and
    keeps its rows (``QuantLinear.set_base_weight``); everything else goes to
    ``set_model_state_dict`` with ``options`` (default: full state dict, not strict). Without
    sharding this is ``set_model_state_dict``: the layers quantise the full tensors they get."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = options or StateDictOptions(full_state_dict=True, strict=False)
    sharded = [
        (unwrapped_name(name) + ".weight", m)
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.quantize != "none" and _is_sharded(m.weight)
    ]
    if sharded:
        state = dict(state)  # the sharded layers' weights are taken out below
        _load_sharded_bases(sharded, state, bool(options.broadcast_from_rank0))
    set_model_state_dict(model, state, options=options)


def _load_sharded_bases(
    layers: list[tuple[str, QuantLinear]], state: dict[str, torch.Tensor], broadcast: bool
) -> None:
    import torch.distributed as dist

    present = [key in state for key, _ in layers]
    if broadcast:  # the other ranks learn from rank 0 which weights it has
        box = [present]
        dist.broadcast_object_list(box, src=0)
        present = box[0]
    for (key, layer), has in zip(layers, present):
        if not has:
            continue  # reported missing by the layer's own load (strict) or left as it is
        shape = (layer.out_features, layer.in_features)
        device = layer.weight.to_local().device  # type: ignore[attr-defined]
        if not broadcast:
            full = state.pop(key)
        elif dist.get_rank() == 0:
            full = state.pop(key).to(device, layer.compute_dtype).contiguous()
        else:
            full = torch.empty(shape, dtype=layer.compute_dtype, device=device)
        if broadcast:
            dist.broadcast(full, src=0)
        try:
            layer.load_state_dict({"weight": full}, strict=False)  # FSDP2's hook re-registers
        except LoraError as e:
            raise LoraError(f"{key}: {e}") from None
        del full


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(clean name, module) of every LoRA layer."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield unwrapped_name(name), module


@torch.no_grad()
def init_lora_(model: nn.Module, seed: int) -> None:
    """(Re)initialise every adapter: A ~ U(±1/√in) drawn from a generator seeded by
    (seed, parameter name), B = 0. Independent of sharding (FSDP2 DTensors: each rank keeps
    its shard of the same full tensor) and of the order of parameters."""
    from llamaforge.parallel.apply import shard_of

    for name, p in model.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        if ".lora_B." in name:
            local.zero_()
            continue
        clean = unwrapped_name(name)
        gen = torch.Generator(device=local.device)
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(clean.encode()))
        bound = 1.0 / math.sqrt(p.shape[1])
        full = torch.empty(p.shape, dtype=local.dtype, device=local.device)
        full.uniform_(-bound, bound, generator=gen)
        local.copy_(full if local is p else shard_of(full, p))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what the optimizer gets)."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, named like ``layers.0.attention.wq.lora_A.weight`` (wrapper
    prefixes removed). FSDP2 DTensors are gathered: call it on every rank then."""
    out = {}
    for name, t in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            full = getattr(t, "full_tensor", None)
            out[unwrapped_name(name)] = (full() if full is not None else t).detach()
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold ``W += scaling · B A`` into the base weights (in fp32) and put plain
    ``nn.Linear`` modules back (quantised bases are dequantised), in place: the state dict
    is a plain native one again, every parameter trainable as in a fresh model."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        dtype = module.compute_dtype
        w = module.base_weight(torch.float32)
        if isinstance(module, LoraLinear):
            w = w + module.delta_weight(torch.float32).to(w.device)
        device = module.weight.device if module.quantize != "nf4" else w.device
        plain = nn.Linear(
            module.in_features, module.out_features, bias=False, device="meta", dtype=dtype
        )
        plain.weight = nn.Parameter(w.to(device=device, dtype=dtype))
        plain.train(module.training)
        _swap(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# -- base identity ----------------------------------------------------------------------------


def _tensor_digest(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{name}:{tuple(t.shape)}:".encode())
    data = t.detach().to("cpu", torch.float32).contiguous()
    h.update(data.view(torch.uint8).numpy().tobytes())
    return f"{name} {h.hexdigest()}"


def _combine(lines: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def tensors_sha256(source: nn.Module | str | os.PathLike) -> str:
    """The base's identity that adapters of format 1 recorded: sha256 over (name, shape,
    fp32 value) of every tensor, order free. A native checkpoint directory and the model
    loaded from it (in its stored dtype or fp32) give the same hash; adapters are ignored.
    Reads every weight once (seconds per GB). Newer adapters record the base checkpoint's
    ``weights_sha256`` (its files) instead."""
    if isinstance(source, nn.Module):
        lines = []
        for name, t in source.state_dict().items():
            name = unwrapped_name(name)
            if ".lora_" in name:
                continue
            if name.endswith("weight_scale") or is_quantised(t):
                raise LoraError(
                    f"tensors_sha256: {name} is quantised; hash the base checkpoint instead"
                )
            full = getattr(t, "full_tensor", None)
            lines.append(_tensor_digest(name, full() if full is not None else t))
        return _combine(lines)
    from llamaforge.checkpoint.native import iter_tensors

    return _combine(_tensor_digest(n, t) for n, t in iter_tensors(source))


# -- PEFT format -----------------------------------------------------------------------------


def _model_args(model: nn.Module) -> Any:
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        args = getattr(m, "args", None)
        if args is not None:
            return args
    raise LoraError(f"{type(model).__name__} has no .args: not a llamaforge Transformer")


def peft_name(meta_name: str) -> str:
    """``layers.3.attention.wq.lora_A.weight`` → PEFT's name on a HF ``LlamaForCausalLM``
    (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``)."""
    m = _META_LORA_RE.match(meta_name)
    if not m or (m.group(1) is None) != (m.group(2) == "output"):
        raise LoraError(f"{meta_name!r} is not a LoRA tensor of a llamaforge model")
    layer, short, ab = m.groups()
    if short not in ALL_TARGETS:
        raise LoraError(f"{meta_name!r} is not a LoRA tensor of a llamaforge model")
    if short == "output":
        return f"{_PEFT_PREFIX}lm_head.lora_{ab}.weight"
    return f"{_PEFT_PREFIX}model.layers.{layer}.{_HF_MODULE[short]}.lora_{ab}.weight"


def meta_lora_name(peft_tensor: str) -> str:
    """PEFT's tensor name (with or without an adapter name like ``.default``) → ours."""
    m = _PEFT_LAYER_RE.match(peft_tensor)
    if m:
        layer, group, proj, ab = m.groups()
        short = _FROM_HF_TARGET.get(proj)
        if short is not None and short != "output" and _HF_MODULE[short] == f"{group}.{proj}":
            return f"layers.{layer}.{_META_PARENT[short]}.{short}.lora_{ab}.weight"
    m = _PEFT_HEAD_RE.match(peft_tensor)
    if m:
        return f"output.lora_{m.group(1)}.weight"
    raise LoraError(
        f"adapter tensor {peft_tensor!r} is not a LoRA A/B weight of a Llama linear layer "
        "(embeddings, biases, DoRA magnitudes and modules_to_save are not supported)"
    )


def _permute_b(name: str, b: torch.Tensor, args: Any, to_hf: bool) -> torch.Tensor:
    from llamaforge.checkpoint.convert.hf import permute_from_hf, permute_to_hf

    permute = permute_to_hf if to_hf else permute_from_hf
    if name.endswith("attention.wq.lora_B.weight"):
        return permute(b, args.n_heads)
    if name.endswith("attention.wk.lora_B.weight"):
        return permute(b, args.kv_heads)
    return b


def _alpha_json(alpha: float) -> float | int:
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    cfg: LoraConfig,
    *,
    base: str | os.PathLike | None = None,
    base_sha256: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of ``model`` as a PEFT LoRA adapter for the HF layout, atomically.

    ``base``: the base model's path or name (``base_model_name_or_path``); when it is a native
    checkpoint directory and ``base_sha256`` is not given, its ``weights_sha256`` is recorded
    (read from its params.json, or hashed from its files by rank 0 once the others are
    done); else none, and loading cannot check the base's weights. Under torch.distributed,
    call it on every rank (FSDP2 shards are gathered); rank 0 writes.
    """
    from safetensors.torch import save_file

    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise LoraError(f"{out}: already exists; pass overwrite=True (--force) to replace it")
    args = _model_args(model)
    state = lora_state_dict(model)
    if not state:
        raise LoraError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    for name, m in lora_modules(model):
        if m.rank != cfg.rank or not math.isclose(m.scaling, cfg.scaling):
            raise LoraError(
                f"save_adapter: {name} has rank={m.rank}, scaling={m.scaling:g} but the config "
                f"says rank={cfg.rank}, scaling={cfg.scaling:g}"
            )
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return out  # every rank gathers, rank 0 writes
    if base_sha256 is None and base is not None and (Path(base) / "params.json").is_file():
        from llamaforge.checkpoint.native import weights_sha256

        base_sha256 = weights_sha256(base)
    tensors = {
        peft_name(n): _permute_b(n, t, args, to_hf=True).to("cpu").contiguous()
        for n, t in state.items()
    }
    shorts = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in state}
    targets = [t for t in ALL_TARGETS if t in shorts]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base) if base is not None else None,
        "revision": None,
        "r": cfg.rank,
        "lora_alpha": _alpha_json(cfg.alpha),
        "lora_dropout": float(cfg.dropout),
        "target_modules": sorted(HF_TARGET[t] for t in targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": bool(cfg.rslora),
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    ours = {
        "format_version": FORMAT_VERSION,
        "targets": targets,
        "quantize": cfg.quantize,
        "base_sha256": base_sha256,
        "base_params": args.to_dict(),
        "shapes": {n: list(t.shape) for n, t in state.items()},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / LLAMAFORGE_FILE).write_text(json.dumps(ours, indent=2) + "\n")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, LoraError)


def read_adapter(
    adapter_dir: str | os.PathLike,
) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, tensors under OUR names in PEFT's HF layout — B not yet un-permuted —, the
    llamaforge block or {}) of a PEFT LoRA adapter directory; unsupported features raise."""
    src = Path(adapter_dir)
    if not (src / ADAPTER_CONFIG).is_file():
        raise LoraError(f"{src}: no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    pc = _read_json(src / ADAPTER_CONFIG)
    where = str(src / ADAPTER_CONFIG)
    if pc.get("peft_type") != "LORA":
        raise LoraError(f"{where}: peft_type={pc.get('peft_type')!r}, only LORA is supported")
    unsupported = {
        "use_dora": bool(pc.get("use_dora")),
        "fan_in_fan_out": bool(pc.get("fan_in_fan_out")),
        "bias": pc.get("bias", "none") != "none",
        "lora_bias": bool(pc.get("lora_bias")),
        "modules_to_save": bool(pc.get("modules_to_save")),
        "layers_to_transform": pc.get("layers_to_transform") is not None,
        "rank_pattern": bool(pc.get("rank_pattern")),
        "alpha_pattern": bool(pc.get("alpha_pattern")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise LoraError(f"{where}: {key}={pc.get(key)!r} is not supported")
    weights = src / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors.torch import load_file

        try:
            raw = load_file(str(weights))
        except Exception as e:  # safetensors' own error types on a damaged file
            raise LoraError(f"{weights}: cannot read safetensors file ({e})") from None
    elif (src / ADAPTER_WEIGHTS_BIN).is_file():
        from llamaforge.checkpoint.native import CheckpointError, load_pickled_tensors

        try:
            raw = load_pickled_tensors(src / ADAPTER_WEIGHTS_BIN)
        except CheckpointError as e:
            raise LoraError(str(e)) from None
    else:
        raise LoraError(f"{src}: no {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
    tensors = {meta_lora_name(k): v for k, v in raw.items()}
    shorts = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors}
    ours = _read_json(src / LLAMAFORGE_FILE) if (src / LLAMAFORGE_FILE).is_file() else {}
    try:
        cfg = LoraConfig(
            rank=int(pc["r"]),
            alpha=float(pc["lora_alpha"]),
            dropout=float(pc.get("lora_dropout") or 0.0),
            targets=[t for t in ALL_TARGETS if t in shorts],
            rslora=bool(pc.get("use_rslora", False)),
        ).validate()
    except KeyError as e:
        raise LoraError(f"{where}: missing field {e}") from None
    except LoraError as e:
        raise LoraError(f"{where}: {e}") from None
    return cfg, tensors, ours


def _identity(args: Any) -> dict[str, Any]:
    """What must agree between an adapter's base and a model (not max_seq_len)."""
    return {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "ffn_hidden_dim": args.ffn_hidden_dim,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
    }


def check_base_params(src: Path, ours: dict[str, Any], args: Any) -> None:
    """Refuse an adapter whose recorded base (``ours``: its llamaforge_adapter.json) has
    another architecture than ``args``, naming both."""
    recorded = ours.get("base_params")
    if recorded is None:
        return
    try:
        theirs = _identity(ModelArgs.from_dict(recorded, source=str(src / LLAMAFORGE_FILE)))
    except (TypeError, ValueError) as e:
        raise LoraError(f"{src / LLAMAFORGE_FILE}: base_params: {e}") from None
    mine = _identity(args)
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        raise LoraError(
            f"{src}: adapter was made for another base: "
            + ", ".join(f"{k}={theirs[k]}" for k in diff)
            + "; this model has "
            + ", ".join(f"{k}={mine[k]}" for k in diff)
        )


def check_base_sha256(
    src: Path,
    ours: dict[str, Any],
    *,
    weights_sha256: str | None = None,
    tensors_hash: Callable[[], str] | None = None,
) -> None:
    """Refuse an adapter whose recorded base hash is not this base's: ``weights_sha256`` (the
    base checkpoint's files) for the current format, ``tensors_hash()`` (called only then)
    for an adapter of format 1, which recorded the hash of the fp32 tensor values. Without
    the value the adapter's format needs, nothing is checked."""
    recorded = ours.get("base_sha256")
    if recorded is None:  # e.g. an adapter made by peft: nothing to check against
        return
    legacy = ours.get("format_version", 1) < 2
    mine = (tensors_hash() if tensors_hash else None) if legacy else weights_sha256
    if mine is None or recorded == mine:
        return
    kind = "fp32 tensor values (adapter format 1)" if legacy else "weights"
    raise LoraError(
        f"{src}: adapter was trained on base {kind} sha256 {recorded}, this base is {mine}"
    )


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    base_sha256: str | None = None,
    *,
    quantize: str = "none",
) -> LoraConfig:
    """Apply LoRA with the adapter's config to ``model`` (a plain llamaforge Transformer) and
    load a PEFT adapter made for the HF layout of its base (by ``save_adapter`` or by peft
    itself). Returns the config used (``quantize`` sets how the base is stored).

    An adapter recorded for another base is an error naming both: a different architecture
    (from ``llamaforge_adapter.json``, or tensor shapes that do not fit), or — when
    ``base_sha256`` (the base checkpoint's ``checkpoint.native.weights_sha256``) is given — a
    different weights hash (for an adapter of format 1, ``tensors_sha256`` of ``model``).
    """
    src = Path(adapter_dir)
    cfg, tensors, ours = read_adapter(src)
    cfg.quantize = quantize
    cfg.validate()
    args = _model_args(model)
    check_base_params(src, ours, args)
    if base_sha256 is not None:
        check_base_sha256(
            src, ours, weights_sha256=base_sha256, tensors_hash=lambda: tensors_sha256(model)
        )
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LoraError(f"{src}: the model already has LoRA adapters; load into a plain model")
    apply_lora(model, cfg)
    params = {n: p for n, p in model.named_parameters()}
    params = {unwrapped_name(n): p for n, p in params.items() if ".lora_" in n}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        raise LoraError(
            f"{src}: adapter tensor {unexpected[0]} has no layer in this model "
            f"(n_layers={args.n_layers}): made for another base"
        )
    if missing:
        raise LoraError(f"{src}: adapter lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if tuple(t.shape) != tuple(p.shape):
                raise LoraError(
                    f"{src}: {peft_name(name)} has shape {tuple(t.shape)}, this model's layer "
                    f"needs {tuple(p.shape)} (dim={args.dim}, n_heads={args.n_heads}, "
                    f"n_kv_heads={args.kv_heads}): made for another base"
                )
            p.copy_(_permute_b(name, t, args, to_hf=False))
    return cfg
