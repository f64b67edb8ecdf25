"""Training checkpoints: sharded, resumable, on any world size (torch.distributed.checkpoint).

``ROOT/step-NNNNNN/`` holds the DCP shards of the model and the optimizer (every rank
writes its own), ``.metadata`` and ``state.json``: what the caller passes as ``extra``
(step, tokens, the loader's position …) plus every rank's RNG state. A checkpoint is
written into a hidden ``.step-NNNNNN.tmp`` directory that rank 0 renames once every rank
has finished, so a ``step-N`` directory is always complete; the newest ``keep`` survive.

The checkpointer takes plain values (a directory, a step, a model and an optimizer, a
dict) and raises its own ``CheckpointerError``; it imports nothing above ``distributed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llamaforge import parallel as D
from llamaforge.files import NoSpaceError, is_no_space, read_json_object

CKPT_RE = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"


class CheckpointerError(RuntimeError):
    """A training checkpoint cannot be written or read; the message says which and why."""

    exit_code = 1


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """dcp.save/load without a process group warn that they assume one process: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (renamed into place, with their state.json and
    DCP metadata), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file() and (p / ".metadata").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _read_dcp_metadata(path: Path) -> Any:
    """The DCP ``Metadata`` of checkpoint ``path``; an unreadable ``.metadata`` is a
    CheckpointerError naming it."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or foreign pickle: EOFError, UnpicklingError, ...
        raise CheckpointerError(
            f"{path / '.metadata'}: unreadable ({type(e).__name__}: {e})"
        ) from None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that ``path`` is a complete, undamaged checkpoint before trusting it: its
    ``state.json`` parses (a JSON object with ``step``), its ``.metadata`` reads, and every
    file ``.metadata`` names exists with at least the bytes it needs. Returns state.json;
    anything wrong is a CheckpointerError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointerError(f"{path}: no such checkpoint directory")
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointerError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    if not (path / ".metadata").is_file():
        raise CheckpointerError(f"{path}: not a complete checkpoint (no .metadata)")
    state = read_json_object(state_file, CheckpointerError)
    for key in ("step", "rng"):
        if key not in state:
            raise CheckpointerError(f"{state_file}: no {key!r} (not a training checkpoint's)")
    md = _read_dcp_metadata(path)
    need: dict[str, int] = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        need[rel] = max(need.get(rel, 0), end)
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointerError(f"{f}: missing (named by {path / '.metadata'})")
        have = f.stat().st_size
        if have < size:
            raise CheckpointerError(
                f"{f}: truncated ({have} bytes, {path / '.metadata'} needs at least {size})"
            )
    return state


def check_shapes(path: Path, md: Any, state: dict[str, Any], prefix: str = "model") -> None:
    """Raise a CheckpointerError naming the first tensor of ``state[prefix]`` whose shape
    differs from the checkpoint's (a checkpoint of another model size), before DCP's
    ``Size mismatch`` traceback; tensors the checkpoint lacks are left to DCP."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = md.state_dict_metadata
    for name, value in state[prefix].items():
        if not isinstance(value, torch.Tensor):
            continue
        entry = saved.get(f"{prefix}.{name}")
        if isinstance(entry, TensorStorageMetadata) and tuple(entry.size) != tuple(value.shape):
            raise CheckpointerError(
                f"{path}: {name} has shape {tuple(entry.size)} in the checkpoint but "
                f"{tuple(value.shape)} in this model (a checkpoint of another model size?)"
            )


def rng_state() -> dict[str, Any]:
    """This process's torch (and CUDA) generator states, JSON-serialisable."""
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    local = getattr(t, "to_local", None)
    return local() if local is not None else t


class Checkpointer:
    """Saves and loads the training state of one run under ``root``."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep: int = 0,
        info: D.DistInfo,
        keys: set[str] | None = None,
    ) -> None:
        """``keys``: save and load only these model tensors (the trainable ones, when most
        of the model is frozen — LoRA's base is read from its own checkpoint instead)."""
        self.root = Path(root)
        self.keep = keep
        self.info = info
        self.keys = keys

    def _model_state(self, model_sd: dict[str, Any]) -> dict[str, Any]:
        return model_sd if self.keys is None else {k: model_sd[k] for k in sorted(self.keys)}

    def list(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.root)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1][1] if found else None

    def latest_good(self) -> Path | None:
        """The newest checkpoint that passes `verify_checkpoint`; each newer damaged one is
        skipped with a warning naming it and what is wrong; None when there are none, a
        CheckpointerError when every one is damaged (starting over is then a choice)."""
        found = self.list()
        for _, path in reversed(found):
            try:
                verify_checkpoint(path)
            except CheckpointerError as e:
                if self.info.is_main:
                    print(f"warning: skipping damaged checkpoint {path}: {e}", file=sys.stderr)
                continue
            return path
        if found:
            raise CheckpointerError(
                f"{self.root}: every checkpoint is damaged (newest {found[-1][1].name}); "
                "repair or remove them, or pass resume=none to start over"
            )
        return None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
    ) -> Path:
        """Write ``root/step-NNNNNN`` (model, optimizer, ``extra`` and every rank's RNG)
        atomically, then prune to the newest ``keep``. Non-finite weights are refused: the
        previous checkpoints stay as they were."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        info = self.info
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".step-{step:06d}.tmp"
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        D.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        model_sd = self._model_state(model_sd)
        bad = [k for k, v in model_sd.items() if not torch.isfinite(_local(v)).all()]
        if D.all_reduce_max(torch.tensor([len(bad)], device=info.device))[0] > 0:
            D.barrier()
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointerError(
                f"step {step}: non-finite values in {bad[:3] or 'the weights'}: checkpoint "
                f"{final} not written (the previous ones are kept)"
            )
        try:
            with _quiet_single_process():
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_no_space(e, self.root):  # the previous checkpoints are kept
                raise NoSpaceError(final) from e
            raise
        rngs = D.all_gather_object(rng_state())
        if info.is_main:
            state = {**extra, "world_size": info.world_size, "rng": rngs}
            with open(tmp / STATE_FILE, "w") as f:
                f.write(json.dumps(state) + "\n")
                f.flush()
                os.fsync(f.fileno())
        D.barrier()
        if info.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.prune()
        D.barrier()
        return final

    def prune(self) -> None:
        """Remove all but the newest ``keep`` complete checkpoints (``keep`` 0: keep all)."""
        if self.keep > 0 and self.info.is_main:
            for _, old in self.list()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load(
        self, path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """Load the model and optimizer shards (resharded to this world size), restore this
        rank's RNG, and return the checkpoint's ``extra`` (its state.json)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_state_dict,
        )

        path = Path(path)
        meta = verify_checkpoint(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": self._model_state(model_sd), "optim": optim_sd}
        check_shapes(path, _read_dcp_metadata(path), state)
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=self.keys is None),
        )
        rngs = meta["rng"] if isinstance(meta["rng"], list) else [meta["rng"]]
        # each rank gets its own generator state back; on another world size, rank 0's
        info = self.info
        set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        return meta

    def load_latest(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[Path, dict[str, Any]] | None:
        """Resume from the newest good checkpoint (damaged newer ones skipped), if any."""
        path = self.latest_good()
        return None if path is None else (path, self.load(path, model, optimizer))
