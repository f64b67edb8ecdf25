"""Run under torchrun (2 processes, Gloo): the gradient memory a rank holds between two
micro-batches of one step under FSDP2, counted as the bytes of every tensor created during
micro-batch 1 that is still alive after its backward pass. Prints one JSON line per rank:
llamaforge's accumulation (reduce-scatter every micro-batch) and, as the control that shows
the count sees the problem, FSDP2 with gradient sync turned off (an unsharded fp32 gradient
of the whole model kept until the last micro-batch)."""

from __future__ import annotations

import gc
import json
import weakref

import torch
from torch.distributed.fsdp import FSDPModule
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llamaforge import parallel as D
from llamaforge.model import ModelArgs, build_model
from llamaforge.training.optim import cross_entropy


class LiveBytes(TorchDispatchMode):
    """Remembers every tensor an op creates; ``bytes()`` sums the storages still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def bytes(self) -> int:
        gc.collect()
        storages = {}
        for ref in self.refs:
            t = ref()
            if t is not None:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())


def held_after_first_micro_batch(info: D.DistInfo, sync: bool) -> tuple[int, int, bool]:
    args = ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=512, multiple_of=32)
    model = build_model(args, device="meta", init=False)
    n_params = model.num_params()
    model = D.parallelize(model, info, parallel="fsdp")
    model = model.to_empty(device=info.device)
    D.init_params(model, 0)
    if not sync:
        model.set_requires_gradient_sync(False)
    g = torch.Generator().manual_seed(info.rank)
    x, y = (torch.randint(0, 512, (2, 32), generator=g) for _ in range(2))
    live = LiveBytes()
    with live:
        with D.grad_sync(model, False):  # micro-batch 1 of 2: not the last
            loss, _ = cross_entropy(model(x), y)
            loss.backward()
        del loss
    return live.bytes(), 4 * n_params, isinstance(model.tok_embeddings, FSDPModule)


if __name__ == "__main__":
    info = D.init("cpu")
    held, full, emb_unit = held_after_first_micro_batch(info, sync=True)
    held_nosync, _, _ = held_after_first_micro_batch(info, sync=False)
    print(
        json.dumps(
            {
                "rank": info.rank,
                "world_size": info.world_size,
                "full_fp32_grad_bytes": full,
                "held_bytes": held,
                "held_bytes_without_sync": held_nosync,
                "embedding_is_own_unit": emb_unit,
            }
        ),
        flush=True,
    )
    D.cleanup()
