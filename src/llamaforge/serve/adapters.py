"""LoRA adapters served by name over one base model, batched per row (S-LoRA / punica's
idea: one forward for a batch whose rows use different adapters, or none).

`AdapterRegistry` loads PEFT adapters (as ``llamaforge finetune`` writes them) onto the
engine's model, checked as ``lora merge`` checks them (`finetune.merge.adapter_deltas`:
the architecture, every tensor's shape, and the base's ``weights_sha256`` when the adapter
records one; an adapter for another base is refused naming both hashes). Each adapter gets
a slot; each targeted linear layer of the model is wrapped once, from outside, by a
`MultiLoraLinear` that keeps the base layer (``nn.Linear`` or an int8 ``Int8Linear``) and
the slots' adapters stacked: A as (slots, rank, in) and B, scaled, as (slots, out, rank).
Before each forward the runner binds the rows' slots (-1: the base) to the shared
`AdapterBatch`; every wrapped layer then adds, for the rows with an adapter only,

    y[rows] += (x[rows] @ A[slot]ᵀ) @ (scaling · B[slot])ᵀ

as two batched products over the gathered slots (``bmm``), whatever the mix of adapters in
the batch. Adapters of different ranks are padded to the largest rank loaded (zeros, which
add nothing); a layer one adapter targets and another does not holds zeros for the other.

Loading at run time never stops a forward in flight: a load builds new stacked tensors and
swaps them in (copy on write), and a slot is referenced by a forward only once its adapter
is published. A request holds its adapter (`AdapterRegistry.lease`) until it ends;
unloading an adapter that requests hold is refused (`AdapterInUse`), and its slot is
reused by a later load. Each load gets a new prefix-cache key (`AdapterLease.key`), so the
base and every adapter — even one loaded again under an old name — never share KV blocks.

Paths a client sends (``POST /v1/load_lora_adapter``) are confined to the directories
allowed by the operator (``--lora-dir``): resolved with symlinks followed, the adapter's
directory and every file read from it must lie inside one of them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch
from torch import nn

from llamaforge.checkpoint.native import weights_sha256
from llamaforge.finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_BIN,
    LLAMAFORGE_FILE,
    LoraConfig,
    LoraError,
    _swap,
    check_base_params,
    check_base_sha256,
    read_adapter,
    tensors_sha256,
)
from llamaforge.finetune.merge import adapter_deltas
from llamaforge.model import Transformer

__all__ = [
    "AdapterBatch",
    "AdapterConflict",
    "AdapterForbidden",
    "AdapterInUse",
    "AdapterLease",
    "AdapterNotFound",
    "AdapterRegistry",
    "LoadedAdapter",
    "MultiLoraLinear",
    "check_name",
    "parse_lora_arg",
]

log = logging.getLogger(__name__)

MAX_ADAPTERS = 64  # loaded at once: each holds device memory and a slot in every stack
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, LLAMAFORGE_FILE)
_keys = count(1)  # prefix-cache keys: one per load, never reused


class AdapterNotFound(LookupError):
    """No adapter of that name is loaded."""


class AdapterConflict(ValueError):
    """The name is taken (loaded, or being loaded), or the registry is full."""


class AdapterInUse(AdapterConflict):
    """Requests hold the adapter: it cannot be unloaded now."""


class AdapterForbidden(PermissionError):
    """A path outside the directories adapters may be loaded from at run time."""


class AdapterBatch:
    """The current forward's rows and their adapters, shared by every wrapped layer: set by
    the runner (`bind`) before each forward, read by `MultiLoraLinear`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.n_rows = 0
        self.rows: torch.Tensor | None = None  # rows with an adapter; None: no row has one
        self.slots: torch.Tensor | None = None  # their slots
        self.flat_rows: torch.Tensor | None = None  # the same for kept positions, flattened
        self.flat_slots: torch.Tensor | None = None
        self.every_row = False  # every row has an adapter: no gather or scatter of rows

    def bind(self, slots: Sequence[int] | None, keep: torch.Tensor | None = None) -> None:
        """The next forward's rows: ``slots[i]`` is row i's adapter slot (-1: the base).
        ``keep``: the (rows, s) positions the model's output layer keeps (``only``), which
        it then sees flattened to (n, dim)."""
        self.n_rows = len(slots) if slots is not None else 0
        active = [i for i, s in enumerate(slots or ()) if s >= 0]
        if not active:
            self.rows = self.slots = self.flat_rows = self.flat_slots = None
            return
        assert slots is not None
        dev = self.device
        self.rows = torch.tensor(active, dtype=torch.long, device=dev)
        self.every_row = len(active) == len(slots)
        self.slots = torch.tensor([slots[i] for i in active], dtype=torch.long, device=dev)
        self.flat_rows = self.flat_slots = None
        if keep is not None:
            counts = keep.sum(dim=1).tolist()
            starts = [0]
            for c in counts[:-1]:
                starts.append(starts[-1] + c)
            flat = [j for i in active for j in range(starts[i], starts[i] + counts[i])]
            flat_slots = [slots[i] for i in active for _ in range(counts[i])]
            self.flat_rows = torch.tensor(flat, dtype=torch.long, device=dev)
            self.flat_slots = torch.tensor(flat_slots, dtype=torch.long, device=dev)


class MultiLoraLinear(nn.Module):
    """A base linear layer (``base``: ``nn.Linear`` or ``Int8Linear``) plus every loaded
    adapter's low-rank update for it, stacked by slot: ``stack`` is (A (slots, rank, in),
    B·scaling (slots, out, rank)), replaced whole (never written in place) when adapters
    load. Each row of a batch gets its own adapter's update (see the module's docstring)."""

    def __init__(self, base: nn.Module, batch: AdapterBatch, dtype: torch.dtype) -> None:
        super().__init__()
        self.base, self.batch = base, batch
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        dev = batch.device
        self.stack: tuple[torch.Tensor, torch.Tensor] = (
            torch.zeros(0, 0, self.in_features, dtype=dtype, device=dev),
            torch.zeros(0, self.out_features, 0, dtype=dtype, device=dev),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = self.batch
        if b.rows is None:
            return y
        a_stack, b_stack = self.stack
        if x.dim() == 3:
            if x.shape[0] != b.n_rows:
                raise RuntimeError(
                    f"a forward of {x.shape[0]} rows, {b.n_rows} bound: bind the rows' adapters"
                )
            rows, slots = b.rows, b.slots
            xs = x if b.every_row else x.index_select(0, rows)
        else:  # the output layer over kept positions, (n, dim)
            if b.flat_rows is None:
                raise RuntimeError("a forward over kept positions: bind them (keep) first")
            rows, slots = b.flat_rows, b.flat_slots
            xs = (x if b.every_row else x.index_select(0, rows))[:, None]
        assert slots is not None
        low = torch.bmm(xs.to(a_stack.dtype), a_stack.index_select(0, slots).transpose(1, 2))
        up = b_stack.index_select(0, slots).transpose(1, 2)
        if b.every_row and y.dtype == low.dtype:  # y += low @ up, row by row, in place
            return y.view(low.shape[0], -1, y.shape[-1]).baddbmm_(low, up).view(y.shape)
        delta = torch.bmm(low, up)
        return y.index_add_(0, rows, delta.reshape(-1, *y.shape[1:]).to(y.dtype))

    @torch.no_grad()
    def with_slot(
        self, slot: int, slots: int, rank: int, ab: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        """Replace ``stack`` by one of ``slots`` slots of rank ``rank`` (the old ones copied,
        zero-padded) whose ``slot`` holds ``ab`` (A (r, in), B·scaling (out, r)) or zeros."""
        old_a, old_b = self.stack
        n, r = old_a.shape[0], old_a.shape[1]
        a = old_a.new_zeros(slots, rank, self.in_features)
        b = old_b.new_zeros(slots, self.out_features, rank)
        a[:n, :r], b[:n, :, :r] = old_a, old_b
        a[slot], b[slot] = 0, 0
        if ab is not None:
            a[slot, : ab[0].shape[0]] = ab[0].to(a.dtype)
            b[slot, :, : ab[1].shape[1]] = ab[1].to(b.dtype)
        self.stack = (a, b)

    def extra_repr(self) -> str:
        slots, rank = self.stack[0].shape[:2]
        return f"in={self.in_features}, out={self.out_features}, slots={slots}, rank={rank}"


@dataclass(eq=False)
class LoadedAdapter:
    """One loaded adapter: its name, where it was read from, its slot and cache key."""

    name: str
    path: Path
    slot: int
    key: tuple[str, int]
    rank: int
    alpha: float
    targets: tuple[str, ...]
    leases: int = 0


@dataclass(eq=False)
class AdapterLease:
    """A request's hold on an adapter: its ``slot`` for the runner and the ``key`` its
    prefix-cache blocks are hashed with. `release` once, when the request ends (again:
    nothing)."""

    adapter: LoadedAdapter
    registry: AdapterRegistry
    released: bool = field(default=False)

    @property
    def slot(self) -> int:
        return self.adapter.slot

    @property
    def key(self) -> tuple[str, int]:
        return self.adapter.key

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.registry._release(self.adapter)


def parse_lora_arg(value: str) -> tuple[str, str]:
    """``NAME=DIR`` (``serve --lora``) as (name, dir); the name checked (`check_name`)."""
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise ValueError(f"--lora {value!r}: expected NAME=DIR")
    check_name(name)
    return name, path


def check_name(name: object) -> str:
    """An adapter name: 1 to 128 of letters, digits, ``.``, ``_`` and ``-`` (a URL path
    segment: ``/v1/models/NAME``), starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r}: expected 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class AdapterRegistry:
    """The adapters loaded onto ``model`` (the engine's), by name.

    ``base_dir``: the base's native checkpoint, whose ``weights_sha256`` an adapter's
    recorded one is checked against (read when first needed). ``allowed_dirs``: where
    `load` may read from when ``confined`` (the default; the operator's ``--lora`` paths are
    not). ``reserved``: names an adapter may not take (the base model's). Thread-safe:
    `load` (slow: run it off the event loop) and `unload` from any thread, `lease` from
    the HTTP side, `release` from the engine's thread."""

    def __init__(
        self,
        model: Transformer,
        *,
        base_dir: str | os.PathLike | None = None,
        allowed_dirs: Sequence[str | os.PathLike] = (),
        reserved: Sequence[str] = (),
        max_adapters: int = MAX_ADAPTERS,
    ) -> None:
        self.model = model
        weight = model.tok_embeddings.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.batch = AdapterBatch(self.device)
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.allowed = [Path(os.path.realpath(d)) for d in allowed_dirs]
        self.reserved = set(reserved)
        self.max_adapters = max_adapters
        self._lock = threading.Lock()
        self._by_name: dict[str, LoadedAdapter] = {}
        self._loading: set[str] = set()
        self._slots: list[LoadedAdapter | None] = []
        self._layers: dict[str, MultiLoraLinear] = {}
        self._rank = 0
        self._base_sha256: str | None = None

    # -- what is loaded ---------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def adapters(self) -> list[LoadedAdapter]:
        """The loaded adapters, in slot order."""
        with self._lock:
            return [a for a in self._slots if a is not None]

    @property
    def rank(self) -> int:
        """The stacks' rank: the largest of the adapters loaded so far."""
        return self._rank

    def lease(self, name: str) -> AdapterLease:
        """Hold the adapter ``name`` for a request (released when it ends)."""
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None:
                raise AdapterNotFound(self._unknown(name))
            adapter.leases += 1
        return AdapterLease(adapter, self)

    def _release(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            adapter.leases -= 1

    def _unknown(self, name: str) -> str:
        loaded = sorted(self._by_name)
        return f"no adapter named {name!r} is loaded (loaded: {loaded or 'none'})"

    # -- loading ----------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """The adapter directory a client names: absolute, or relative to the first allowed
        directory; refused (`AdapterForbidden`) unless it and the files read from it lie,
        symlinks followed, inside an allowed directory."""
        if not self.allowed:
            raise AdapterForbidden(
                "loading adapters at run time is off: start the server with --lora-dir DIR"
            )
        if not isinstance(path, str) or not path or "\0" in path:
            raise ValueError(f"lora_path {path!r}: expected a directory path")
        given = Path(path)
        real = Path(os.path.realpath(given if given.is_absolute() else self.allowed[0] / given))
        candidates = [real] + [Path(os.path.realpath(real / f)) for f in _FILES]
        if not all(any(p.is_relative_to(d) for d in self.allowed) for p in candidates):
            raise AdapterForbidden(
                f"lora_path {path!r}: outside the directories adapters may be loaded from "
                f"(--lora-dir: {[str(d) for d in self.allowed]})"
            )
        if not real.is_dir():
            raise AdapterNotFound(f"lora_path {path!r}: no such adapter directory")
        return real

    def load(self, name: str, path: str | os.PathLike, *, confined: bool = True) -> LoadedAdapter:
        """Read, check and install the adapter at ``path`` as ``name``. ``confined``: a
        client's path (`resolve`). Raises ValueError (LoraError: not an adapter for this
        base, naming what differs), AdapterConflict (the name is taken, or the registry is
        full), AdapterForbidden, AdapterNotFound (no such directory)."""
        check_name(name)
        if name in self.reserved:
            raise AdapterConflict(f"adapter name {name!r} is the base model's")
        src = self.resolve(str(path)) if confined else Path(path)
        with self._lock:
            if name in self._by_name or name in self._loading:
                raise AdapterConflict(f"an adapter named {name!r} is already loaded")
            if len(self._by_name) + len(self._loading) >= self.max_adapters:
                raise AdapterConflict(
                    f"{self.max_adapters} adapters are loaded: unload one before loading {name!r}"
                )
            self._loading.add(name)
        try:
            cfg, deltas = self._read(src)
            with self._lock:
                adapter = self._install(name, src, cfg, deltas)
        finally:
            with self._lock:
                self._loading.discard(name)
        log.info("adapter %s loaded from %s (slot %d, rank %d)", name, src, adapter.slot, cfg.rank)
        return adapter

    def unload(self, name: str) -> LoadedAdapter:
        """Forget ``name``: new requests for it are refused, its slot is free for the next
        load. Refused (`AdapterInUse`) while requests hold it."""
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is None:
                raise AdapterNotFound(self._unknown(name))
            if adapter.leases:
                raise AdapterInUse(
                    f"adapter {name!r} is in use by {adapter.leases} request(s): unload it "
                    "when they have finished"
                )
            del self._by_name[name]
            self._slots[adapter.slot] = None
        log.info("adapter %s unloaded (slot %d)", name, adapter.slot)
        return adapter

    def _base_hash(self) -> str | None:
        """The base's ``weights_sha256`` (recorded, else hashed once), or None without
        ``base_dir``."""
        if self._base_sha256 is None and self.base_dir is not None:
            self._base_sha256 = weights_sha256(self.base_dir)
        return self._base_sha256

    def _read(self, src: Path) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The adapter's config and, per targeted layer, (A, scaling · B) in Meta's layout,
        checked against the base as ``lora merge`` checks them."""
        cfg, tensors, ours = read_adapter(src)
        args = self.model.args
        check_base_params(src, ours, args)
        if ours.get("base_sha256") is not None:
            if self.base_dir is None:
                log.warning("%s: no base checkpoint to check the adapter's base hash against", src)
            else:
                base = self.base_dir
                check_base_sha256(
                    src,
                    ours,
                    weights_sha256=self._base_hash(),
                    tensors_hash=lambda: tensors_sha256(base),
                )
        deltas = adapter_deltas(tensors, cfg, args, src)
        if not deltas:
            raise LoraError(f"{src}: the adapter holds no tensors")
        out = {}
        for weight, (a, b) in deltas.items():
            out[weight.removesuffix(".weight")] = (a, b * cfg.scaling)
        return cfg, out

    def _install(
        self,
        name: str,
        src: Path,
        cfg: LoraConfig,
        deltas: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> LoadedAdapter:
        """Give the checked adapter a slot in every layer's stack (under the lock), then
        publish it. Layers it targets that no adapter did before are wrapped now, and put
        in the model only once their stacks hold every slot a forward may ask for."""
        free = [i for i, a in enumerate(self._slots) if a is None]
        slot = free[0] if free else len(self._slots)
        n_slots = max(len(self._slots), slot + 1)
        rank = max(self._rank, cfg.rank)
        new = {m: self._wrap(m) for m in deltas if m not in self._layers}
        for module, layer in {**self._layers, **new}.items():
            layer.with_slot(slot, n_slots, rank, deltas.get(module))
        for module, layer in new.items():
            _swap(self.model, module, layer)
            self._layers[module] = layer
        adapter = LoadedAdapter(
            name, src, slot, ("lora", next(_keys)), cfg.rank, cfg.alpha, cfg.target_names()
        )
        if slot == len(self._slots):
            self._slots.append(adapter)
        else:
            self._slots[slot] = adapter
        self._rank = rank
        self._by_name[name] = adapter
        return adapter

    def _wrap(self, module: str) -> MultiLoraLinear:
        """A new wrapper of the model's layer ``module`` (not yet in the model)."""
        base = self.model.get_submodule(module)
        if isinstance(base, MultiLoraLinear) or not hasattr(base, "in_features"):
            raise LoraError(f"layer {module} is a {type(base).__name__}: no LoRA can be served")
        return MultiLoraLinear(base, self.batch, self.dtype)

    def layers(self) -> Iterator[tuple[str, MultiLoraLinear]]:
        """The wrapped layers, by module name."""
        yield from self._layers.items()
