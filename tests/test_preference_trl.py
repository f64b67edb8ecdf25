"""Preference losses against TRL on the same batch: the loss, the rewards and the gradients
of DPO (sigmoid, IPO) and SimPO, full finetuning and LoRA, equal TRL's (``DPOTrainer``,
``CPOTrainer`` with ``loss_type="simpo"``) on the Hugging Face export of the same weights,
in fp32, within 1e-5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llamaforge.checkpoint.convert import convert
from llamaforge.checkpoint.convert.hf import to_hf_state_dict
from llamaforge.checkpoint.native import save
from llamaforge.finetune.lora import LoraConfig, _permute_b, apply_lora, peft_name, save_adapter
from llamaforge.finetune.preference import adapters_disabled, preference_losses, sequence_logps
from llamaforge.finetune.run import PreferenceSection
from llamaforge.model import Transformer
from llamaforge.tokenizer import Tokenizer

from .conftest import tiny_model

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

TOL = 1e-5
ROWS = [
    {"prompt": "What is two plus two?", "chosen": " four", "rejected": " five, I think"},
    {"prompt": "Name a colour.", "chosen": " red", "rejected": " a wooden table"},
    {"prompt": "Which module parses Python?", "chosen": " ast", "rejected": " json or re"},
]


def _model(tok: Tokenizer, seed: int) -> Transformer:
    return tiny_model(tok.vocab_size, seed=seed, norm_gains=True, norm_eps=1e-5, max_seq_len=128)


def _hf(tmp: Path, model: Transformer, tok: Tokenizer, name: str) -> Any:
    save(model, tok, tmp / f"{name}_native")
    convert(tmp / f"{name}_native", tmp / name, source="native", target="hf", progress=False)
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp / name, dtype=torch.float32, attn_implementation="sdpa"
    )


def _interleave(ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's [chosen…, rejected…] rows of whole sequences → our (x, y): rows 2i chosen,
    2i + 1 rejected, inputs ids[:-1], targets labels[1:]."""
    b = ids.shape[0] // 2
    order = torch.stack([torch.arange(b), torch.arange(b) + b], 1).flatten()
    return ids[order, :-1], labels[order, 1:]


def _ours(
    policy: Transformer,
    ref: Transformer | None,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str,
    p: PreferenceSection,
) -> dict[str, Any]:
    ref_logps = None
    if method == "dpo":
        with torch.no_grad():
            if ref is None:  # LoRA: the base is the policy with its adapters off
                with adapters_disabled(policy):
                    ref_logps = sequence_logps(policy, x, y, {})[0]
            else:
                ref_logps = sequence_logps(ref, x, y, {})[0]
    logps, lengths = sequence_logps(policy, x, y, {})
    losses, chosen, rejected = preference_losses(method, p, logps, lengths, ref_logps)
    loss = losses.mean()
    loss.backward()
    return {
        "loss": loss.item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
    }


def _check(ours: dict[str, Any], theirs: dict[str, Any], grads: dict[str, Any], hf_grads: dict):
    for key, value in ours.items():
        assert abs(value - theirs[key]) <= TOL, (key, value, theirs[key])
    assert grads.keys() == hf_grads.keys()
    worst = max((grads[k] - hf_grads[k]).abs().max().item() for k in grads)
    scale = max(g.abs().max().item() for g in hf_grads.values())
    print(f"loss {ours['loss']:.6f} vs {theirs['loss']:.6f}; gradients max |Δ| {worst:.2e}")
    assert scale > 1e-4 and worst <= TOL, (worst, scale)


@torch.no_grad()
def _copy_adapters(model: Transformer, peft_model: Any) -> None:
    """Our adapter weights into PEFT's (HF names, q/k rows permuted)."""
    ours = {
        peft_name(n): _permute_b(n, t, model.args, to_hf=True)
        for n, t in model.state_dict().items()
        if ".lora_" in n
    }
    names = [n for n, _ in peft_model.named_parameters() if ".lora_" in n]
    assert len(names) == len(ours)
    for n, q in peft_model.named_parameters():
        if ".lora_" in n:
            q.copy_(ours[n.replace(".default", "")])


def _dpo_trainer(
    tmp: Path, model: Any, ref: Any, tok_dir: Path, peft_config: Any = None, **kw: Any
) -> Any:
    args = trl.DPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=len(ROWS), report_to=[],
        use_cpu=True, bf16=False, max_length=None, **kw,
    )  # fmt: skip
    return trl.DPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=datasets.Dataset.from_list(ROWS),
        processing_class=transformers.AutoTokenizer.from_pretrained(tok_dir),
        peft_config=peft_config,
    )


def _trl_dpo_step(trainer: Any) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    m = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    m["loss"] = loss.item()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return m, batch["input_ids"], labels


@pytest.mark.parametrize(
    "loss, smoothing", [("sigmoid", 0.0), ("ipo", 0.0)], ids=["sigmoid", "ipo"]
)
def test_dpo_full_matches_trl(tmp_path, meta_tokenizer_path, loss, smoothing):
    tok = Tokenizer(meta_tokenizer_path)
    base, policy = _model(tok, 0), _model(tok, 0)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf_ref, hf_policy = _hf(tmp_path, base, tok, "ref"), _hf(tmp_path, policy, tok, "policy")
    trainer = _dpo_trainer(
        tmp_path, hf_policy, hf_ref, tmp_path / "ref", beta=0.1, loss_type=[loss]
    )
    theirs, ids, labels = _trl_dpo_step(trainer)
    x, y = _interleave(ids, labels)
    policy.train()
    p = PreferenceSection(beta=0.1, loss=loss, label_smoothing=smoothing)
    ours = _ours(policy, base, x, y, "dpo", p)
    grads = to_hf_state_dict({n: q.grad for n, q in policy.named_parameters()}, policy.args)
    hf_grads = {n: q.grad for n, q in trainer.model.named_parameters()}
    _check(ours, theirs, grads, hf_grads)


def test_dpo_lora_matches_trl_and_peft(tmp_path, meta_tokenizer_path):
    """LoRA on both sides: TRL's reference is the PEFT model with its adapter disabled, ours
    the same model with ``adapters_disabled``."""
    tok = Tokenizer(meta_tokenizer_path)
    base = _model(tok, 0)
    hf_base = _hf(tmp_path, base, tok, "base")
    cfg = LoraConfig(
        enabled=True, targets=["all"], rank=4, alpha=8, dropout=0.0
    )  # TRL: no lm_head adapter
    model = _model(tok, 0)
    apply_lora(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "lora_B" in name:
                q.normal_(0.0, 0.05)
    # a new adapter (TRL's reference is then the base, adapters off), given our A and B
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"
    )
    trainer = _dpo_trainer(tmp_path, hf_base, None, tmp_path / "base", beta=0.2, peft_config=pcfg)
    _copy_adapters(model, trainer.model)
    theirs, ids, labels = _trl_dpo_step(trainer)
    x, y = _interleave(ids, labels)
    model.train()
    ours = _ours(model, None, x, y, "dpo", PreferenceSection(beta=0.2))
    grads = {
        peft_name(n): _permute_b(n, q.grad, model.args, to_hf=True)
        for n, q in model.named_parameters()
        if q.requires_grad
    }
    hf_grads = {
        n.replace(".default", ""): q.grad
        for n, q in trainer.model.named_parameters()
        if q.requires_grad
    }
    _check(ours, theirs, grads, hf_grads)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_simpo_matches_trl_cpo(tmp_path, meta_tokenizer_path, lora):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok = Tokenizer(meta_tokenizer_path)
    policy = _model(tok, 1)
    hf = _hf(tmp_path, policy, tok, "policy")
    if lora:
        cfg = LoraConfig(enabled=True, targets=["all"], rank=4, alpha=8, dropout=0.0)
        apply_lora(policy, cfg)
        with torch.no_grad():
            for name, q in policy.named_parameters():
                if "lora_B" in name:
                    q.normal_(0.0, 0.05)
        adapter = save_adapter(policy, tmp_path / "adapter", cfg, base=tmp_path / "policy_native")
        hf = peft.PeftModel.from_pretrained(hf, adapter, is_trainable=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "policy")
    hf_tok.pad_token = hf_tok.eos_token
    args = CPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(ROWS), report_to=[],
        use_cpu=True, bf16=False, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7,
        max_length=128,
    )  # fmt: skip
    trainer = CPOTrainer(
        model=hf,
        args=args,
        train_dataset=datasets.Dataset.from_list(ROWS),
        processing_class=hf_tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    theirs = {**metrics, "loss": loss.item()}
    cat = trainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
    ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
    assert bool((mask.cumsum(1) == torch.arange(1, mask.shape[1] + 1)).logical_or(mask == 0).all())
    x, y = _interleave(ids, cat["concatenated_labels"])
    policy.train()
    ours = _ours(policy, None, x, y, "simpo", PreferenceSection(beta=2.0, gamma=0.7))
    if lora:
        grads = {
            peft_name(n): _permute_b(n, q.grad, policy.args, to_hf=True)
            for n, q in policy.named_parameters()
            if q.requires_grad
        }
        hf_grads = {
            n.replace(".default", ""): q.grad
            for n, q in trainer.model.named_parameters()
            if q.requires_grad
        }
    else:
        grads = to_hf_state_dict({n: q.grad for n, q in policy.named_parameters()}, policy.args)
        hf_grads = {n: q.grad for n, q in trainer.model.named_parameters()}
    _check(ours, theirs, grads, hf_grads)
