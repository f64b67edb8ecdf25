"""``llamaforge finetune`` end to end on a tiny base: full finetuning and LoRA through the
CLI, packed batches equal to unpacked ones, resume after a stop, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.cli.main import main
from llamaforge.training.optim import cross_entropy

COLOURS = "red green blue black white yellow brown pink".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_tokenizer_path) -> Path:
    out = tmp_path_factory.mktemp("ft") / "base"
    argv = ["init", "--preset", "1M", "--tokenizer", str(small_tokenizer_path), "--out", str(out)]
    assert main([*argv, "dim=64", "n_layers=2", "n_heads=4", "max_seq_len=128"]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Alpaca-style records: 'Repeat the colour X.' → 'X'."""
    rows = []
    for i in range(48):
        c = COLOURS[i % len(COLOURS)]
        rows.append({"instruction": f"Repeat the word {c}, example {i}.", "input": "", "output": c})
    path = tmp_path_factory.mktemp("ftdata") / "repeat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        f"init={base}",
        f"data.paths=['{data}']",
        "data.max_len=128",
        "data.val_fraction=0.2",
        "batch_size=8",
        "micro_batch=4",
        "steps=4",
        "gen_eval=3",
        "gen_max_new_tokens=4",
        "eval_batches=2",
        "checkpoint.every=2",
        "device=cpu",
        "progress=false",
        f"--out={out}",
        *extra,
    ]


def test_full_finetune_from_the_cli(base, data, tmp_path, capsys):
    out = tmp_path / "full"
    assert main(args(base, data, out)) == 0
    err = capsys.readouterr().err
    assert "held-out instructions" in err and "exact match" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and summary["model"] == str(out / "model")
    assert summary["data"]["train"]["examples"] + summary["data"]["val"]["examples"] == 48
    ev = summary["evaluation"]["held_out"]
    assert ev["before"]["n"] == ev["after"]["n"] > 0
    params = json.loads((out / "model" / "params.json").read_text())
    ft = params["llamaforge"]["finetune"]
    from llamaforge.checkpoint.native import weights_sha256

    assert ft["base"] == str(base) and ft["base_sha256"] == weights_sha256(base)
    from llamaforge.chat_templates import load_template
    from llamaforge.checkpoint.native import read_chat_template

    assert read_chat_template(out / "model") == load_template("alpaca").source
    model, _ = llamaforge.load(out / "model")
    base_model, _ = llamaforge.load(base)
    changed = [
        n
        for (n, p), q in zip(model.named_parameters(), base_model.parameters())
        if not torch.equal(p, q)
    ]
    assert changed  # full finetuning moved the weights
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "val_loss" in rows[-1]


def test_lora_trains_only_adapters_and_merges(base, data, tmp_path):
    out = tmp_path / "lora"
    extra = ("lora.enabled=true", "lora.rank=4", "lora.merge=true", "optim.lr=1e-2")
    assert main(args(base, data, out, *extra)) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    # training checkpoints hold the adapters (and their AdamW states), not the frozen base
    import torch.distributed.checkpoint as dcp

    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    keys = list(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert len(model_keys) == 2 * 2 * 4  # A and B of wq wk wv wo in 2 layers
    assert all(".lora_" in k for k in keys if k.startswith(("model.", "optim.state.")))
    # the merged model equals base + adapter
    from llamaforge.finetune.lora import load_adapter

    merged, _ = llamaforge.load(out / "model")
    ref, _ = llamaforge.load(base)
    load_adapter(ref, out / "adapter")
    x = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref.eval()(x), rtol=1e-4, atol=1e-4)
    # unmerged: an adapter and no model
    out2 = tmp_path / "lora2"
    assert main(args(base, data, out2, "lora.enabled=true", "lora.rank=4")) == 0
    assert (out2 / "adapter").is_dir() and not (out2 / "model").exists()


def test_stop_and_resume_is_bitwise_identical_with_lora(base, data, tmp_path):
    extra = ("lora.enabled=true", "lora.rank=4", "gen_eval=0", "steps=6")
    straight = tmp_path / "straight"
    assert main(args(base, data, straight, *extra)) == 0
    stopped = tmp_path / "stopped"
    assert main(args(base, data, stopped, *extra, "stop_at=2")) == 0
    assert main(args(base, data, stopped, *extra)) == 0

    def losses(out: Path) -> dict[int, float]:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}

    assert losses(stopped) == losses(straight)


def test_packed_batches_give_the_unpacked_loss_and_gradients(small_tokenizer):
    from llamaforge.finetune.data import Example, PackedLoader, PaddedLoader, tokenize_examples
    from llamaforge.model import ModelArgs, build_model

    examples = [
        Example(
            messages=[
                {"role": "user", "content": f"Say {c} {'please ' * (i % 3)}"},
                {"role": "assistant", "content": f"{c} " * (1 + i % 4)},
            ],
            source=f"t:{i}",
        )
        for i, c in enumerate(COLOURS)
    ]
    tokenized = tokenize_examples(examples, small_tokenizer, "alpaca", max_len=120)
    torch.manual_seed(0)
    model = build_model(
        ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16)
    )

    def loss_and_grads(batch):
        x, y, *extras = batch
        model.zero_grad()
        loss, n = cross_entropy(model(x, **(extras[0] if extras else {})), y)
        (loss / n).backward()
        return loss.item(), int(n), [p.grad.clone() for p in model.parameters()]

    n = len(tokenized)
    padded = loss_and_grads(next(PaddedLoader(tokenized, n, shuffle=False)))
    rows = PackedLoader(tokenized, 1, 256, shuffle=False)._units(0)
    assert len(rows) < n  # several examples share a row
    packed = loss_and_grads(next(PackedLoader(tokenized, len(rows), 256, shuffle=False)))
    assert packed[1] == padded[1]  # the same trained tokens
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    for g_packed, g_padded in zip(packed[2], padded[2]):
        torch.testing.assert_close(g_packed, g_padded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("init=",), "init: set the base model"),
        (("init=/nonexistent/base",), "/nonexistent/base"),
        (("lora.enabled=true", "lora.rank=0"), "lora.rank=0"),
        (("lora.enabled=true", "lora.targets=['wz']"), "wz"),
        (("data.template=chatml-unknown",), "chatml-unknown"),
        (("batch_size=6",), "batch_size=6"),
        (("data.paths=['/nonexistent.jsonl']",), "/nonexistent.jsonl"),
    ],
)
def test_bad_settings_are_clear_errors(base, data, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    assert main(args(base, data, out, *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (out / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_match_one_and_resume_on_one(base, data, tmp_path, lora):
    """FSDP2 over 2 ranks (targets counted on the device and summed) equals 1 process, and
    its checkpoint resumes in 1 process; LoRA without dropout, whose masks are per rank."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    extra = ["gen_eval=0", "steps=4"]
    if lora:
        extra += ["lora.enabled=true", "lora.rank=4", "lora.dropout=0"]

    def run(out: Path, nproc: int, *more: str) -> dict[int, float]:
        port = str(29500 + (os.getpid() + 11 + nproc) % 1000)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                    str(nproc), "--master_port", port]  # fmt: skip
        cmd = [*launcher, "-m", "llamaforge", *args(base, data, out, *extra, *more)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}

    one = run(tmp_path / "one", 1)
    assert run(tmp_path / "two", 2, "stop_at=2").keys() == {1, 2}
    two_then_one = run(tmp_path / "two", 1)  # resumed from the 2-rank checkpoint at step 2
    assert one.keys() == two_then_one.keys() == {1, 2, 3, 4}
    for step in one:
        assert two_then_one[step] == pytest.approx(one[step], abs=1e-4), step


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs" / "finetune").glob("*.toml")), ids=str
)
def test_shipped_finetune_configs_load(path):
    from llamaforge.config import load_config
    from llamaforge.finetune.run import FinetuneConfig

    cfg = load_config(FinetuneConfig, path)
    assert cfg.init and cfg.data.paths and cfg.batch_size % cfg.micro_batch == 0
    if cfg.lora.enabled:
        cfg.lora.validate()


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_tokens_count_the_real_tokens_of_rows_of_very_different_lengths(
    base, tmp_path, small_tokenizer, packing
):
    """metrics.jsonl's tokens (and tokens_per_s, mfu) count what the rows hold, not
    batch_size × max_len nor the padded width: a step over the whole data set (one epoch)
    reports the sum of the examples' lengths."""
    from llamaforge.finetune.data import InstructDataConfig, PackedLoader, build_dataset

    rows = [
        {"instruction": f"Say {c}" + " again" * (8 * (i * 5 % 8)), "input": "", "output": c}
        for i, c in enumerate(COLOURS)
    ]
    path = tmp_path / "lengths.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_cfg = InstructDataConfig(paths=[str(path)], max_len=384, val_fraction=0.0)
    train = build_dataset(data_cfg, small_tokenizer).train
    lengths = [e.positions for e in train]
    assert len(train) == 8 and max(lengths) > 3 * min(lengths)
    if packing:  # one step = the packed rows of one epoch
        batch = len(PackedLoader(train, 1, 384)._units(0))
        extra = ["data.packing=true", f"batch_size={batch}", "micro_batch=1"]
    else:
        extra = ["batch_size=8", "micro_batch=4"]
    out = tmp_path / "run"
    argv = args(base, path, out, *extra, "data.max_len=384", "data.val_fraction=0", "steps=2")
    argv.append("model.max_seq_len=384")  # past the base's 128: on purpose
    argv.append("gen_eval=0")
    assert main(argv) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in metrics] == [sum(lengths), 2 * sum(lengths)]
    for r in metrics:
        assert 0 < r["tokens_per_s"] <= r["padded_tokens_per_s"]
        if not packing:  # every rank's rows are padded to its longest
            assert r["tokens_per_s"] < r["padded_tokens_per_s"]
    assert json.loads((out / "summary.json").read_text())["tokens"] == 2 * sum(lengths)


def test_before_after_evaluation_is_skipped_when_it_does_not_fit(base, data, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(args(base, data, out, "steps=2", "eval_memory_gib=0.0001")) == 0
    err = capsys.readouterr().err
    assert err.count("before/after evaluation skipped") == 1, err
    assert "more than 90 % of 104.9 KiB (eval_memory_gib=0.0001)" in err
    assert "held-out instructions" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"]["skipped"].startswith("before/after evaluation skipped")
    assert (out / "model" / "params.json").is_file()  # the run itself is complete


def test_eval_tasks_run_before_and_after(base, data, tmp_path, capsys):
    from .conftest import shared_file

    eval_dir = shared_file("eval")
    out = tmp_path / "evald"
    extra = (
        "steps=2",
        "gen_eval=0",
        "eval_tasks=boolq",
        "eval_limit=4",
        f"eval_data_dir={eval_dir}",
    )
    assert main(args(base, data, out, *extra)) == 0
    tasks = json.loads((out / "summary.json").read_text())["evaluation"]["tasks"]
    assert set(tasks) == {"before", "after"}
    assert tasks["before"]["boolq"]["metric"] == tasks["after"]["boolq"]["metric"]
    assert 0.0 <= tasks["after"]["boolq"]["value"] <= 1.0
    assert "boolq" in capsys.readouterr().err
