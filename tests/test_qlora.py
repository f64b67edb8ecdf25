"""QLoRA: an NF4 base (torchao) and an int8 base under LoRA — logits against the float base,
no dequantised weight kept for the backward pass, adapters that load in the real peft,
parameters rather than buffers under DDP, FSDP2 shards over two gloo processes, and the
finetuning command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

import llamaforge  # noqa: E402
from llamaforge.checkpoint.native import save  # noqa: E402
from llamaforge.finetune.lora import (  # noqa: E402
    LLAMAFORGE_FILE,
    LoraConfig,
    LoraError,
    QuantLinear,
    apply_lora,
    init_lora_,
    load_adapter,
    lora_parameters,
    save_adapter,
)
from llamaforge.model import ModelArgs, Transformer, build_model  # noqa: E402

VOCAB = 256
REPO = Path(__file__).resolve().parents[1]
# NF4 rounds a N(0, σ) weight with a relative RMS error of 0.092 (torchao's to_nf4 on
# 1024 × 1024 Gaussian weights; int8 with per-row absmax: 0.0079). The logits of the test
# model pass through 5 quantised products in series (attention and feed-forward of 2
# blocks, the output layer): independent errors give √5 × 0.092 = 0.21 relative RMS for
# NF4 and 0.018 for int8 (measured: 0.20 and 0.015 in fp32, 0.20 and 0.018 in bf16). The
# tolerances, a little over those, bound what the storage costs; that the layers add
# nothing to it is checked exactly against a float model holding independently quantised
# and dequantised weights.
REL_RMS_TOLERANCE = {"nf4": 0.25, "int8": 0.025}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """dim 256, 2 layers, 4 heads, 2 kv heads (GQA): every weight splits into 2 FSDP2 shards
    of whole NF4 scale groups (64 · 256 weights)."""
    torch.manual_seed(seed)
    args = ModelArgs(
        dim=256,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=VOCAB,
        multiple_of=256,
        max_seq_len=64,
        norm_eps=1e-5,
    )
    model = build_model(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def tokens(seed: int = 1, rows: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (rows, 24), generator=g)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def rel_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def qlora(quantize: str, targets: str | list[str] = "all") -> LoraConfig:
    return LoraConfig(
        targets=targets, rank=4, alpha=8, dropout=0.0, quantize=quantize, quantize_scope="all"
    )


@torch.no_grad()
def dequantised(model: nn.Module) -> Transformer:
    """A plain float model whose base weights are ``model``'s, dequantised."""
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = {f"{name}.weight": m.base_weight(torch.float32) for name, m in quant.items()}
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in quant and ".lora_" not in name:
            state[name] = p.detach().float()
    plain = make_model()
    plain.load_state_dict(state)
    return plain


# -- logits ---------------------------------------------------------------------------------


@torch.no_grad()
def quantised_reference(base: Transformer, quantize: str) -> Transformer:
    """``base`` with every block linear and the output layer quantised and dequantised by
    torchao's ``to_nf4`` (QLoRA's blocks: 64, scales in groups of 256; bf16) or per-row int8
    here, independently of the layers under test."""
    from torchao.quantization import to_nf4

    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, w in state.items():
        if not name.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight",
                              "w2.weight", "w3.weight", "output.weight")):  # fmt: skip
            continue
        if quantize == "nf4":
            nf4 = to_nf4(w.to(torch.bfloat16), 64, 256)  # QLoRA's compute dtype
            state[name] = nf4.get_original_weight().to(w.dtype)
        else:
            scale = w.float().abs().amax(dim=1, keepdim=True) / 127
            state[name] = (torch.round(w.float() / scale) * scale).to(w.dtype)
    model = make_model(dtype=next(base.parameters()).dtype)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_close_to_the_float_base_and_equal_to_the_dequantised_base(quantize, dtype):
    base = make_model(dtype=dtype)
    model = make_model(dtype=dtype)
    apply_lora(model, qlora(quantize, ["all", "output"]))  # B = 0: the (quantised) base
    wq, out = model.layers[0].attention.wq, model.output
    kind = "NF4Tensor" if quantize == "nf4" else "Parameter"
    for layer in (wq, out):
        assert type(layer.weight).__name__ == kind and not layer.weight.requires_grad
        assert layer.lora_A.weight.dtype == dtype  # the adapters in the compute dtype
    assert quantize != "int8" or wq.weight.dtype == torch.int8
    assert not list(model.buffers())  # parameters (frozen), not buffers
    x = tokens()
    ref, got = logits(base, x), logits(model, x)
    err = rel_rms(got, ref)
    print(f"{quantize} base, {dtype}: relative RMS logit error {err:.4f}")
    assert err <= REL_RMS_TOLERANCE[quantize], err
    same = logits(quantised_reference(base, quantize), x)
    diff = (got - same).abs().max().item()
    # bf16: int8 is dequantised in bf16 (the scale rounded, then the product), the reference
    # rounds once from fp32: a few bf16 steps apart
    assert diff <= (1e-5 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()), diff


def test_nf4_state_dict_roundtrip_and_meta_build():
    """The trainer's order (meta → adapters → to_empty → init_params → base → init_lora_)
    gives the model that quantising the loaded base gives; a state dict of the quantised
    model loads as it is."""
    from llamaforge.finetune.lora import load_base_state_dict
    from llamaforge.parallel import init_params

    base = make_model()
    direct = make_model()
    apply_lora(direct, qlora("nf4"))
    init_lora_(direct, seed=0)
    with torch.device("meta"):
        model = Transformer(base.args)
    apply_lora(model, qlora("nf4"))
    model = model.to_empty(device="cpu")
    init_params(model, 0)  # leaves the quantised storage to the load
    load_base_state_dict(model, base.state_dict())
    init_lora_(model, seed=0)
    model.eval()
    x = tokens()
    assert torch.equal(logits(model, x), logits(direct, x))
    again = make_model(seed=3)
    apply_lora(again, qlora("nf4"))
    again.load_state_dict(model.state_dict())
    assert torch.equal(logits(again, x), logits(model, x))


# -- no dequantised weight saved for the backward pass --------------------------------------


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a wrapper subclass (NF4Tensor) by its inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        return sum(_stored_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.untyped_storage().nbytes()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_backward_saves_no_dequantised_weight(quantize):
    out_features, in_features = 512, 256
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features) * 0.02
    layer = QuantLinear(in_features, out_features, quantize=quantize, weight=w)
    x = torch.randn(3, 8, in_features, requires_grad=True)
    saved: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((type(t).__name__, tuple(t.shape), t.dtype, _stored_bytes(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    full = out_features * in_features
    print(f"{quantize}: saved {saved}")
    assert saved, "the backward pass needs the (quantised) weight"
    for kind, shape, dtype, nbytes in saved:
        # nothing of the weight's size in a float dtype: only the quantised storage
        assert nbytes <= (0.6 if quantize == "nf4" else 1.1) * full, (kind, shape, dtype, nbytes)
        assert not (kind in ("Tensor", "Parameter") and dtype.is_floating_point and nbytes >= full)
    # and the gradient is the one of the dequantised weight
    deq = layer.base_weight(torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, deq).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5), (x.grad - x2.grad).abs().max()


def test_activation_checkpointing_gives_the_same_adapter_gradients():
    """``selective`` (the 7B LoRA config's) and ``full`` recompute through the quantised
    layers' autograd functions: the adapters get the gradients of no checkpointing."""
    from llamaforge.parallel import apply_activation_checkpointing

    x = tokens()
    for quantize in ("nf4", "int8"):
        grads = {}
        for mode in ("none", "selective", "full"):
            model = make_model()
            apply_lora(model, qlora(quantize))
            init_lora_(model, seed=0)
            with torch.no_grad():  # B ≠ 0, so A's gradients are not zero either
                for name, p in model.named_parameters():
                    if ".lora_B" in name:
                        p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
            apply_activation_checkpointing(model, mode)
            model.train()
            model(x).float().logsumexp(-1).mean().backward()
            grads[mode] = [p.grad for p in lora_parameters(model)]
        assert len(grads["none"]) == 28 and all(g.abs().sum() > 0 for g in grads["none"])
        for mode in ("selective", "full"):
            assert all(torch.equal(a, b) for a, b in zip(grads[mode], grads["none"])), mode


# -- adapters trained on an NF4 base load in peft --------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_adapter_trained_on_nf4_base_loads_in_peft(tmp_path):
    """A few AdamW steps on the NF4 base; peft loads the adapter onto the HF export of the
    dequantised base and gives our logits (fp32: 1e-4, as the float-base parity tests)."""
    from llamaforge.checkpoint.convert import convert

    cfg = qlora("nf4", ["all", "output"])
    model = make_model()
    apply_lora(model, cfg)
    init_lora_(model, seed=0)
    model.train()
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = tokens(rows=4)
    for _ in range(3):
        loss = nn.functional.cross_entropy(
            model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save(dequantised(model), None, tmp_path / "base")
    convert(tmp_path / "base", tmp_path / "hf", source="native", target="hf", progress=False)
    out = save_adapter(model, tmp_path / "adapter", cfg, base=tmp_path / "base")
    assert json.loads((out / LLAMAFORGE_FILE).read_text())["quantize"] == "nf4"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    ours, theirs = logits(model, x), logits(peft_model, x)
    diff = (ours - theirs).abs().max().item()
    print(f"NF4-trained adapter in peft: {diff:.2e}")
    assert diff <= 1e-4, diff
    assert (ours - logits(dequantised(model), x)).abs().max() > 1e-2  # the adapter trained
    # and back: the adapter on an NF4 base here again gives the same model
    again = make_model()
    load_adapter(again, out, quantize="nf4")
    assert (logits(again.eval(), x) - ours).abs().max().item() <= 1e-5


# -- configuration and errors ----------------------------------------------------------------


def test_nf4_needs_torchao_and_whole_scale_groups(monkeypatch):
    with pytest.raises(LoraError, match=r"4096 weights, not a multiple of 16384"):
        QuantLinear(64, 64, quantize="nf4")
    for name in [n for n in sys.modules if n == "torchao" or n.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without it sees
    with pytest.raises(LoraError, match=r"needs torchao >= 0.18 \(pip install 'llamaforge\[qlora"):
        apply_lora(make_model(), qlora("nf4"))


# -- DDP and FSDP2: two gloo processes ---------------------------------------------------------

PARALLEL_SCRIPT = """
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import llamaforge
from llamaforge import parallel as D
from llamaforge.finetune.lora import LoraConfig, LoraError, apply_lora, init_lora_
from llamaforge.finetune.lora import load_base_state_dict
from llamaforge.model import build_model
from llamaforge.training.optim import cross_entropy

base_dir, quantize, out = sys.argv[1:4]
info = D.init("cpu")
base, _ = llamaforge.load(base_dir)
cfg = LoraConfig(targets="all", rank=4, alpha=8, dropout=0.0, quantize=quantize,
                 quantize_scope="all")
opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
g = torch.Generator().manual_seed(0)
x, y = (torch.randint(0, 256, (4, 16), generator=g) for _ in range(2))
half = slice(2 * info.rank, 2 * info.rank + 2)
result = {}


def build(parallel):
    # the trainer's orders: FSDP2 shards on the meta device, DDP wraps a loaded model
    model = build_model(base.args, device="meta", init=False)
    apply_lora(model, cfg)
    if parallel == "fsdp":
        model = D.parallelize(model, info, parallel="fsdp")
    model = model.to_empty(device=info.device)
    D.init_params(model, 0)
    load_base_state_dict(model, base.state_dict() if info.rank == 0 else {}, opts)
    init_lora_(model, seed=0)
    return D.parallelize(model, info, parallel="ddp") if parallel == "ddp" else model


for parallel in ("fsdp", "ddp"):
    model = build(parallel)
    loss, n = cross_entropy(model(x[half]), y[half])
    (loss / n).backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[D.unwrapped_name(name)] = D.full_tensor(p.grad)
        else:
            assert p.grad is None, name
    result[parallel] = grads
    wq = dict(model.named_parameters())
    wq = next(p for k, p in wq.items() if k.endswith("layers.0.attention.wq.weight"))
    local = wq.to_local() if hasattr(wq, "to_local") else wq
    result[parallel + "_wq"] = (type(local).__name__, list(local.shape), str(local.dtype))
    if parallel == "ddp":
        result["ddp_buffers"] = len(model.modules_buffers)
        result["ddp_syncs_buffers"] = model.will_sync_module_buffers()

if quantize == "int8":  # torch's own loader would quantise shard by shard: refused
    model = build_model(base.args, device="meta", init=False)
    apply_lora(model, cfg)
    model = D.parallelize(model, info, parallel="fsdp").to_empty(device=info.device)
    try:
        set_model_state_dict(model, base.state_dict() if info.rank == 0 else {}, options=opts)
        result["refused"] = ""
    except LoraError as e:
        result["refused"] = str(e)
if info.rank == 0:
    torch.save(result, out)
D.cleanup()
"""


def _torchrun(script: Path, *argv: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    port = str(29500 + (os.getpid() + 17) % 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", port, str(script), *argv],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_fsdp2_shards_and_ddp_wraps_the_quantised_base(tmp_path, quantize):
    """Two gloo processes: under FSDP2 each rank holds half the rows of every quantised
    weight and the adapters' gradients are one process's (the full tensors are quantised
    whole, then sharded); under DDP the base is no buffer to broadcast each forward pass."""
    from llamaforge.training.optim import cross_entropy

    base = make_model()
    save(base, None, tmp_path / "base")
    (tmp_path / "parallel.py").write_text(PARALLEL_SCRIPT)
    _torchrun(tmp_path / "parallel.py", str(tmp_path / "base"), quantize, str(tmp_path / "r.pt"))
    got = torch.load(tmp_path / "r.pt", weights_only=True)

    model, _ = llamaforge.load(tmp_path / "base")
    apply_lora(model, qlora(quantize))
    init_lora_(model, seed=0)
    model.train()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(2))
    loss, n = cross_entropy(model(x), y)
    (loss / n).backward()
    ref = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    kind = "NF4Tensor" if quantize == "nf4" else "Tensor"
    assert list(got["fsdp_wq"][:2]) == [kind, [128, 256]]  # half of wq's 256 rows a rank
    assert list(got["ddp_wq"][:2]) == [kind if kind == "NF4Tensor" else "Parameter", [256, 256]]
    assert got["ddp_buffers"] == 0 and got["ddp_syncs_buffers"] is False
    for parallel in ("fsdp", "ddp"):
        assert set(got[parallel]) == set(ref) and len(ref) == 28
        worst = max((got[parallel][k] - v).abs().max().item() for k, v in ref.items())
        print(f"{quantize} {parallel}: adapters' gradients within {worst:.1e} of one process")
        assert worst <= 1e-6, (parallel, worst)
    if quantize == "int8":
        assert "load_base_state_dict" in got["refused"], got["refused"]


# -- the finetuning command --------------------------------------------------------------------


def test_qlora_finetune_from_the_cli(tmp_path, small_tokenizer_path, capsys):
    """``llamaforge finetune`` with ``lora.quantize=nf4``: the run trains the adapters on the
    NF4 base (the trainer loads it through ``load_base_state_dict``) and writes the adapter;
    with ``lora.merge`` the export folds the adapter into the float base's files."""
    from llamaforge.cli.main import main

    base = tmp_path / "base"
    init = ["init", "--preset", "1M", "--tokenizer", str(small_tokenizer_path), "--out", str(base)]
    shape = ["dim=256", "n_layers=2", "n_heads=4", "n_kv_heads=2", "multiple_of=256"]
    assert main([*init, *shape, "max_seq_len=128"]) == 0
    rows = [{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in "abcdefgh" * 3]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = [
        "finetune", f"init={base}", f"data.paths=['{data}']", "data.max_len=128",
        "data.val_fraction=0.2", "batch_size=4", "micro_batch=4", "steps=2", "gen_eval=0",
        "eval_batches=1", "device=cpu", "progress=false", "optim.lr=1e-2", f"--out={out}",
        "lora.enabled=true", "lora.rank=4", "lora.targets=all", "lora.quantize=nf4",
        "lora.quantize_scope=all", "lora.dropout=0",
    ]  # fmt: skip
    assert main([*argv, "lora.merge=true", f"--out={tmp_path / 'merged'}"]) == 0
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())["model"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] == str(out / "adapter") and not (out / "model").exists()
    assert json.loads((out / "adapter" / LLAMAFORGE_FILE).read_text())["quantize"] == "nf4"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 512, (2, 16), generator=g)
    plain, _ = llamaforge.load(base)
    apply_lora(plain, LoraConfig(targets="all", quantize="nf4"))  # B = 0: the NF4 base
    adapted, _ = llamaforge.load(base)
    load_adapter(adapted, out / "adapter", quantize="nf4")
    diff = (logits(adapted.eval(), x) - logits(plain.eval(), x)).abs().max().item()
    assert diff > 1e-3, diff  # two steps at lr 1e-2 moved the adapters
    # the run's merge folds its adapter into the float base, as QLoRA's users merge
    float_adapted, _ = llamaforge.load(base)
    load_adapter(float_adapted, tmp_path / "merged" / "adapter")
    folded, _ = llamaforge.load(merged)
    want, got = logits(float_adapted.eval(), x), logits(folded.eval(), x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
