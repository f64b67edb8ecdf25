"""``llamaforge serve --tp N``: one engine over a model split across N torchrun processes.

The model is split as ``generate --tp`` splits it (`parallel.load_tensor_parallel`: each
rank computes its own heads and its slice of the FFN, and every rank gets the whole
logits). Rank 0 runs the HTTP server and the engine's scheduler. The forward needs every
rank (the DTensor collectives inside each split layer), so rank 0's runner is a
`BroadcastRunner`: each call (the runner method's name and its arguments: the rows' tokens,
starts and block tables) is first sent to the other ranks, then run on rank 0's own
`ModelRunner`. The other ranks run `serve_worker`: they receive each call and run it on a
runner of their own, over a `PagedKVCache` of the same blocks that holds only their kv
heads (`kv_args`), and drop the logits (rank 0's are the same). Rank 0's block tables are
the only accounting: every rank's pool holds the same blocks, written by the same calls.

The calls travel over a Gloo group of their own (`control_group`, on the CPU beside NCCL
on GPUs): `broadcast_object_list` pickles each call and broadcasts its length then its
bytes. A call costs two small broadcasts and a pickle of lists of ints (tensors travel as
lists: pickling a tensor costs hundreds of microseconds), a few kB for a decode step of 32
rows with 16-block tables, and no device synchronisation beyond copying a decode step's
tokens to the host: 0.7 to 1.8 ms per call measured on a 2-core CPU machine under heavy
load (the processes mostly waiting for a core). While the engine is idle, rank 0 sends a
ping every ``heartbeat`` seconds, so that workers waiting for the next call never reach
the group's timeout. `BroadcastRunner.close` sends the message that ends the workers'
loop; a rank 0 that dies closes its sockets, which ends the workers' loop too (and torchrun
stops every rank when one exits with an error).

A forward that raises may leave the ranks out of step (one waiting in a collective that
another never joins): a worker then exits with the error (torchrun ends every rank), and
rank 0's runner refuses every later call, so that requests fail instead of hanging. The
draft model of speculative decoding is not split: it runs on rank 0 alone, beside the
broadcast runner.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from llamaforge.model import ModelArgs, Transformer
from llamaforge.serve.kv_cache import PagedKVCache
from llamaforge.serve.runner import ModelRunner

__all__ = ["BroadcastRunner", "control_group", "kv_args", "serve_worker"]

# the messages that are not runner calls
_CACHE, _PING, _STOP = "cache", "ping", "stop"


def kv_args(model: Transformer) -> ModelArgs:
    """``model.args`` with the head counts its attention modules compute: a tensor-parallel
    rank's own (n_heads / tp and n_kv_heads / tp, the width that many heads make), which is
    what its KV cache holds; ``model.args`` itself for a model that is not split."""
    attn = model.layers[0].attention  # type: ignore[union-attr]
    args = model.args
    if (attn.n_heads, attn.n_kv_heads) == (args.n_heads, args.kv_heads):
        return args
    return dataclasses.replace(
        args,
        dim=attn.n_heads * attn.head_dim,
        n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads,
    )


def control_group() -> Any:
    """A Gloo group over every rank for the runner's calls (every rank must call this, in
    the same order as its other group creations)."""
    return dist.new_group(backend="gloo")


class _Tensor(NamedTuple):
    """A tensor as a call carries it: its values as nested lists (pickling a list of ids
    costs microseconds, pickling a tensor hundreds)."""

    values: Any
    dtype: torch.dtype


def _pack(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A call's arguments with each tensor among them as a `_Tensor` (the runner's calls
    take tensors as arguments, never inside lists, which are sent as they are)."""
    return tuple(_Tensor(a.tolist(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


def _unpack(args: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    """`_pack`'s arguments with their tensors made again, on ``device``."""
    return tuple(
        torch.tensor(a.values, dtype=a.dtype, device=device) if isinstance(a, _Tensor) else a
        for a in args
    )


def _send(message: tuple[str, tuple[Any, ...]], group: Any) -> None:
    dist.broadcast_object_list([message], src=0, group=group)


def _receive(group: Any) -> tuple[str, tuple[Any, ...]]:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _no_adapters(adapters: list[int] | None) -> None:
    if adapters is not None and any(a >= 0 for a in adapters):
        raise ValueError("LoRA adapters are not served with --tp (the workers hold none)")


class BroadcastRunner:
    """Rank 0's runner under ``--tp``: every call goes to the workers (`serve_worker`) over
    ``group``, then runs on ``runner``. Other public methods of the runner are broadcast
    the same way. A call that raises breaks the runner: every later call raises."""

    def __init__(self, runner: ModelRunner, group: Any, heartbeat: float = 30.0) -> None:
        self.runner, self.group, self.heartbeat = runner, group, heartbeat
        self.cache, self.model, self.device = runner.cache, runner.model, runner.device
        self._lock = threading.Lock()
        self._sent = time.monotonic()
        self._broken: str | None = None
        self._closed = threading.Event()
        c = runner.cache
        self._message(_CACHE, (c.num_blocks, c.block_size, c.k.dtype))
        threading.Thread(target=self._pings, name="llamaforge-tp-ping", daemon=True).start()

    def prefill(
        self,
        chunks: list[list[int]],
        starts: list[int],
        tables: list[list[int]],
        keep_all: list[bool] | None = None,
        logits: bool = True,
        adapters: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """`ModelRunner.prefill` on every rank; rank 0's logits (no LoRA adapters: the
        command refuses ``--lora`` with ``--tp``)."""
        _no_adapters(adapters)
        return self._call("prefill", chunks, starts, tables, keep_all, logits)

    def decode(
        self,
        tokens: torch.Tensor,
        starts: list[int],
        tables: list[list[int]],
        adapters: list[int] | None = None,
    ) -> torch.Tensor:
        """`ModelRunner.decode` on every rank; rank 0's logits."""
        _no_adapters(adapters)
        return self._call("decode", tokens, starts, tables)

    def __getattr__(self, name: str) -> Any:
        if name == "runner":  # not set yet
            raise AttributeError(name)
        attr = getattr(self.runner, name)
        if name.startswith("_") or not callable(attr):
            return attr
        return functools.partial(self._call, name)

    def close(self, timeout: float = 10.0) -> None:
        """End the workers' loop (once; nothing is sent after a failed call, or when a call
        still runs after ``timeout`` seconds)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if not self._lock.acquire(timeout=timeout):
            return
        try:
            if self._broken is None:
                self._message(_STOP, ())
        except Exception:  # a worker gone already: nothing to stop
            pass
        finally:
            self._broken = self._broken or "tensor-parallel serving has stopped"
            self._lock.release()

    def _call(self, name: str, *args: Any) -> Any:
        with self._lock:
            if self._broken is not None:
                raise RuntimeError(self._broken)
            try:
                self._message(name, _pack(args))
                return getattr(self.runner, name)(*args)
            except Exception as e:
                self._broken = (
                    f"tensor-parallel serving stopped after a failed forward ({type(e).__name__}: "
                    f"{e}): the ranks may be out of step; restart the server"
                )
                raise

    def _message(self, name: str, args: tuple[Any, ...]) -> None:
        _send((name, args), self.group)
        self._sent = time.monotonic()

    def _pings(self) -> None:
        """While the engine is idle, a ping every ``heartbeat`` seconds (never during a
        call: the lock is then held and the ping skipped)."""
        while not self._closed.wait(self.heartbeat / 4):
            if time.monotonic() - self._sent < self.heartbeat:
                continue
            if not self._lock.acquire(blocking=False):
                continue
            try:
                if self._broken is None and not self._closed.is_set():
                    self._message(_PING, ())
            except Exception as e:
                self._broken = f"tensor-parallel serving stopped: a worker is gone ({e})"
            finally:
                self._lock.release()


def serve_worker(model: Transformer, group: Any) -> int:
    """A worker rank's loop: run every call rank 0's `BroadcastRunner` sends on this rank's
    share of ``model``, over a KV pool of its own heads, until rank 0 stops it (0) or goes
    away (1). A call that raises ends the loop with the exception."""
    device = model.tok_embeddings.weight.device
    runner: ModelRunner | None = None
    with torch.inference_mode():
        while True:
            try:
                name, args = _receive(group)
            except Exception:  # rank 0's sockets are closed: it has ended
                return 1
            if name == _STOP:
                return 0
            if name == _PING:
                continue
            if name == _CACHE:
                num_blocks, block_size, dtype = args
                cache = PagedKVCache(kv_args(model), num_blocks, block_size, dtype, device)
                runner = ModelRunner(model, cache)
                continue
            if runner is None:
                raise RuntimeError(f"tensor-parallel worker: {name!r} before the KV cache")
            getattr(runner, name)(*_unpack(args, device))
