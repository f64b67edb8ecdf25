"""Loading a checkpoint converted as it is read (issue 22): ``--quantize`` makes each linear
layer int8 as soon as its weight is in and ``--dtype`` casts each tensor as it is read. The
result equals converting after loading; the memory is the converted model plus about one
tensor, measured in a process of its own on a 110M-parameter checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamaforge.checkpoint.native import (
    CheckpointError,
    expected_shapes,
    load,
    save,
    save_state,
    weight_files,
)
from llamaforge.cli.loading import load_checkpoint, load_draft, quantize
from llamaforge.inference.quantize import Int8Linear, is_quantized, quantize_int8
from llamaforge.model import ModelArgs

from .conftest import REPO, tiny_model


def _namespace(ckpt: Path, **overrides) -> argparse.Namespace:
    """The arguments `load_checkpoint` and `load_draft` read, as the commands parse them."""
    fields = dict(ckpt=str(ckpt), tokenizer=None, device="cpu", dtype=None, strict=False)
    fields.update(force=False, quantize=None, draft=None)
    return argparse.Namespace(**{**fields, **overrides})


def _assert_same(new: torch.nn.Module, old: torch.nn.Module, vocab_size: int) -> None:
    """The same modules, the same tensors (dtype and values), the same logits."""
    assert [type(m) for m in new.modules()] == [type(m) for m in old.modules()]
    flags = [(m.cpu_bf16_compute, o.cpu_bf16_compute) for m, o in zip(new.modules(), old.modules())
             if isinstance(m, Int8Linear)]  # fmt: skip
    assert flags and all(a == b for a, b in flags)
    ours, theirs = new.state_dict(), old.state_dict()
    assert list(ours) == list(theirs)
    for name, t in ours.items():
        assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name
    tokens = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(new(tokens), old(tokens))


@pytest.mark.parametrize(
    ("stored", "dtype", "kind"),
    [("float32", None, "int8"), ("float32", "bfloat16", "int8"), ("bfloat16", None, "int8-bf16")],
)
def test_quantised_as_read_equals_quantised_after_loading(
    tmp_path, small_tokenizer, stored, dtype, kind
):
    model = tiny_model(small_tokenizer.vocab_size, norm_gains=True, output_scale=25)
    ckpt = save(model, small_tokenizer, tmp_path / "ckpt", dtype=stored)
    old, _ = load(ckpt, dtype=dtype)
    quantize_int8(old, cpu_bf16_compute=kind == "int8-bf16")
    new, _ = load(ckpt, dtype=dtype, quantize=kind)
    assert is_quantized(new) and not any(p.is_meta for p in new.state_dict().values())
    _assert_same(new, old, small_tokenizer.vocab_size)


def test_commands_get_the_model_and_its_draft_int8_from_loading(tmp_path, small_tokenizer):
    """`load_checkpoint` and `load_draft` convert as they read; the commands' `quantize`
    afterwards leaves them as they are (and still converts a model loaded whole)."""
    ckpt = save(tiny_model(small_tokenizer.vocab_size), small_tokenizer, tmp_path / "m")
    draft_dir = save(tiny_model(small_tokenizer.vocab_size, seed=1, n_layers=1), small_tokenizer,
                     tmp_path / "d")  # fmt: skip
    a = _namespace(ckpt, dtype="bfloat16", quantize="int8", draft=str(draft_dir))
    loaded = load_checkpoint(a)
    draft = load_draft(a, loaded)
    assert is_quantized(loaded.model) and is_quantized(draft)
    assert draft.tok_embeddings.weight.dtype == torch.bfloat16
    whole, _ = load(ckpt, dtype="bfloat16")
    quantize("int8", loaded.model, draft, whole)
    assert is_quantized(whole)
    _assert_same(loaded.model, whole, small_tokenizer.vocab_size)


def test_an_unknown_quantisation_is_refused_before_reading(save_tiny):
    with pytest.raises(ValueError, match=r"quantize='int4': expected one of int8, int8-bf16"):
        load(save_tiny(), quantize="int4")


def test_non_finite_weights_are_found_before_they_are_quantised(save_tiny, capsys):
    from safetensors.torch import load_file, save_file

    ckpt = save_tiny()
    (f,) = ckpt.glob("*.safetensors")
    tensors = load_file(f)
    tensors["layers.1.feed_forward.w2.weight"][3, 4] = float("inf")
    save_file(tensors, f, metadata={"format": "pt"})
    load(ckpt, quantize="int8")
    assert "1 tensor(s) with NaN or Inf values: layers.1.feed_forward.w2.weight" in (
        capsys.readouterr().err
    )
    with pytest.raises(CheckpointError, match="w2.weight.*refused: strict"):
        load(ckpt, quantize="int8", strict=True)


# -- memory ----------------------------------------------------------------------------------

# 8 layers of dim 1024 (SwiGLU 2816) and a 4096-token vocabulary: 111M parameters, 95% of
# them in linear layers, so int8 is about a quarter of the fp32 checkpoint
BIG = ModelArgs(dim=1024, n_layers=8, n_heads=16, vocab_size=4096, multiple_of=256)

# a command's loading, in a process of its own: its peak RSS less its RSS before loading
LOAD = """
import argparse, json, sys
import torch
from llamaforge.checkpoint.native import expected_shapes, read_params
from llamaforge.cli.loading import load_checkpoint, quantize

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

ckpt, dtype, kind = sys.argv[1], sys.argv[2] or None, sys.argv[3] or None
expected_shapes(read_params(ckpt)[0])  # the meta model's one-time imports
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak so far (imports) is forgotten
a = argparse.Namespace(ckpt=ckpt, tokenizer=None, device="cpu", dtype=dtype, strict=False,
                       force=False, quantize=kind)
model = load_checkpoint(a).model
quantize(kind, model)  # what generate and serve do next
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"own": status("VmHWM:") - before, "held": held}))
"""


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory, small_tokenizer) -> Path:
    """`BIG` with random fp32 weights, written tensor by tensor (444 MB)."""
    g = torch.Generator().manual_seed(0)
    tensors = ((n, torch.randn(s, generator=g) * 0.02) for n, s in expected_shapes(BIG).items())
    return save_state(tensors, BIG, small_tokenizer, tmp_path_factory.mktemp("big") / "ckpt")


def _own_peak(ckpt: Path, dtype: str | None, kind: str | None) -> tuple[int, int]:
    """(memory the load took at its peak, bytes of the loaded model's tensors)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/status and clear_refs")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    # glibc's malloc: blocks from 1 MiB up mapped and unmapped, so a freed tensor leaves the
    # process. Its default threshold adapts (it rises to the size of freed blocks), and the
    # heap then keeps freed temporaries by chance: up to +130 MiB here from run to run,
    # the allocator's, not what loading holds.
    env["GLIBC_TUNABLES"] = "glibc.malloc.mmap_threshold=1048576"
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(ckpt), dtype or "", kind or ""],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return r["own"], r["held"]


@pytest.mark.parametrize(("dtype", "kind"), [(None, "int8"), ("bfloat16", None)])
def test_loading_holds_the_converted_model_and_about_one_tensor(big_ckpt, dtype, kind):
    """Converting after loading held the fp32 weights (on the CPU, the pages of the mapped
    file) and the converted ones together: 1.5 to 2.5 × the checkpoint here, measured.
    Converting as read holds the converted model and about one tensor (the largest is 2.6%
    of the checkpoint), with a quarter of the checkpoint allowed for it and the allocator."""
    fp32 = sum((big_ckpt / f).stat().st_size for f in weight_files(big_ckpt))
    own, held = _own_peak(big_ckpt, dtype, kind)
    mib = {k: f"{v / 2**20:.0f} MiB" for k, v in dict(own=own, held=held, fp32=fp32).items()}
    print(f"dtype={dtype} quantize={kind}: peak {mib['own']} over the loading process's start, "
          f"model {mib['held']}, checkpoint {mib['fp32']}")  # fmt: skip
    assert held < (0.3 if kind else 0.55) * fp32  # int8 (or bf16) weights, fp32 embedding
    assert own < held + fp32 / 4, mib
