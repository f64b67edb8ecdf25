"""The hardware a process runs on: the ``--device`` resolver, the accelerator table (peak
bf16 FLOP/s and board power, for MFU and the paper's carbon estimate), and peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
from dataclasses import dataclass

import torch

# -- accelerators: peak dense bf16 FLOP/s (no sparsity) and board power --------------------


@dataclass(frozen=True)
class DeviceSpec:
    name: str  # matched as a substring of torch.cuda.get_device_name(), in table order
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    watts: float  # board power (TDP), for the paper's carbon estimate
    memory_gib: float = 0.0  # the largest variant's memory, for plans (0: unknown)


# Vendor datasheet figures. More specific names come first ("H100 PCIe" before "H100").
# Memory: the datasheet's GB, of the largest variant (A100 80GB, V100 32GB).
DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("GB200", 2.5e15, 1200, 186),
    DeviceSpec("B200", 2.25e15, 1000, 180),
    DeviceSpec("H200", 989.5e12, 700, 141),
    DeviceSpec("H100 PCIe", 756e12, 350, 80),
    DeviceSpec("H100 NVL", 835e12, 400, 94),
    DeviceSpec("H100", 989.5e12, 700, 80),
    DeviceSpec("H800", 989.5e12, 700, 80),
    DeviceSpec("GH200", 989.5e12, 700, 96),
    DeviceSpec("A100-PCIE", 312e12, 300, 80),
    DeviceSpec("A100", 312e12, 400, 80),  # SXM: the paper's 400 W A100-80GB
    DeviceSpec("A800", 312e12, 400, 80),
    DeviceSpec("L40S", 362e12, 350, 48),
    DeviceSpec("L40", 181e12, 300, 48),
    DeviceSpec("L4", 121e12, 72, 24),
    DeviceSpec("A10G", 70e12, 300, 24),
    DeviceSpec("A10", 125e12, 150, 24),
    DeviceSpec("RTX 4090", 165e12, 450, 24),
    DeviceSpec("RTX 3090", 71e12, 350, 24),
    DeviceSpec("V100", 125e12, 300, 32),  # fp16 tensor cores; no bf16
)


def device_spec(device_name: str) -> DeviceSpec | None:
    """The table row whose name occurs in ``device_name`` (case-insensitive), if any."""
    lowered = device_name.lower()
    for spec in DEVICES:
        if spec.name.lower() in lowered:
            return spec
    return None


def resolve_device(
    device: str | torch.device | None = "auto", local_rank: int | None = None
) -> torch.device:
    """The torch device for a ``--device`` value: ``auto`` (or None) is CUDA when it is
    available, else the CPU. A bare ``cuda`` gets index ``local_rank`` when one is given
    (this process's GPU under torchrun). A device this machine lacks is a ValueError that
    names the option value."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device {name}: not a device (expected auto, cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"--device {dev}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return dev


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform``'s description elsewhere), for
    naming the machine beside a measurement."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_peak_flops(device: torch.device, override: float = 0.0) -> float | None:
    """Per-device peak for MFU: ``override`` when set, else the GPU table (None: unknown)."""
    if override > 0:
        return override
    spec = device_spec(device_name(device)) if device.type == "cuda" else None
    return spec.peak_flops if spec else None


def device_watts(device: torch.device, override: float = 0.0) -> float | None:
    """Per-device power for the carbon estimate: ``override``, else the GPU table."""
    if override > 0:
        return override
    spec = device_spec(device_name(device)) if device.type == "cuda" else None
    return spec.watts if spec else None


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max_memory_allocated, else this process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


def device_memory_bytes(device: torch.device) -> int:
    """Memory one device has: a GPU's total memory, else this machine's physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
