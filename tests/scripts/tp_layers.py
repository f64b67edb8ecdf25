"""Run under torchrun (2 processes, Gloo): a tiny GQA model split with tensor + sequence
parallelism against the same model whole, in one process's view. Prints one JSON line per
rank: the heads each rank computes, the logits' layout (split over the vocabulary), the
largest differences in logits, loss and gradients, and the collectives the
vocabulary-parallel loss ran (no all-gather: the full logits never exist)."""

from __future__ import annotations

import json

import torch
from torch.distributed.tensor import Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from llamaforge import parallel as D
from llamaforge.model import ModelArgs, build_model
from llamaforge.training.optim import cross_entropy

info = D.init("cpu")
args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16)
whole = build_model(args, init=False)
D.init_params(whole, seed=3)
split = build_model(args, device="meta", init=False)
split = D.parallelize(split, info, layout=D.make_layout(info.world_size, tp=2))
split = split.to_empty(device="cpu")
D.init_params(split, seed=3)

g = torch.Generator().manual_seed(0)
x = torch.randint(0, 96, (2, 16), generator=g)
y = torch.randint(0, 96, (2, 16), generator=g)
ref = whole(x)
ref_loss, _ = cross_entropy(ref, y)
ref_loss.backward()

logits = split(x)
with loss_parallel():
    with CommDebugMode() as comm:  # the loss alone: logits (split) in, a scalar out
        loss, _ = cross_entropy(logits, y)
    loss.backward()
counts = {str(k): v for k, v in comm.get_comm_counts().items()}
local = logits.detach().to_local()
rank = logits.device_mesh.get_local_rank()
part = ref.detach().chunk(2, dim=-1)[rank]
wq = split.layers[0].attention.wq.weight
wq_ref = whole.layers[0].attention.wq.weight.grad.chunk(2, dim=0)[rank]
norm = split.layers[1].ffn_norm.weight
attn = split.layers[0].attention
print(
    json.dumps(
        {
            "rank": info.rank,
            "local_heads": [attn.n_heads, attn.n_kv_heads],
            "logits_sharded_on_vocab": logits.placements == (Shard(2),)
            or logits.placements == (Shard(-1),),
            "local_logits_shape": list(local.shape),
            "logits_diff": float((local - part).abs().max()),
            "loss_diff": abs(loss.detach().full_tensor().item() - ref_loss.item()),
            "wq_grad_diff": float((wq.grad.to_local() - wq_ref).abs().max()),
            "norm_grad_diff": float(
                (norm.grad.full_tensor() - whole.layers[1].ffn_norm.weight.grad).abs().max()
            ),
            "loss_collectives": counts,
        }
    ),
    flush=True,
)
D.cleanup()
