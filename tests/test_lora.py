"""LoRA: frozen base, merge, the PEFT format against the real peft package, int8 base, CLI
(the NF4 base and the quantised bases under DDP / FSDP2: tests/test_qlora.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import llamaforge
from llamaforge.checkpoint.convert import convert
from llamaforge.checkpoint.native import CheckpointError, save, weights_sha256
from llamaforge.config import apply_overrides, load_config
from llamaforge.finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LLAMAFORGE_FILE,
    LoraConfig,
    LoraError,
    LoraLinear,
    QuantLinear,
    apply_lora,
    init_lora_,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from llamaforge.finetune.merge import merge_command
from llamaforge.model import Transformer
from llamaforge.training.optim import build_optimizer

from .conftest import tiny_model

VOCAB = 256


def make_model(seed: int = 0, dim: int = 64, n_kv_heads: int | None = 2) -> Transformer:
    """dim 64, 2 layers, 4 heads, 2 kv heads (GQA), random non-trivial norm gains."""
    return tiny_model(
        VOCAB, seed=seed, norm_gains=True, dim=dim, n_kv_heads=n_kv_heads, norm_eps=1e-5
    )


def tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 24), generator=g)


@torch.no_grad()
def randomise_b(model: nn.Module, std: float = 0.05) -> None:
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, std)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


# -- frozen base, init, merge ------------------------------------------------------------------


def test_apply_freezes_base_and_b_zero_is_the_base():
    model = make_model()
    x = tokens()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = logits(model, x)
    adapted = apply_lora(model, LoraConfig())
    assert adapted == [f"layers.{i}.attention.{w}" for i in range(2) for w in "wq wk wv wo".split()]
    assert torch.equal(logits(model, x), ref)  # B = 0: exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{a}.lora_{ab}.weight" for a in adapted for ab in "AB"}
    assert set(base_state) <= set(model.state_dict())  # Meta's names are kept
    # the trainer's optimizer, built over the whole model, takes only the adapters
    model.train()
    opt = build_optimizer(model, 1e-2, weight_decay=0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_state.items())
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # A follows PEFT's init: kaiming-uniform a=sqrt(5) = U(±1/sqrt(in))
    a = model.layers[0].attention.wq.lora_A.weight
    assert a.abs().max() <= 1 / 8 and a.std() > 0.05


def test_meta_build_then_base_weights_then_init_lora(tmp_path):
    """The trainer's flow: meta → apply_lora → to_empty → base weights → init_lora_."""
    base = make_model()
    save(base, None, tmp_path / "base")
    with torch.device("meta"):
        model = Transformer(base.args)
    apply_lora(model, LoraConfig(targets="all", rank=4))
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(
        llamaforge.load(tmp_path / "base")[0].state_dict(), strict=False
    )
    assert not unexpected and all(".lora_" in k for k in missing) and len(missing) == 2 * 14
    init_lora_(model, seed=3)
    model.eval()
    assert torch.equal(logits(model, tokens()), logits(base, tokens()))
    a = {k: v.clone() for k, v in lora_state_dict(model).items() if "lora_A" in k}
    assert all(v.abs().max() <= 1 / v.shape[1] ** 0.5 and v.std() > 0 for v in a.values())
    assert all(v.count_nonzero() == 0 for k, v in lora_state_dict(model).items() if "lora_B" in k)
    init_lora_(model, seed=3)  # deterministic, per parameter name
    assert all(torch.equal(lora_state_dict(model)[k], v) for k, v in a.items())
    init_lora_(model, seed=4)
    assert not torch.equal(lora_state_dict(model)[next(iter(a))], next(iter(a.values())))


def test_merge_matches_lora_and_gives_plain_modules():
    model = make_model()
    apply_lora(model, LoraConfig(targets=["all", "output"], rank=4, alpha=8))
    randomise_b(model)
    x = tokens()
    lora_logits = logits(model, x)
    merge_lora(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("wq", "w2")))
    assert set(model.state_dict()) == set(make_model().state_dict())
    merged_logits = logits(model, x)
    diff = (merged_logits - lora_logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert (lora_logits - logits(make_model(), x)).abs().max() > 1e-2  # the adapter matters


# -- PEFT format, against the real peft package --------------------------------------------------

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _hf_export(tmp_path, base: Transformer):
    save(base, None, tmp_path / "base")
    convert(tmp_path / "base", tmp_path / "hf", source="native", target="hf", progress=False)
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def test_our_adapter_loads_in_peft_with_same_logits(tmp_path):
    base = make_model()
    hf = _hf_export(tmp_path, base)
    cfg = LoraConfig(targets=["all", "output"], rank=4, alpha=8, dropout=0.05)
    model = make_model()
    apply_lora(model, cfg)
    randomise_b(model)
    model.eval()
    out = save_adapter(model, tmp_path / "adapter", cfg, base=tmp_path / "base")
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, LLAMAFORGE_FILE])
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    ours = json.loads((out / LLAMAFORGE_FILE).read_text())
    assert ours["format_version"] == 2 and ours["base_sha256"] == weights_sha256(tmp_path / "base")
    x = tokens()
    base_diff = (logits(hf, x) - logits(base, x)).abs().max().item()  # before peft wraps hf
    assert base_diff <= 1e-4, base_diff
    peft_model = peft.PeftModel.from_pretrained(hf, out).eval()
    ours_logits, peft_logits = logits(model, x), logits(peft_model, x)
    diff = (ours_logits - peft_logits).abs().max().item()
    print(f"export parity: base {base_diff:.2e}, lora {diff:.2e}")
    assert diff <= 1e-4, diff
    assert (ours_logits - logits(base, x)).abs().max() > 1e-2  # the adapter changed the output
    # peft's merge agrees with ours too
    merged_hf = peft_model.merge_and_unload()
    merge_lora(model)
    assert (logits(merged_hf, x) - logits(model, x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_made_adapter_loads_with_same_logits(tmp_path, rslora):
    base = make_model()
    hf = _hf_export(tmp_path, base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM", use_rslora=rslora
    )
    peft_model = peft.get_peft_model(hf, pcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    assert not (tmp_path / "peft_adapter" / LLAMAFORGE_FILE).exists()
    model, _ = llamaforge.load(tmp_path / "base")
    cfg = load_adapter(model, tmp_path / "peft_adapter")
    assert cfg.rank == 4 and cfg.rslora is rslora and len(cfg.target_names()) == 7
    x = tokens()
    diff = (logits(model, x) - logits(peft_model, x)).abs().max().item()
    print(f"import parity (rslora={rslora}): {diff:.2e}")
    assert diff <= 1e-4, diff
    assert (logits(model, x) - logits(base, x)).abs().max() > 1e-2


def test_adapter_roundtrip_and_other_base_is_an_error(tmp_path):
    cfg = LoraConfig(targets="all", rank=4)
    model = make_model()
    save(model, None, tmp_path / "base")
    apply_lora(model, cfg)
    randomise_b(model)
    save_adapter(model, tmp_path / "adapter", cfg, base=tmp_path / "base")
    with pytest.raises(LoraError, match="already exists"):
        save_adapter(model, tmp_path / "adapter", cfg)
    again = make_model()
    load_adapter(again, tmp_path / "adapter", base_sha256=weights_sha256(tmp_path / "base"))
    assert all(torch.equal(lora_state_dict(again)[k], v) for k, v in lora_state_dict(model).items())
    # another architecture: named from llamaforge_adapter.json, both sides
    with pytest.raises(LoraError, match=r"another base: dim=64.*this model has dim=128"):
        load_adapter(make_model(dim=128), tmp_path / "adapter")
    # same shapes, other weights: the hashes differ, both named
    other = make_model(seed=5)
    save(other, None, tmp_path / "other")
    other_sha = weights_sha256(tmp_path / "other")
    with pytest.raises(LoraError, match=rf"sha256 [0-9a-f]{{64}}, this base is {other_sha}"):
        load_adapter(other, tmp_path / "adapter", base_sha256=other_sha)
    # a peft-style adapter (no llamaforge file) for another shape: the tensor shapes say so
    (tmp_path / "adapter" / LLAMAFORGE_FILE).unlink()
    with pytest.raises(
        LoraError, match=r"has shape \(4, \d+\), this model.s layer needs \(4, \d+\)"
    ):
        load_adapter(make_model(dim=128), tmp_path / "adapter")
    with pytest.raises(LoraError, match="already has LoRA adapters"):
        load_adapter(again, tmp_path / "adapter")
    with pytest.raises(LoraError, match="not a PEFT adapter"):
        load_adapter(make_model(), tmp_path / "base")


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rank": 0}, "lora.rank=0"),
        ({"rank": -4}, "lora.rank=-4"),
        ({"alpha": 0}, "lora.alpha=0"),
        ({"alpha": -1.0}, "lora.alpha=-1.0"),
        ({"dropout": 1.0}, r"lora.dropout=1.0: must be in \[0, 1\)"),
        ({"dropout": -0.1}, "lora.dropout=-0.1"),
        ({"targets": ["wq", "attn"]}, "'attn' matches no layer"),
        ({"targets": "q_proj"}, "'q_proj' matches no layer"),
        ({"targets": []}, r"lora.targets=\[\]"),
        ({"quantize": "int4"}, "lora.quantize='int4'"),
        ({"quantize_scope": "some"}, "lora.quantize_scope='some'"),
    ],
)
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(LoraError, match=message):
        LoraConfig(**kwargs).validate()
    with pytest.raises(LoraError, match=message):
        apply_lora(make_model(), LoraConfig(**kwargs))


def test_config_targets_from_toml_and_overrides(tmp_path):
    assert LoraConfig().target_names() == ("wq", "wk", "wv", "wo")
    cfg = apply_overrides(LoraConfig(), ['targets="all"', "rank=16", "alpha=32"])
    assert cfg.target_names() == ("wq", "wk", "wv", "wo", "w1", "w2", "w3") and cfg.scaling == 2
    path = tmp_path / "lora.toml"
    path.write_text('targets = ["all", "output"]\ndropout = 0.1\nquantize = "int8"\n')
    cfg = load_config(LoraConfig, path)
    assert cfg.target_names()[-1] == "output" and cfg.validate().dropout == 0.1
    assert LoraConfig(rank=4, alpha=8, rslora=True).scaling == 4.0


# -- quantised base -------------------------------------------------------------------------------


def test_int8_base_close_to_fp32_and_adapters_train():
    fp = make_model()
    cfg = LoraConfig(targets="all", rank=4, quantize="int8", quantize_scope="all")
    q = make_model()
    apply_lora(fp, LoraConfig(targets="all", rank=4))
    apply_lora(q, cfg)
    with torch.no_grad():  # the same adapters on both
        for (n, p), (m, r) in zip(lora_state_dict(fp).items(), lora_state_dict(q).items()):
            assert n == m
            r.copy_(p.normal_(0.0, 0.05))
    wq = q.layers[0].attention.wq
    assert isinstance(wq, LoraLinear) and wq.weight.dtype == torch.int8
    assert q.state_dict()["layers.0.attention.wq.weight"].dtype == torch.int8
    x = tokens()
    ref, got = logits(fp, x), logits(q, x)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"int8 base: max |Δlogit| / max |logit| = {rel:.2e}")
    assert rel <= 2e-2, rel  # stated tolerance: 2% of the largest logit
    q.train()
    loss = q(x).float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(".lora_" in n for n in grads)


def test_int8_meta_build_quantises_the_loaded_base():
    base = make_model()
    with torch.device("meta"):
        model = Transformer(base.args)
    apply_lora(model, LoraConfig(rank=4, quantize="int8"))
    model = model.to_empty(device="cpu")
    model.load_state_dict(base.state_dict(), strict=False)
    init_lora_(model, seed=0)
    w = model.layers[1].attention.wv
    assert w.weight.dtype == torch.int8
    assert torch.allclose(w.base_weight(), base.layers[1].attention.wv.weight, atol=1e-3)
    merge_lora(model)  # a quantised base merges into its dequantised weights
    assert model.layers[1].attention.wv.weight.dtype == torch.float32


# -- command line ------------------------------------------------------------------------------


def test_merge_command_end_to_end(tmp_path):
    cfg = LoraConfig(targets="all", rank=4)
    base = make_model()
    save(base, None, tmp_path / "base", dtype="bfloat16")
    model, _ = llamaforge.load(tmp_path / "base", dtype=torch.float32)
    apply_lora(model, cfg)
    randomise_b(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter", cfg, base=tmp_path / "base")
    expected = logits(model, tokens())

    from llamaforge.cli.main import main

    argv = ["lora", "merge", *(str(tmp_path / d) for d in ("base", "adapter", "merged"))]
    assert main(argv) == 0
    merged, _ = llamaforge.load(tmp_path / "merged", dtype=torch.float32)
    params = json.loads((tmp_path / "merged" / "params.json").read_text())
    assert params["llamaforge"]["dtype"] == "bfloat16"  # the base's stored dtype
    assert params["llamaforge"]["lora_merged"]["rank"] == 4
    diff = (logits(merged, tokens()) - expected).abs().max().item()
    assert diff <= 5e-2 * expected.abs().max().item()  # bf16 storage of the merged weights
    with pytest.raises(CheckpointError, match="already exists"):
        merge_command(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merge_command(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", force=True)
    # an adapter for another base is refused by its weights hash
    save(make_model(seed=7), None, tmp_path / "other", dtype="bfloat16")
    with pytest.raises(LoraError, match="trained on base weights sha256"):
        merge_command(tmp_path / "other", tmp_path / "adapter", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert lora_parameters(model) and not lora_parameters(merged)


# -- FSDP2: the trainer's integration, two processes --------------------------------------------

FSDP_SCRIPT = """
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import llamaforge
from llamaforge import parallel as D
from llamaforge.finetune.lora import LoraConfig, apply_lora, init_lora_, lora_state_dict
from llamaforge.model import build_model
from llamaforge.training.optim import build_optimizer, cross_entropy

base_dir, out = sys.argv[1], sys.argv[2]
info = D.init("cpu")
base, _ = llamaforge.load(base_dir)
model = build_model(base.args, device="meta", init=False)
apply_lora(model, LoraConfig(targets="all", rank=4, dropout=0.0))
model = D.parallelize(model, info, parallel="fsdp")
model = model.to_empty(device=info.device)
D.init_params(model, 0)  # what the trainer does; the base load and init_lora_ replace it
opts = StateDictOptions(full_state_dict=True, strict=False)
set_model_state_dict(model, base.state_dict(), options=opts)
init_lora_(model, seed=0)
init = lora_state_dict(model)
opt = build_optimizer(model, 1e-2, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
x, y = (torch.randint(0, 256, (4, 16), generator=g) for _ in range(2))
half = slice(2 * info.rank, 2 * info.rank + 2)
loss, n = cross_entropy(model(x[half]), y[half])
(loss / n).backward()
grads = {}
for name, p in model.named_parameters():
    if p.requires_grad:
        grads[name] = p.grad.full_tensor()
    else:
        assert p.grad is None, name
before = {k: v.full_tensor().clone() for k, v in model.state_dict().items() if ".lora_" not in k}
opt.step()
after = {k: v.full_tensor() for k, v in model.state_dict().items() if ".lora_" not in k}
assert all(torch.equal(before[k], after[k]) for k in before)
if info.rank == 0:
    torch.save({"init": init, "grads": grads}, out)
D.cleanup()
"""


@pytest.mark.slow
def test_fsdp2_trainer_flow_matches_one_process(tmp_path):
    """meta → apply_lora → FSDP2 → to_empty → init_params → base weights → init_lora_: the
    adapters start as in one process, only they get gradients (the same ones)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llamaforge.training.optim import cross_entropy

    base = make_model()
    save(base, None, tmp_path / "base")
    (tmp_path / "fsdp_lora.py").write_text(FSDP_SCRIPT)
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    port = str(29500 + (os.getpid() + 13) % 1000)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", port, str(tmp_path / "fsdp_lora.py"), str(tmp_path / "base"),
         str(tmp_path / "out.pt")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)

    model, _ = llamaforge.load(tmp_path / "base")
    apply_lora(model, LoraConfig(targets="all", rank=4, dropout=0.0))
    init_lora_(model, seed=0)
    model.train()
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 256, (4, 16), generator=g) for _ in range(2))
    loss, n = cross_entropy(model(x), y)
    (loss / n).backward()
    ref = lora_state_dict(model)
    assert set(got["init"]) == set(ref) and len(ref) == 28
    assert all(torch.equal(got["init"][k], v) for k, v in ref.items())
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(grads)
    worst = max((got["grads"][k] - v).abs().max().item() for k, v in grads.items())
    assert worst <= 1e-6, worst
