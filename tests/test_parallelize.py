"""Activation checkpointing and per-block compile (llamaforge.parallel.parallelize):
the same gradients as the plain model, and the recomputation each policy promises."""

from __future__ import annotations

import copy
import shutil
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamaforge.model import ModelArgs, build_model
from llamaforge.parallel import DistInfo, apply_activation_checkpointing, parallelize
from llamaforge.training.optim import cross_entropy

ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=64
)


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (3, 48), generator=g), torch.randint(0, 128, (3, 48), generator=g)


def _backward_ops(model: torch.nn.Module) -> tuple[Counter[str], float, list[torch.Tensor]]:
    x, y = _batch()
    loss, n = cross_entropy(model(x), y)
    with OpCounter() as counter:
        (loss / n).backward()
    return counter.ops, loss.item(), [p.grad for p in model.parameters()]


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARGS)


def test_checkpointing_modes_give_the_same_gradients_and_recompute_what_they_say(base):
    results = {}
    for mode in ("none", "full", "selective"):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, mode)
        results[mode] = _backward_ops(model)
    ops_none, loss_none, grads_none = results["none"]
    for mode in ("full", "selective"):
        _, loss, grads = results[mode]
        assert loss == loss_none
        for a, b in zip(grads, grads_none):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    ops_full, ops_sel = results["full"][0], results["selective"][0]
    # no recomputation without checkpointing
    assert ops_none["silu"] == 0 and ops_none["rsqrt"] == 0
    # full: every block's forward runs again, matmuls included (7 linears per block; the
    # recomputation may stop after the last one whose output the backward needs)
    assert ops_full["mm"] >= ops_none["mm"] + 6 * ARGS.n_layers
    assert ops_full["silu"] == ARGS.n_layers
    # selective (the paper's policy): linear and attention outputs are kept, only the
    # element-wise work (norms, SiLU, RoPE products) is recomputed
    assert ops_sel["mm"] == ops_none["mm"]
    assert ops_sel["silu"] == ARGS.n_layers and ops_sel["rsqrt"] == 2 * ARGS.n_layers
    attention = [k for k in ops_full if "scaled_dot_product" in k and "backward" not in k]
    assert attention and all(ops_sel[k] == 0 for k in attention)


def test_checkpointed_state_dict_keeps_meta_names(base):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model = copy.deepcopy(base)
    apply_activation_checkpointing(model, "selective")
    assert list(get_model_state_dict(model)) == list(base.state_dict())


def test_unknown_mode_is_an_error(base):
    with pytest.raises(ValueError, match="activation_checkpointing='partial'"):
        apply_activation_checkpointing(copy.deepcopy(base), "partial")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile on the CPU needs a C compiler",
)
def test_compiled_blocks_match_eager(base):
    model = parallelize(
        copy.deepcopy(base), DistInfo(), activation_checkpointing="selective", compile=True
    )
    _, loss, grads = _backward_ops(model)
    _, loss_ref, grads_ref = _backward_ops(copy.deepcopy(base))
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_device_table_and_the_papers_carbon_formula():
    from llamaforge.device import device_spec
    from llamaforge.training.flops import carbon

    assert device_spec("NVIDIA H100 80GB HBM3").peak_flops == 989.5e12
    assert device_spec("NVIDIA H100 PCIe").watts == 350
    assert device_spec("NVIDIA H200").watts == 700
    assert device_spec("NVIDIA A100-SXM4-80GB").watts == 400  # the paper's GPU
    assert device_spec("Intel Xeon") is None
    # Table 15 (SPEC §1.10): 7B 82,432 GPU-h → ~36 MWh, ~14 t; 65B 1,022,362 → 449, 173
    seven, big = carbon(82_432, 400), carbon(1_022_362, 400)
    assert round(seven["mwh"]) == 36 and round(seven["tco2eq"]) == 14
    assert int(big["mwh"]) == 449 and round(big["tco2eq"]) == 173


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the mode that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self.seen:
                    self.seen.add(key)
                    self.live += n
                    weakref.finalize(st, self._free, key, n)
        self.peak = max(self.peak, self.live)
        return out


def test_activation_memory_estimate_matches_what_a_step_keeps():
    from llamaforge.training.flops import activation_memory

    args = ModelArgs(
        dim=128, n_layers=4, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=128
    )
    torch.manual_seed(0)
    base = build_model(args)
    x = torch.randint(0, 256, (4, 128))
    grads = sum(p.numel() * 4 for p in base.parameters())
    measured = {}
    for mode in ("none", "selective", "manual", "full"):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, mode)
        with LiveBytes() as tracker:
            loss, n = cross_entropy(model(x), x)
            (loss / n).backward()
        measured[mode] = tracker.peak - grads  # what is left besides the gradients
        estimate = activation_memory(args, x.numel(), mode, act_bytes=4)
        assert 0.75 < estimate / measured[mode] < 1.33, (mode, estimate, measured[mode])
    assert measured["none"] > measured["selective"] > measured["full"]
