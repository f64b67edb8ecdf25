"""The training core (llamaforge.training.trainer) driven directly: one train_step against a
hand-written step, non-finite steps skipped on the device, targets counted on the device
when some are masked, and FSDP2 gradient accumulation that keeps gradients sharded."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from llamaforge.config import load_config
from llamaforge.parallel import DistInfo
from llamaforge.training.optim import cross_entropy
from llamaforge.training.trainer import TrainConfig, Trainer, model_args

from .conftest import REPO, json_objects

SEQ, VOCAB = 16, 64


class ListLoader:
    """Fixed batches, for a trainer that needs no data directory."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.i = batches, 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]


def batch(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def trainer(tmp_path, *overrides: str, **kwargs: Any) -> Trainer:
    cfg = load_config(
        TrainConfig,
        None,
        [
            "model.dim=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.multiple_of=16",
            f"batch_tokens={4 * SEQ}",  # 4 rows per step: 2 micro-batches of 2
            "micro_batch=2",
            "optim.lr=1e-2",
            "optim.warmup_steps=0",
            "device=cpu",
            f"out={tmp_path}",
            *overrides,
        ],
    )
    t = Trainer(
        cfg,
        DistInfo(),
        args=model_args(cfg, VOCAB, SEQ),
        seq_len=SEQ,
        loader=ListLoader([batch(4)]),
        **kwargs,
    )
    return t.build()


def test_train_step_is_the_hand_written_step(tmp_path):
    t = trainer(tmp_path)
    ref = copy.deepcopy(t.model)
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in ref.parameters() if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in ref.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    x, y = batch(4)
    r = t.train_step(x, y, lr=1e-2)
    # by hand: Σ token losses over both micro-batches / all targets, clip at 1.0, AdamW
    total = torch.zeros(())
    for xm, ym in zip(x.split(2), y.split(2)):
        loss, _ = cross_entropy(ref(xm), ym)
        (loss / y.numel()).backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    assert float(r.loss) == pytest.approx(float(total) / y.numel(), rel=1e-6)
    assert float(r.grad_norm) == pytest.approx(float(norm), rel=1e-6)
    assert bool(r.finite) and float(r.stop) == 0
    for (name, p), q in zip(t.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["host-check", "fused-found_inf"])
def test_a_non_finite_step_changes_nothing(tmp_path, fused):
    def nan_loss(logits, targets):
        loss, n = cross_entropy(logits, targets)
        return loss * float("nan"), n

    t = trainer(tmp_path, loss_fn=nan_loss)
    if fused:  # the GPU path: the update is skipped on the device through found_inf
        t.optimizer = torch.optim.AdamW(t.model.parameters(), lr=1e-2, fused=True)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    r = t.train_step(*batch(4))
    assert not bool(r.finite)
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    steps = [float(s["step"]) for s in t.optimizer.state.values() if "step" in s]
    assert all(s == 0 for s in steps)  # found_inf also undoes the step count
    assert all(p.grad is None for p in t.model.parameters())
    # and a finite step afterwards does update
    t.loss_fn = cross_entropy
    assert bool(t.train_step(*batch(4)).finite)
    assert any(not torch.equal(v, before[k]) for k, v in t.model.state_dict().items())


def test_masked_targets_are_counted_on_the_device(tmp_path):
    x, y = batch(4)
    y = y.clone()
    y[:, : SEQ // 2] = -100  # a prompt that is not trained on
    t = trainer(tmp_path, all_targets_count=False)
    ref = copy.deepcopy(t.model)
    r = t.train_step(x, y, lr=0.0)
    loss, n = cross_entropy(ref(x), y)
    assert int(n) == 4 * SEQ // 2
    assert float(r.loss) == pytest.approx(float(loss.detach() / n), rel=1e-6)


@pytest.mark.slow
def test_fsdp2_accumulation_keeps_gradients_sharded():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    port = str(29500 + (os.getpid() + 7) % 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", port, str(REPO / "tests" / "scripts" / "fsdp_grad_memory.py")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json_objects(proc.stdout)
    assert len(rows) == 2
    for r in rows:
        shard = r["full_fp32_grad_bytes"] / r["world_size"]
        # between micro-batches a rank holds its shard of the gradient, nothing more …
        assert r["held_bytes"] <= shard * 1.01 + 4096, r
        # … where FSDP2 without gradient sync holds the whole model's gradient
        assert r["held_bytes_without_sync"] >= r["full_fp32_grad_bytes"], r
        assert r["embedding_is_own_unit"]


def test_init_starts_from_a_native_checkpoint_and_hooks_run(tmp_path, small_tokenizer):
    from llamaforge.checkpoint.native import save
    from llamaforge.model import build_model

    torch.manual_seed(1)
    t0 = trainer(tmp_path / "a")
    base = build_model(t0.args)
    save(base, small_tokenizer, tmp_path / "base")
    seen: list[str] = []
    t = trainer(
        tmp_path / "b",
        f"init={tmp_path / 'base'}",
        prepare_model=lambda m: seen.append(str(next(m.parameters()).device)),
        after_init=lambda m: seen.append("after"),
    )
    assert seen == ["meta", "after"]
    for (name, p), q in zip(t.model.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name
    # the model comes from the checkpoint: a conflicting model.* setting is an error
    from llamaforge.config import ConfigError

    with pytest.raises(ConfigError, match="model.dim=48.*init="):
        trainer(tmp_path / "c", f"init={tmp_path / 'base'}", "model.dim=48")


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    from llamaforge.files import NoSpaceError

    t = trainer(tmp_path)
    t.train_step(*batch(4))
    t.step = 1
    first = t.save()
    real_save = dcp.save

    def full_disk(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # files written, then the device fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full_disk)
    t.step = 2
    with pytest.raises(NoSpaceError, match="no space left on device.*step-000002"):
        t.save()
    root = first.parent
    assert [p.name for p in root.iterdir()] == ["step-000001"]  # no partial step-2 left
    assert t.checkpointer.latest() == first


def test_throughput_and_mfu_count_the_loaders_real_tokens(tmp_path):
    """A loader with padding says how many of a batch's positions are real (real_tokens):
    tokens, tokens_per_s and mfu count those; padded_tokens_per_s every position."""
    import json

    class PaddedLoader(ListLoader):
        real_tokens = 40  # of the 4 × 16 = 64 positions of each batch

    cfg = load_config(
        TrainConfig,
        None,
        ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.multiple_of=16",
         f"batch_tokens={4 * SEQ}", "micro_batch=2", "steps=3", "device=cpu",
         "progress=false", "tensorboard=false", "peak_flops=1e12", f"out={tmp_path}"],
    )  # fmt: skip
    t = Trainer(
        cfg,
        DistInfo(),
        args=model_args(cfg, VOCAB, SEQ),
        seq_len=SEQ,
        loader=PaddedLoader([batch(4)]),
        all_targets_count=False,
    ).build()
    r = t.train_step(*batch(4), tokens=40)
    assert (float(r.tokens), float(r.positions)) == (40.0, 64.0)
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [40, 80, 120]
    for row in rows:
        assert row["padded_tokens_per_s"] == pytest.approx(row["tokens_per_s"] * 64 / 40)
        assert row["mfu"] == pytest.approx(t.flops_per_token * row["tokens_per_s"] / 1e12)
