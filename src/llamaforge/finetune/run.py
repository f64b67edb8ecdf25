"""``llamaforge finetune``: instruction finetuning (the paper's LLaMA-I, SPEC §1.8) on the
training core that pretraining uses — the same Trainer, checkpoints, resume, metrics and
parallelism — with instruction data, loss on the assistant's tokens only and optional
packing and LoRA.

The paper gives no recipe for LLaMA-I beyond "Chung et al. (2022)'s protocol". The defaults
here are Stanford Alpaca's for full finetuning of LLaMA (lr 2e-5, cosine to 0, 3 % warmup,
3 epochs, no weight decay, 128 examples per step would be theirs; 64 here), and LoRA's
(lr 2e-4, as in Hu et al. 2021 / QLoRA for small models) when ``lora.enabled``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from llamaforge import parallel as D
from llamaforge.config import ConfigError, setting
from llamaforge.files import atomic_write
from llamaforge.finetune.data import (
    InstructDataConfig,
    InstructDataset,
    PackedLoader,
    PaddedLoader,
    build_dataset,
    read_examples,
)
from llamaforge.finetune.lora import LoraConfig
from llamaforge.model import ModelArgs
from llamaforge.tokenizer import Tokenizer
from llamaforge.training.flops import count_params
from llamaforge.training.optim import cross_entropy
from llamaforge.training.plan import Target
from llamaforge.training.trainer import OptimSection, TrainConfig, Trainer, model_args, run_training

FULL_LR, LORA_LR = 2e-5, 2e-4
MAX_STEPS = 2**31 - 1  # optimizer steps of a run, at most
MAX_BATCH = 1 << 20  # examples (or packed rows) per step, at most


def _finetune_optim() -> OptimSection:
    return OptimSection(lr=0.0, warmup_steps=0, final_lr_ratio=0.0, weight_decay=0.0)


@dataclass
class PreferenceSection:
    """Preference tuning (``method`` dpo or simpo; ``finetune.preference``)."""

    beta: float = setting(0.1, "DPO's β (SimPO: its β, 2.0 in the paper)")
    loss: Literal["sigmoid", "ipo"] = setting("sigmoid", "DPO's loss: sigmoid (DPO) or ipo")
    label_smoothing: float = setting(0.0, "conservative DPO/SimPO: the chance a label is flipped")
    gamma: float = setting(0.5, "SimPO's target reward margin γ (the paper: 0.5 to 1.5)")


@dataclass
class FinetuneConfig(TrainConfig):
    """``TrainConfig`` plus instruction data; ``init`` (the base checkpoint) is required."""

    data: InstructDataConfig = field(default_factory=InstructDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    method: Literal["sft", "dpo", "simpo"] = setting(
        "sft", "sft: instruction finetuning; dpo or simpo: preference pairs ([preference] table)"
    )
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    optim: OptimSection = field(default_factory=_finetune_optim)
    epochs: float = setting(3.0, "passes over the training examples (when steps = 0)")
    steps: int = setting(0, "optimizer steps (0: from epochs and batch_size)")
    batch_size: int = setting(64, "examples per optimizer step (rows of data.max_len packed)")
    batch_tokens: int = setting(0, "derived: batch_size × data.max_len (leave 0)")
    warmup_ratio: float = setting(0.03, "warmup as a fraction of steps (when warmup_steps = 0)")
    micro_batch: int = setting(8, "examples (or packed rows) per rank per forward pass")
    gen_eval: int = setting(16, "held-out examples answered before and after (0: none)")
    gen_max_new_tokens: int = setting(128, "tokens generated per held-out example")
    eval_tasks: str = setting("", "llamaforge eval tasks run before and after, e.g. mmlu")
    eval_shots: int = setting(-1, "shots for eval_tasks (-1: the paper's per task)")
    eval_limit: int = setting(0, "documents per eval task (0: all)")
    eval_data_dir: str = setting("", "benchmark data (default: as llamaforge eval)")
    eval_memory_gib: float = setting(
        0.0,
        "memory the before/after evaluation may use on its one device, GiB (0: the device's); "
        "it is skipped, with the reason, when the whole model does not fit",
    )
    out: str = setting("runs/finetune", "run directory")


# the range of each number a finetuning run takes: (setting, lowest, whether the lowest is
# allowed, highest, whether the highest is allowed); NaN is in none
_RANGES: tuple[tuple[str, float, bool, float, bool], ...] = (
    ("epochs", 0, False, math.inf, False),
    ("steps", 0, True, MAX_STEPS, True),
    ("batch_size", 1, True, MAX_BATCH, True),
    ("micro_batch", 1, True, MAX_BATCH, True),
    ("warmup_ratio", 0, True, 1, False),
    ("gen_eval", 0, True, math.inf, False),
    ("gen_max_new_tokens", 1, True, math.inf, False),
    ("eval_shots", -1, True, math.inf, False),
    ("eval_limit", 0, True, math.inf, False),
    ("eval_memory_gib", 0, True, math.inf, False),
    ("data.max_len", 1, True, math.inf, False),
    ("data.val_fraction", 0, True, 1, False),
    ("data.max_record_bytes", 1, True, math.inf, False),
    ("data.seed", 0, True, math.inf, False),
    ("optim.lr", 0, True, math.inf, False),
    ("optim.warmup_steps", 0, True, math.inf, False),
    ("optim.final_lr_ratio", 0, True, 1, True),
    ("optim.weight_decay", 0, True, math.inf, False),
    ("optim.eps", 0, False, math.inf, False),
    ("optim.clip", 0, False, math.inf, False),
    ("optim.betas[0]", 0, True, 1, False),
    ("optim.betas[1]", 0, True, 1, False),
)


def _interval(low: float, low_in: bool, high: float, high_in: bool) -> str:
    def num(x: float) -> str:
        return str(int(x)) if x == int(x) else f"{x:g}"

    if high == math.inf:
        return f"{'>=' if low_in else '>'} {num(low)}"
    return f"in {'[' if low_in else '('}{num(low)}, {num(high)}{']' if high_in else ')'}"


def _setting(cfg: Any, name: str) -> Any:
    """The value of a dotted setting (``data.max_len``, ``optim.betas[0]``)."""
    value = cfg
    for part in name.replace("[", ".").replace("]", "").split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)
    return value


def check_finetune(cfg: FinetuneConfig) -> None:
    """Raise ConfigError naming the first setting out of its range (``_RANGES``; the setting,
    its value and the range), or ``data.max_len`` past the context of ``init``; the training
    core's own checks (``check_config``) follow. Nothing is read but init's params.json."""
    from llamaforge.training.trainer import check_config

    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas}: expected two numbers")
    for name, low, low_in, high, high_in in _RANGES:
        value = _setting(cfg, name)
        inside = (low <= value if low_in else low < value) and (
            value <= high if high_in else value < high
        )
        if not inside:  # NaN too
            finite = "" if math.isfinite(value) else "finite "
            raise ConfigError(
                f"{name}={value!r}: expected a {finite}number "
                f"{_interval(low, low_in, high, high_in)}"
            )
    if cfg.batch_tokens:
        raise ConfigError("batch_tokens: finetuning counts examples; set batch_size instead")
    if cfg.lora.enabled:
        cfg.lora.validate()
    check_config(dataclasses.replace(cfg, steps=max(1, cfg.steps)))  # steps=0: from epochs
    check_context(cfg)


def check_context(cfg: FinetuneConfig) -> None:
    """A ConfigError when ``data.max_len`` is longer than the context the model has: init's
    params.json ``max_seq_len``, unless ``model.max_seq_len`` extends it on purpose."""
    from llamaforge.checkpoint.native import PARAMS_FILE, read_params

    if not cfg.init or not (Path(cfg.init) / PARAMS_FILE).is_file():
        return  # base_tokenizer and the plan name what is missing
    trained = read_params(cfg.init)[0].max_seq_len
    context = cfg.model.max_seq_len or trained
    if cfg.data.max_len > context:
        which = (
            f"model.max_seq_len={context}"
            if cfg.model.max_seq_len
            else f"max_seq_len={trained} of {Path(cfg.init) / PARAMS_FILE}"
        )
        raise ConfigError(
            f"data.max_len={cfg.data.max_len} is longer than the model's context ({which}); "
            f"set data.max_len <= {context}, or model.max_seq_len to train past the context "
            "init was trained for"
        )


def resolve(cfg: FinetuneConfig, units: int, world_size: int) -> FinetuneConfig:
    """Derive batch_tokens, steps and warmup from ``units`` rows an epoch
    (``units_per_epoch``), after ``check_finetune``; errors name the setting."""
    check_finetune(cfg)
    rows = cfg.micro_batch * world_size
    if cfg.batch_size <= 0 or cfg.batch_size % rows:
        raise ConfigError(
            f"batch_size={cfg.batch_size} must be a positive multiple of micro_batch × "
            f"world_size = {rows}"
        )
    steps, warmup, lr = schedule(cfg, units)
    optim = dataclasses.replace(cfg.optim, warmup_steps=warmup, lr=lr)
    return dataclasses.replace(
        cfg, steps=steps, batch_tokens=cfg.batch_size * cfg.data.max_len, optim=optim
    )


def schedule(cfg: FinetuneConfig, units: int) -> tuple[int, int, float]:
    """(steps, warmup steps, peak lr) of a run over ``units`` rows an epoch: ``steps`` or
    ``epochs`` passes of ``batch_size`` rows; ``optim.warmup_steps`` or ``warmup_ratio`` of
    the steps; ``optim.lr`` or the LoRA / full finetuning default."""
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * units / cfg.batch_size))
    if steps > MAX_STEPS:
        raise ConfigError(
            f"epochs={cfg.epochs:g}: {steps} optimizer steps of batch_size={cfg.batch_size} "
            f"over {units} rows an epoch; at most {MAX_STEPS}"
        )
    warmup = cfg.optim.warmup_steps or round(cfg.warmup_ratio * steps)
    lr = cfg.optim.lr or (LORA_LR if cfg.lora.enabled else FULL_LR)
    return steps, warmup, lr


def units_per_epoch(dataset: InstructDataset, cfg: FinetuneConfig) -> int:
    """Rows an epoch takes: one per example, or the packed rows (packing of epoch 0)."""
    if cfg.data.packing:
        return len(PackedLoader(dataset.train, 1, cfg.data.max_len)._units(0))
    return len(dataset.train)


def base_tokenizer(cfg: FinetuneConfig) -> Tokenizer:
    """The tokenizer of the base checkpoint ``init``; a ConfigError when ``init`` is not set
    or is not a native checkpoint."""
    from llamaforge.checkpoint.native import read_params

    if not cfg.init:
        raise ConfigError("init: set the base model, a native checkpoint directory (init=DIR)")
    if not Path(cfg.init).is_dir():
        raise ConfigError(f"init={cfg.init!r}: no such checkpoint directory")
    tok_path = Path(cfg.init) / "tokenizer.model"
    if not tok_path.is_file():
        raise ConfigError(f"init={cfg.init!r}: no tokenizer.model in the base checkpoint")
    read_params(cfg.init)  # a clear error for a directory that is not a checkpoint
    return Tokenizer(tok_path)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Finetune ``cfg.init`` on ``cfg.data``; returns the summary (with before/after
    evaluations when asked, or the reason they were skipped)."""
    if cfg.method != "sft":
        raise ConfigError(
            f"method={cfg.method!r}: preference tuning runs in "
            "llamaforge.finetune.preference.run_preference (llamaforge finetune calls it)"
        )
    tok = base_tokenizer(cfg)
    check_finetune(cfg)  # before the data is read
    dataset = build_dataset(cfg.data, tok)
    info = D.init(cfg.device)
    try:
        cfg = resolve(cfg, units_per_epoch(dataset, cfg), info.world_size)
        args = model_args(cfg, tok.vocab_size, cfg.data.max_len)
        summary = _train(cfg, info, args, tok, dataset)
    finally:
        D.cleanup()
    summary["data"] = dataset.report
    summary["next"] = next_step(cfg, summary)
    if info.is_main:
        if summary.get("model") or summary.get("adapter"):
            summary["evaluation"] = _before_after(cfg, args, dataset, summary)
        atomic_write(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2) + "\n")
        if summary["next"]:  # after the evaluation: the run's last line
            D.print0(f"next: {summary['next']}")
    return summary


def _train(
    cfg: FinetuneConfig, info: D.DistInfo, args: ModelArgs, tok: Tokenizer, dataset: InstructDataset
) -> dict[str, Any]:
    """The training run; its model and optimizer are freed when it returns."""
    seq_len = cfg.data.max_len
    common: dict[str, Any] = dict(rank=info.rank, world_size=info.world_size,
                                  seed=cfg.data.seed, device=info.device)  # fmt: skip
    loader: PackedLoader | PaddedLoader
    if cfg.data.packing:
        loader = PackedLoader(dataset.train, cfg.batch_size, seq_len, **common)
    else:  # each rank reads its contiguous part of every global batch
        loader = PaddedLoader(dataset.train, cfg.batch_size, **common)
    trainer = FinetuneTrainer(
        cfg,
        info,
        args=args,
        seq_len=seq_len,
        loader=loader,
        val_batches=validation_batches(dataset, cfg),
        **trainer_options(cfg),
    )
    D.print0(_describe_data(dataset, cfg))
    return run_training(trainer, tokenizer=tok, epochs=lambda: loader.epoch)


def trainer_options(cfg: FinetuneConfig, *, plan: bool = False) -> dict[str, Any]:
    """What a finetuning Trainer is given besides its data: the masked loss, logits at
    trained positions only and the LoRA hooks. ``plan``: an nf4 base is built as int8 (the
    same layers; bitsandbytes and a GPU are not needed to plan it)."""
    if plan and cfg.lora.quantize == "nf4":
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, quantize="int8"))
    return dict(
        loss_fn=cross_entropy,
        all_targets_count=False,  # prompt and padding targets are -100
        logits_where_trained=True,
        name="finetune",
        **lora_hooks(cfg),
    )


def next_step(cfg: FinetuneConfig, summary: dict[str, Any]) -> str | None:
    """The command line that chats with what the run made: the finetuned model, or an
    unmerged adapter once ``llamaforge lora merge`` has folded it into the base."""
    import shlex

    from llamaforge.inference.chat import next_command

    if summary.get("model"):
        return next_command(summary["model"])
    if not summary.get("adapter"):
        return None
    merged = str(Path(cfg.out) / "merged")
    merge = ["llamaforge", "lora", "merge", cfg.init, summary["adapter"], merged]
    # the merged model has the base's chat template, if any: name the one trained with
    chat = ["llamaforge", "chat", "--ckpt", merged, "--template", cfg.data.template]
    return f"{shlex.join(merge)} && {shlex.join(chat)}"


def lora_hooks(cfg: FinetuneConfig) -> dict[str, Any]:
    """The trainer's hooks for LoRA: adapters added on the meta device, initialised once
    the base weights are in (B = 0, so training starts from the base exactly)."""
    if not cfg.lora.enabled:
        return {}
    from llamaforge.finetune.lora import apply_lora, init_lora_, load_base_state_dict

    return {
        "prepare_model": lambda model: apply_lora(model, cfg.lora),
        "load_state": load_base_state_dict,  # a quantised base sharded by FSDP2 loads whole
        "after_init": lambda model: init_lora_(model, cfg.seed),
    }


def plan_finetune(
    cfg: FinetuneConfig, target: Target, *, examples: int | None = None, preset: str | None = None
) -> dict[str, Any]:
    """The plan of ``llamaforge finetune`` with ``cfg`` on ``target`` (``training.plan``):
    the data read and tokenized as the run reads it (or ``examples`` stated instead, each
    taken as ``data.max_len`` positions: an upper bound on the tokens), the schedule from
    ``resolve``, the model from init's params.json or ``preset``, and whether the
    before/after evaluation fits one GPU."""
    from llamaforge.presets import get_preset
    from llamaforge.training.plan import NoData, planned_model, planning_info, training_plan

    check_finetune(cfg)
    planned, source = planned_model(cfg, preset)
    tok = Tokenizer(Path(cfg.init) / "tokenizer.model") if planned.init else None
    dataset = None
    if examples is not None:
        if examples < 1:
            raise ValueError(f"--examples {examples}: expected at least 1")
        units, epoch_tokens = examples, examples * cfg.data.max_len
    elif tok is None:
        raise ConfigError(
            f"init={cfg.init!r}: no tokenizer.model to read data.paths with; state the number "
            "of training examples with --examples N"
        )
    else:
        dataset = build_dataset(cfg.data, tok)
        units, epoch_tokens = units_per_epoch(dataset, cfg), dataset.report["train"]["positions"]
    resolved = resolve(planned, units, target.world_size)
    vocab = tok.vocab_size if tok is not None else get_preset(resolved.model.preset).vocab_size
    args = model_args(resolved, vocab, resolved.data.max_len)
    trainer = FinetuneTrainer(
        resolved,
        planning_info(resolved, target.world_size),
        args=args,
        seq_len=resolved.data.max_len,
        loader=NoData(),
        **trainer_options(resolved, plan=True),
    )
    epochs = resolved.steps * resolved.batch_size / units
    if dataset is not None:
        data: dict[str, Any] = {
            "report": dataset.report,
            "lines": [_describe_data(dataset, resolved)],
        }
    else:
        data = {
            "examples": examples,
            "upper_bound": True,
            "lines": [
                f"{examples:,} examples stated (--examples; data.paths not read), each taken as "
                f"{cfg.data.max_len} positions: the tokens are an upper bound"
            ],
        }
    plan = training_plan(
        trainer,
        target,
        model_source=source,
        tokens=epochs * epoch_tokens,
        data=data,
        buffer_bytes=_nf4_bytes if resolved.lora.quantize == "nf4" else None,
    )
    plan["epochs"] = epochs
    spec = target.spec()
    memory, where = target.memory_bytes(spec), f"one {spec.name}"
    plan["evaluation"] = evaluation_plan(resolved, args, memory, where)
    return plan


def _nf4_bytes(model: torch.nn.Module) -> int:
    """The buffers of a planning model whose quantised base was built as int8, priced as
    nf4 (``plan_finetune``)."""
    from llamaforge.finetune.lora import QuantLinear
    from llamaforge.training.flops import quantized_weight_bytes

    return sum(
        quantized_weight_bytes(m.in_features * m.out_features, m.out_features, "nf4")
        for m in model.modules()
        if isinstance(m, QuantLinear) and m.quantize != "none"
    )


class FinetuneTrainer(Trainer):
    """Exports what a finetuning run makes: the finetuned model (full finetuning, or LoRA
    merged into the base) and, with LoRA, the adapter in PEFT's format; the base's identity
    and the chat template go with them."""

    cfg: FinetuneConfig

    def next_step(self, summary: dict[str, Any]) -> str | None:
        return None  # run_finetune prints it after the evaluation

    def export(self, model_dir: Path, tokenizer: Any, extra: dict[str, Any]) -> Path | None:
        """Every rank calls it. The base's ``weights_sha256`` is its recorded value, or each
        rank hashes its share of the base's files. With LoRA the adapters are gathered and
        rank 0 writes the adapter and, with ``lora.merge``, folds it into the base's files
        shard by shard (``finetune.merge``) while the other ranks go on: none waits in a
        collective for it. Full finetuning gathers the model and rank 0 saves it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from llamaforge.chat_templates import load_template
        from llamaforge.checkpoint.native import save_state
        from llamaforge.finetune.lora import save_adapter
        from llamaforge.finetune.merge import merge_adapter, shared_weights_sha256

        cfg = self.cfg
        base_sha = shared_weights_sha256(cfg.init, self.info)
        extra = {
            **extra,
            "finetune": {
                **extra.get("finetune", {}),
                "base": str(cfg.init),
                "base_sha256": base_sha,
                "template": cfg.data.template,
                "lora": dataclasses.asdict(cfg.lora) if cfg.lora.enabled else None,
            },
        }
        template = load_template(cfg.data.template).source
        if cfg.lora.enabled:
            adapter = save_adapter(
                self.model,
                self.out / "adapter",
                cfg.lora,
                base=cfg.init,
                base_sha256=base_sha,
                overwrite=True,
            )
            self.outputs["adapter"] = str(adapter)
            if not cfg.lora.merge:
                return None
            if self.info.is_main:
                merge_adapter(
                    cfg.init,
                    adapter,
                    model_dir,
                    overwrite=True,
                    extra=extra,
                    chat_template=template,
                    base_sha256=base_sha,
                )
            return model_dir
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.info.is_main:
            save_state(
                full.items(),
                self.args,
                tokenizer,
                model_dir,
                overwrite=True,
                extra=extra,
                chat_template=template,
            )
        D.barrier()
        return model_dir


def validation_batches(dataset: InstructDataset, cfg: FinetuneConfig) -> list[Any]:
    """Padded batches of the held-out examples, in order (at most ``eval_batches``)."""
    if not dataset.val or cfg.eval_batches <= 0:
        return []
    loader = PaddedLoader(dataset.val, cfg.micro_batch, shuffle=False)
    n = min(cfg.eval_batches, math.ceil(len(dataset.val) / cfg.micro_batch))
    return [next(loader) for _ in range(n)]


def _describe_data(dataset: InstructDataset, cfg: FinetuneConfig) -> str:
    t, v, c = dataset.report["train"], dataset.report["val"], dataset.report["counts"]
    return (
        f"instruction data: {t['examples']} train / {v['examples']} held-out examples, "
        f"{t['trained_tokens']:,} trained tokens; template {cfg.data.template}, "
        f"{'packed' if cfg.data.packing else 'padded'} rows of ≤ {cfg.data.max_len}; "
        f"{c.get('truncated', 0)} truncated, {c.get('dropped_overlong', 0)} dropped; "
        f"{cfg.steps} steps of {cfg.batch_size} {'rows' if cfg.data.packing else 'examples'} "
        f"({cfg.steps * cfg.batch_size / max(1, units_per_epoch(dataset, cfg)):.2f} epochs)"
    )


# -- before and after ---------------------------------------------------------------------


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def answer_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (whitespace and case normalised) and SQuAD-style token F1, averaged."""
    em, f1 = 0.0, 0.0
    for p, r in zip(predictions, references):
        pn, rn = _normalise(p), _normalise(r)
        em += float(pn == rn)
        pt, rt = pn.split(), rn.split()
        common = sum(min(pt.count(w), rt.count(w)) for w in set(pt))
        if pt and rt and common:
            prec, rec = common / len(pt), common / len(rt)
            f1 += 2 * prec * rec / (prec + rec)
        else:
            f1 += float(pt == rt)
    n = max(1, len(predictions))
    return {"exact_match": em / n, "f1": f1 / n, "n": len(predictions)}


def generation_eval(
    ckpt: Path,
    examples: list[list[dict[str, str]]],
    template: str,
    max_new_tokens: int,
    adapter: Path | None = None,
) -> dict[str, Any]:
    """Greedy answers of the checkpoint (with ``adapter`` applied, if given) to held-out
    conversations (their last assistant turn is the reference): exact match, token F1."""
    from llamaforge.chat_templates import encode_text, load_template
    from llamaforge.checkpoint.native import load
    from llamaforge.device import resolve_device
    from llamaforge.finetune.lora import load_adapter
    from llamaforge.inference.generate import generate_completions

    model, tok = load(ckpt, device=resolve_device("auto"))
    if adapter is not None:
        load_adapter(model, adapter)
    tpl = load_template(template)
    prompts, refs = [], []
    for messages in examples:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        text = tpl.render(messages[:last], add_generation_prompt=True)
        prompts.append(encode_text(tok, text))
        refs.append(messages[last]["content"])
    done = generate_completions(
        model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.0, truncate=True
    )
    preds = [c.text for c in done]
    return {
        **answer_scores(preds, refs),
        "samples": [{"reference": r, "prediction": p} for r, p in zip(refs[:3], preds[:3])],
    }


def held_out_conversations(cfg: FinetuneConfig, dataset: InstructDataset) -> list[Any]:
    """The conversations of the first ``gen_eval`` held-out examples (by source tag)."""
    wanted = {e.source for e in dataset.val[: cfg.gen_eval]}
    found: dict[str, list[dict[str, str]]] = {}
    for p in cfg.data.paths:
        read = read_examples(
            p,
            cfg.data.format,
            skip_bad=True,
            split=cfg.data.split,
            max_record_bytes=cfg.data.max_record_bytes,
        )
        for ex in read.examples:
            if ex.source in wanted:
                found[ex.source] = [dict(m) for m in ex.messages]
    return [found[e.source] for e in dataset.val[: cfg.gen_eval] if e.source in found]


def evaluate_before_after(
    cfg: FinetuneConfig, dataset: InstructDataset, summary: dict[str, Any]
) -> dict[str, Any]:
    """Held-out answers and ``eval_tasks`` for the base and the finetuned model."""
    base = Path(cfg.init)
    after = Path(summary["model"]) if summary.get("model") else base
    adapter = Path(summary["adapter"]) if not summary.get("model") else None
    out: dict[str, Any] = {}
    held = held_out_conversations(cfg, dataset) if cfg.gen_eval > 0 else []
    if held:
        t0 = time.perf_counter()
        n = cfg.gen_max_new_tokens
        out["held_out"] = {
            "before": generation_eval(base, held, cfg.data.template, n),
            "after": generation_eval(after, held, cfg.data.template, n, adapter),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    if cfg.eval_tasks:
        if adapter is not None:
            D.print0("eval_tasks: skipped for an unmerged adapter (set lora.merge=true)")
        else:
            out["tasks"] = {"before": _eval_tasks(base, cfg), "after": _eval_tasks(after, cfg)}
    if out:
        D.print0(format_evaluation(out))
    return out


def evaluation_plan(
    cfg: FinetuneConfig, args: ModelArgs, limit: int, where: str, base_dtype: str | None = None
) -> dict[str, Any]:
    """Whether the before/after evaluation fits: it loads each model whole on one device —
    the base in its stored dtype (``base_dtype``, default init's params.json, else
    bfloat16), the finetuned model as exported (fp32, the master weights; or the base plus
    an unmerged adapter) — with the cache of ``gen_eval`` answers. ``skip`` is the line
    printed instead of running it when that is more than 90 % of ``limit`` bytes."""
    from llamaforge.training.flops import inference_memory
    from llamaforge.training.plan import MARGIN
    from llamaforge.units import human_bytes, human_count

    if cfg.gen_eval <= 0 and not cfg.eval_tasks:
        return {
            "needed": 0,
            "limit": limit,
            "skip": None,
            "line": "none (gen_eval=0, no eval_tasks)",
        }
    if base_dtype is None:
        base_dtype = "bfloat16"
        if cfg.init and (Path(cfg.init) / "params.json").is_file():
            from llamaforge.checkpoint.native import read_params

            base_dtype = str(read_params(cfg.init)[1].get("dtype", base_dtype))
    exported = not cfg.lora.enabled or cfg.lora.merge
    dtype = "float32" if exported else base_dtype
    size = max(getattr(torch, dtype).itemsize, getattr(torch, base_dtype).itemsize)
    length = min(args.max_seq_len, cfg.data.max_len + cfg.gen_max_new_tokens)
    needed = inference_memory(args, dtype_bytes=size, batch=max(1, cfg.gen_eval), length=length)
    what = (
        f"the whole {human_count(count_params(args)['total'])}-parameter model on one device "
        f"({dtype} weights and the answers' cache: {human_bytes(needed)})"
    )
    if needed <= MARGIN * limit:
        line = f"before and after on one device: {what}, within {human_bytes(limit)} ({where})"
        return {"needed": needed, "limit": limit, "skip": None, "line": line}
    skip = (
        f"before/after evaluation skipped: it needs {what}, more than 90 % of "
        f"{human_bytes(limit)} ({where}); evaluate {cfg.out}/model apart on a larger device"
    )
    return {"needed": needed, "limit": limit, "skip": skip, "line": skip}


def _before_after(
    cfg: FinetuneConfig, args: ModelArgs, dataset: InstructDataset, summary: dict[str, Any]
) -> dict[str, Any]:
    """``evaluate_before_after`` on this process's device when the model fits it, else
    ``{"skipped": reason}`` and the reason printed."""
    import gc

    from llamaforge.device import device_memory_bytes, device_name, resolve_device

    gc.collect()  # the training run's model and optimizer
    device = resolve_device("auto")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if cfg.eval_memory_gib > 0:
        limit, where = (
            int(cfg.eval_memory_gib * 1024**3),
            f"eval_memory_gib={cfg.eval_memory_gib:g}",
        )
    else:
        limit, where = device_memory_bytes(device), device_name(device)
    plan = evaluation_plan(cfg, args, limit, where)
    if plan["skip"]:
        D.print0(plan["skip"])
        return {"skipped": plan["skip"]}
    return evaluate_before_after(cfg, dataset, summary)


def _eval_tasks(ckpt: Path, cfg: FinetuneConfig) -> dict[str, Any]:
    from llamaforge.eval.hub import default_data_dir
    from llamaforge.eval.lm import LlamaforgeLM
    from llamaforge.eval.runner import evaluate

    lm = LlamaforgeLM.from_checkpoint(ckpt, progress=False)
    data_dir = Path(cfg.eval_data_dir) if cfg.eval_data_dir else default_data_dir()
    results = evaluate(
        lm,
        [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()],
        data_dir,
        shots=None if cfg.eval_shots < 0 else cfg.eval_shots,
        limit=cfg.eval_limit or None,
        progress=False,
    )
    out = {}
    for name, r in results["tasks"].items():
        m = r["metrics"][r["main_metric"]]
        value = m["value"] if isinstance(m, dict) else m
        out[name] = {"metric": r["main_metric"], "value": value, "n": r["n_docs"]}
    return out


def format_evaluation(ev: dict[str, Any]) -> str:
    lines = []
    if "held_out" in ev:
        b, a = ev["held_out"]["before"], ev["held_out"]["after"]
        lines.append(
            f"held-out instructions ({a['n']}): exact match {b['exact_match']:.1%} → "
            f"{a['exact_match']:.1%}, token F1 {b['f1']:.3f} → {a['f1']:.3f}"
        )
    for name, after in ev.get("tasks", {}).get("after", {}).items():
        before = ev["tasks"]["before"][name]
        lines.append(
            f"{name} {after['metric']} ({after['n']} docs): {before['value']:.4f} → "
            f"{after['value']:.4f}"
        )
    return "\n".join(lines)
