"""CPU threads for torch: as many intra-op threads as cores this process may run on, and
OpenMP threads that sleep rather than spin when they wait.

torch's default is one intra-op thread per physical core of the machine, whatever the
process's CPU affinity (a container's or ``taskset``'s cores) and however many processes
torchrun starts; OpenMP's default wait policy keeps idle workers spinning. When the cores
are oversubscribed, spinning workers take the CPU from the ones with work to do.

`configure_threads` (called by ``llamaforge`` before any command imports torch) sets:

- ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it;
- the intra-op thread count: ``LLAMAFORGE_THREADS`` if set; else ``OMP_NUM_THREADS`` if the
  user set it (not under torchrun, which sets it to 1 on its own); else the cores in this
  process's affinity mask divided by the processes on this node (torchrun's
  ``LOCAL_WORLD_SIZE``), at least 1.

OpenMP reads both variables when torch initialises it, so they are set in the environment
before torch is imported; if torch is already imported, ``torch.set_num_threads`` is called.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

THREADS_ENV = "LLAMAFORGE_THREADS"


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def choose_threads(env: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """The intra-op thread count for this process (see the module's docstring)."""
    env = os.environ if env is None else env
    explicit = env.get(THREADS_ENV, "").strip()
    if explicit:
        try:
            n = int(explicit)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{THREADS_ENV}={explicit!r}: expected a positive integer")
        return n
    under_torchrun = "LOCAL_WORLD_SIZE" in env or "TORCHELASTIC_RUN_ID" in env
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0 and not under_torchrun:
        return int(omp)
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, (available_cores() if cores is None else cores) // local)


def configure_threads() -> int:
    """Set the wait policy and the thread count for this process; returns the count."""
    n = choose_threads()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:  # already initialised: the environment is read no more
        torch.set_num_threads(n)
    return n
