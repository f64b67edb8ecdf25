"""Config sections keep the command's own defaults, and every shipped config resolves to
the values its comments promise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llamaforge.config import apply_overrides, load_config
from llamaforge.finetune.run import schedule

REPO = Path(__file__).parents[1]


def _command_configs() -> dict[str, type]:
    from llamaforge.data.prepare import DataConfig
    from llamaforge.demos.instruct import QuickstartInstructConfig
    from llamaforge.demos.quickstart import QuickstartConfig
    from llamaforge.finetune.run import FinetuneConfig
    from llamaforge.training.pretrain import PretrainConfig

    return {
        "pretrain": PretrainConfig,
        "finetune": FinetuneConfig,
        "quickstart": QuickstartConfig,
        "quickstart-instruct": QuickstartInstructConfig,
        "data": DataConfig,
    }


def _one_key_per_section() -> list[tuple[str, str, str]]:
    """(command, section, key) for every key of every table section of every command."""
    cases = []
    for command, cls in _command_configs().items():
        default = cls()
        for f in dataclasses.fields(default):
            section = getattr(default, f.name)
            if not dataclasses.is_dataclass(section):
                continue
            for g in dataclasses.fields(section):
                value = getattr(section, g.name)
                if value is not None and not dataclasses.is_dataclass(value):
                    cases.append((command, f.name, g.name))
    return cases


def _toml_literal(value) -> str:
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)  # strings, numbers, booleans and lists of them are TOML too


@pytest.mark.parametrize(("command", "section", "key"), _one_key_per_section())
def test_a_partial_table_changes_only_the_key_it_names(tmp_path, command, section, key):
    cls = _command_configs()[command]
    default = cls()
    value = getattr(getattr(default, section), key)
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{key} = {_toml_literal(value)}\n")
    # the table names one key at its command default: nothing else may change
    assert load_config(cls, path) == default
    assert apply_overrides(default, [f"{section}={{{key} = {_toml_literal(value)}}}"]) == default
    assert apply_overrides(default, [f"{section}.{key}={_toml_literal(value)}"]) == default


def test_finetune_optim_table_keeps_the_finetuning_recipe(tmp_path):
    from llamaforge.finetune.run import FinetuneConfig

    path = tmp_path / "ft.toml"
    path.write_text('init = "x"\n[optim]\nlr = 1e-3\n')
    cfg = load_config(FinetuneConfig, path)
    assert cfg.optim.lr == 1e-3
    assert (cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.final_lr_ratio) == (0, 0, 0)
    assert cfg.optim.betas == FinetuneConfig().optim.betas


def _finetune(name: str):
    """A shipped finetuning config as loaded (before the run derives its schedule)."""
    from llamaforge.finetune.run import FinetuneConfig

    return load_config(FinetuneConfig, REPO / "configs" / "finetune" / name)


def test_llama_7b_alpaca_is_alpacas_recipe():
    # comments: lr 2e-5, cosine to 0 with 3 % warmup, 3 epochs, batch 128, no weight decay,
    # 512-token examples, FSDP2 in bf16, MMLU before and after
    cfg = _finetune("llama-7B-alpaca.toml")
    assert cfg.optim.lr == 2e-5 and cfg.optim.final_lr_ratio == 0.0
    assert cfg.optim.weight_decay == 0.0 and cfg.warmup_ratio == 0.03
    assert cfg.epochs == 3.0 and cfg.batch_size == 128 and cfg.data.max_len == 512
    assert cfg.parallel.data == "fsdp" and cfg.dtype in ("bf16", "auto")
    assert cfg.eval_tasks == "mmlu" and not cfg.lora.enabled
    steps, warmup, _ = schedule(cfg, 52_002)  # Alpaca's examples
    assert steps == 1219 and warmup == 37  # 3 % of the steps, not the pretraining 2000


def test_llama_7b_lora_keeps_the_lora_recipe():
    # comments: rank 16 on every linear layer, lr 2e-4, PEFT adapter, merged model
    cfg = _finetune("llama-7B-lora.toml")
    assert cfg.lora.enabled and cfg.lora.rank == 16 and cfg.lora.targets == "all"
    assert cfg.lora.merge and cfg.optim.lr == 2e-4
    assert (cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.final_lr_ratio) == (0, 0, 0)
    steps, warmup, lr = schedule(cfg, 52_002)
    assert steps == 2438 and warmup == 73 and lr == 2e-4  # was 2000 warmup steps of 2438


def test_tiny_cpu_finetune_keeps_the_finetuning_recipe():
    # comments: the quickstart model, llama2 template, packed rows, lr 1e-3
    cfg = _finetune("tiny-cpu.toml")
    assert cfg.init == "runs/quickstart/model" and cfg.data.template == "llama2"
    assert cfg.data.packing and cfg.data.max_len == 256 and cfg.optim.lr == 1e-3
    assert (cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.final_lr_ratio) == (0, 0, 0)


@pytest.mark.parametrize("size", ["7B", "13B", "33B", "65B"])
def test_pretrain_configs_keep_the_papers_recipe(size):
    # comments: AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0, 2000 warmup, cosine to 10 %
    from llamaforge.training.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / f"llama-{size}.toml")
    o = cfg.optim
    assert list(o.betas) == [0.9, 0.95] and o.weight_decay == 0.1 and o.clip == 1.0
    assert o.warmup_steps == 2000 and o.final_lr_ratio == 0.1 and cfg.dtype == "bf16"


def test_quickstart_toml_keeps_pretrain_defaults_for_unnamed_keys():
    from llamaforge.demos.quickstart import CONFIG_FILE, QuickstartConfig
    from llamaforge.training.pretrain import PretrainConfig

    cfg = load_config(QuickstartConfig, CONFIG_FILE)
    assert cfg.optim.lr == 3e-3 and cfg.optim.warmup_steps == 40
    assert cfg.optim.weight_decay == PretrainConfig().optim.weight_decay
    assert cfg.model.max_seq_len == 256 and cfg.data.seq_len == 256
