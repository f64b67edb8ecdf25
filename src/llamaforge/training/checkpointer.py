"""Training checkpoints: sharded, resumable, on any world size (torch.distributed.checkpoint).

``ROOT/step-NNNNNN/`` holds the DCP shards of the model and the optimizer (every rank
writes its own), ``.metadata`` and ``state.json``: what the caller passes as ``extra``
(step, tokens, the loader's position …) plus every rank's RNG state, the sha256 of every
other file of the checkpoint and a sha256 of state.json's own content. A checkpoint is
written into a hidden ``.step-NNNNNN.tmp`` directory that rank 0 renames once every rank
has finished, so a ``step-N`` directory is always complete; the newest ``keep`` survive.
Resuming checks those hashes (the ranks share the hashing) and skips a damaged newest
checkpoint with a warning; a checkpoint written before the hashes were recorded is
checked for missing and truncated files only.

The checkpointer takes plain values (a directory, a step, a model and an optimizer, a
dict) and raises its own ``CheckpointerError``; it imports nothing above ``distributed``.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from llamaforge.files import NoSpaceError, is_no_space, read_json_object, sha256_file

CKPT_RE = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"
FILE_HASHES = "sha256"  # state.json: file name -> sha256, for every other file
STATE_HASH = "state_sha256"  # state.json: the sha256 of its other keys (`_state_digest`)


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


def _state_digest(state: dict[str, Any]) -> str:
    """sha256 of state.json's content but its own hash (canonical JSON: sorted keys)."""
    body = {k: v for k, v in state.items() if k != STATE_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _hashed_files(path: Path) -> list[str]:
    """The files of checkpoint ``path`` whose sha256 state.json records: all but itself."""
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.name != STATE_FILE)


def hash_files(path: Path, names: list[str], info: D.DistInfo | None = None) -> dict[str, str]:
    """File name -> sha256 of ``names`` in ``path``; with ``info`` every rank hashes every
    world_size-th file and all get the whole map (a collective: every rank must call it)."""
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    mine = {name: sha256_file(path / name) for name in names[rank::world]}
    if world == 1:
        return mine
    return {k: v for part in D.all_gather_object(mine) for k, v in part.items()}


def _check_hashes(path: Path, state: dict[str, Any], info: D.DistInfo | None) -> None:
    """Compare state.json's recorded hashes (when it has them) with the files' content."""
    state_file = path / STATE_FILE
    if STATE_HASH not in state and FILE_HASHES not in state:
        return  # written before the hashes were recorded: sizes were checked
    if state.get(STATE_HASH) != _state_digest(state):
        raise CheckpointerError(
            f"{state_file}: its content differs from the sha256 it records (damaged)"
        )
    recorded = state.get(FILE_HASHES)
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise CheckpointerError(f"{state_file}: {FILE_HASHES!r} is not a file -> sha256 map")
    missing = sorted(set(recorded) - set(_hashed_files(path)))
    if missing:  # also keeps a hostile name ("../x", a FIFO) from being opened
        raise CheckpointerError(f"{path / missing[0]}: missing (its sha256 is in {state_file})")
    actual = hash_files(path, sorted(recorded), info)
    bad = [name for name in sorted(recorded) if actual[name] != recorded[name]]
    if bad:
        raise CheckpointerError(
            f"{path / bad[0]}: content differs from the sha256 recorded in {state_file} "
            f"(damaged; {len(bad)} file(s) differ)"
        )


def verify_checkpoint(path: str | os.PathLike, info: D.DistInfo | None = None) -> dict[str, Any]:
    """Check that ``path`` is a complete, undamaged checkpoint before trusting it: its
    ``state.json`` parses (a JSON object with ``step``), every file's sha256 is the one
    state.json records (``info``: the ranks share the hashing; then every rank must call
    it), its ``.metadata`` reads, and every file ``.metadata`` names exists with at least
    the bytes it needs. Returns state.json; anything wrong is a CheckpointerError naming
    the file."""
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
    _check_hashes(path, state, info)  # first: a damaged .metadata pickle is never unpickled
    md = _read_dcp_metadata(path)
    need: dict[str, int] = {}
    for stored in (getattr(md, "storage_data", None) or {}).values():
        rel = getattr(stored, "relative_path", None)
        if rel is None:
            continue
        end = int(getattr(stored, "offset", 0)) + int(getattr(stored, "length", 0))
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
        self._verified: dict[Path, dict[str, Any]] = {}  # by latest_good: not hashed twice

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
                self._verified = {path: verify_checkpoint(path, self.info)}
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
        hashes = hash_files(tmp, _hashed_files(tmp), info)  # every rank's share, gathered
        rngs = D.all_gather_object(rng_state())
        if info.is_main:
            state = {**extra, "world_size": info.world_size, "rng": rngs, FILE_HASHES: hashes}
            state[STATE_HASH] = _state_digest(state)
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
        verified = self._verified.pop(path, None)
        meta = verified if verified is not None else verify_checkpoint(path, self.info)
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
