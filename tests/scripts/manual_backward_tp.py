"""Run under torchrun (2 processes, Gloo): activation_checkpointing="manual" on a model whose
blocks are tensor-parallel (torch's ColwiseParallel for wq/wk/wv/w1/w3, RowwiseParallel for
wo/w2: each rank holds half the heads, half the kv heads and half the hidden units) against
the same model unsharded with plain autograd; and the norms split over the sequence too
(sequence parallelism), which must be refused. Prints one JSON line per rank: the largest
loss and gradient differences, and the refusal's message."""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from llamaforge.distributed import apply_activation_checkpointing
from llamaforge.model import build_model
from llamaforge.optim import cross_entropy
from llamaforge.presets import get_preset


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    args = get_preset("1M", n_kv_heads=2)
    torch.manual_seed(0)
    ref = build_model(args)
    tp = copy.deepcopy(ref)
    plan = {name: ColwiseParallel() for name in ("attention.wq", "attention.wk", "attention.wv")}
    plan |= {"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel()}
    plan |= {"attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()}
    for block in tp.layers:
        parallelize_module(block, mesh, plan)
    apply_activation_checkpointing(tp, "manual")
    tokens = torch.randint(0, args.vocab_size, (2, 49), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for model in (ref, tp):
        loss, n = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        (loss / n).backward()
        losses.append(loss.item())
        grads.append(
            {
                k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                for k, p in model.named_parameters()
            }
        )
    # sequence parallelism (the norms split over the sequence): refused, not miscomputed
    sp = copy.deepcopy(ref)
    sp_plan = plan | {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}
    for block in sp.layers:
        parallelize_module(block, mesh, sp_plan)
    try:
        apply_activation_checkpointing(sp, "manual")  # refused here, before any forward
        sp(tokens[:, :-1])
        sp_refused = ""
    except NotImplementedError as e:
        sp_refused = str(e)
    sharded = [k for k, p in tp.named_parameters() if type(p).__name__ == "DTensor"]
    diff = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0])
    row = {"rank": int(os.environ["RANK"]), "loss_diff": abs(losses[0] - losses[1])}
    row |= {"grad_diff": diff, "sharded": len(sharded), "n_grads": len(grads[1])}
    row |= {"sp_refused": sp_refused}
    print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
