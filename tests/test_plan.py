"""``llamaforge pretrain|finetune CONFIG --dry-run``: the plan of the paper's 7B–65B configs
on this machine (nothing allocated), its numbers against the arithmetic they come from
(layout_memory, the lr schedule, FLOPs per token, the finetuning schedule), LoRA and a
quantised base, the before/after evaluation's fit, torchrun's world size, bad flags; and a
plan from real data against the run it plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge.cli.main import main

from .conftest import REPO, json_objects

TABLE2 = {"7B": 6_738_415_616, "13B": 13_015_864_320, "33B": 32_528_943_616, "65B": 65_285_660_672}
PRETRAIN = {size: REPO / "configs" / "pretrain" / f"llama-{size}.toml" for size in TABLE2}
ALPACA = REPO / "configs" / "finetune" / "llama-7B-alpaca.toml"
LORA = REPO / "configs" / "finetune" / "llama-7B-lora.toml"


def plan_of(capsys, *argv: str) -> dict:
    assert main([*argv, "--dry-run", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("size", TABLE2)
def test_the_papers_pretraining_configs_plan_on_this_machine(size, capsys, monkeypatch):
    from llamaforge.training.flops import carbon, flops_per_token, layout_memory
    from llamaforge.training.optim import lr_at

    monkeypatch.chdir(REPO)  # the configs name the tokenizer relative to the checkout
    world = 2048 if size == "65B" else 256
    plan = plan_of(capsys, "pretrain", str(PRETRAIN[size]), "--gpus", str(world), "--gpu", "A100")
    assert plan["model"]["params"] == plan["model"]["trained"] == TABLE2[size]
    steps, batch = plan["steps"], plan["batch"]["tokens"]
    assert batch == 4 * 2**20 and plan["tokens"] == steps * batch
    assert abs(plan["tokens"] - (1.0e12 if size in ("7B", "13B") else 1.4e12)) < batch
    assert plan["data"]["prepared"] is False  # data/shared is not prepared here
    lay = plan["layout"]
    tp = 8 if size == "65B" else 1
    assert (lay["world_size"], lay["tp"], lay["dp_shard"]) == (world, tp, world // tp)
    # memory: layout_memory's, for the config's micro-batch and checkpointing
    from llamaforge.presets import get_preset

    args = get_preset(size, vocab_size=32000)
    ref = layout_memory(
        args,
        tp=tp,
        dp_shard=world // tp,
        seq_len=2048,
        micro_batch=plan["batch"]["micro_batch"],
        mode="selective",
    )
    parts, mem = plan["memory"]["parts"], plan["memory"]
    for key in ("weights", "gradients", "optimizer"):
        assert abs(parts[key] - ref[key]) <= 2 * tp * (world // tp), key  # rounding only
    assert parts["copies"] == ref["gathered"]
    assert mem["activations"]["selective"] == ref["activations"] and mem["mode"] == "selective"
    assert mem["fits"] and mem["total"] <= 0.9 * 80 * 1024**3
    # the schedule: the trainer's lr_at, warmup 2000, cosine to 10 %
    lr = plan["lr"]
    assert (lr["warmup_steps"], lr["final"]) == (2000, pytest.approx(0.1 * lr["peak"]))
    assert lr["peak"] == lr_at(1999, peak=lr["peak"], warmup=2000, total=steps)
    assert len(lr["plot"]) == 6 and lr["plot"][0].lstrip().startswith(f"{lr['peak']:.2e}")
    # the time at 40 % of the A100's 312 TFLOP/s
    t = plan["time"]
    assert t["flops_per_token"] == flops_per_token(args, 2048)
    seconds = t["flops_per_token"] * plan["tokens"] / (0.4 * 312e12 * world)
    assert t["seconds"] == pytest.approx(seconds)
    assert t["carbon"] == pytest.approx(carbon(seconds * world / 3600, 400))


def test_the_plan_as_text(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["pretrain", str(PRETRAIN["7B"]), "--dry-run", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    for needle in ("preset 7B", "dp_shard 64", "238,419", "warmup 2,000 steps to 0.0003",
                   "activations, selective", "fits in 90 % of 80.0 GiB", "MFU 40% of 64 × A100",
                   "GPU-hours", "█"):  # fmt: skip
        assert needle in out, needle
    assert not (REPO / "runs" / "llama-7B").exists()  # a plan writes nothing


def test_a_65b_plan_allocates_nothing():
    """In a process of its own: the 65B model exists only on the meta device (its fp32
    weights alone would be 243 GiB)."""
    # VmHWM, the process's own peak: ru_maxrss would carry pytest's size at the fork over
    # the exec (Linux keeps the larger of the two), failing once pytest itself is large
    code = (
        "import re, sys\n"
        "from llamaforge.cli.main import main\n"
        f"rc = main(['pretrain', {str(PRETRAIN['65B'])!r}, '--dry-run', '--gpus', '2048'])\n"
        "status = open('/proc/self/status').read()\n"
        "print('peak_kib', re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preset 65B" in proc.stdout
    peak = int(proc.stdout.split("peak_kib")[1])
    assert peak < 2 * 1024**2, peak  # KiB: under 2 GiB


def test_torchruns_world_size_is_the_plans(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    port = str(29500 + (os.getpid() + 23) % 1000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", port, "-m", "llamaforge", "pretrain", str(PRETRAIN["7B"]),
           "--dry-run", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = [p for p in json_objects(proc.stdout) if "layout" in p]
    assert len(plans) == 1  # rank 0 prints it
    assert plans[0]["layout"]["world_size"] == 2 and plans[0]["batch"]["accumulation"] == 1024


def test_finetune_configs_plan_from_a_preset_and_a_stated_count(capsys):
    from llamaforge.presets import get_preset
    from llamaforge.training.flops import count_params

    full = plan_of(capsys, "finetune", str(ALPACA), "--preset", "7B", "--examples", "52002",
                   "--gpus", "8", "--gpu", "H100")  # fmt: skip
    # finetune.run.schedule's numbers (tests/test_configs.py): 3 epochs of batches of 128
    assert (full["steps"], full["lr"]["warmup_steps"], full["lr"]["peak"]) == (1219, 37, 2e-5)
    assert full["lr"]["final"] == 0 and full["epochs"] == pytest.approx(1219 * 128 / 52002)
    assert full["data"]["upper_bound"] and full["tokens"] == pytest.approx(1219 * 128 * 512)
    assert full["model"]["trained"] == TABLE2["7B"] and full["layout"]["dp_shard"] == 8
    assert full["time"]["gpu"] == "H100" and full["evaluation"]["skip"] is None
    lora = plan_of(capsys, "finetune", str(LORA), "--preset", "7B", "--examples", "52002")
    # rank 16 on wq wk wv wo w1 w2 w3 of 32 layers: r·(in + out) each
    args = get_preset("7B")
    d, f = args.dim, args.ffn_hidden_dim
    adapters = 16 * 32 * (4 * (d + d) + 3 * (d + f))
    assert lora["model"]["trained"] == adapters
    assert lora["model"]["params"] == TABLE2["7B"] + adapters
    n = count_params(args)["non_embedding"] + adapters
    attention = 12 * args.n_layers * args.dim * 512
    # a frozen base computes no weight gradients: 4N + 2·(what trains), not 6N
    assert lora["time"]["flops_per_token"] == 4 * n + 2 * adapters + attention
    parts = lora["memory"]["parts"]
    assert parts["weights"] == parts["gradients"] == 4 * adapters
    assert parts["optimizer"] == 8 * adapters and parts["frozen"] == 4 * TABLE2["7B"]


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_a_quantised_base_is_priced_per_value(capsys, quantize):
    from llamaforge.presets import get_preset

    plan = plan_of(capsys, "finetune", str(LORA), "--preset", "7B", "--examples", "1000",
                   f"lora.quantize={quantize}")  # fmt: skip
    args = get_preset("7B")
    d, f = args.dim, args.ffn_hidden_dim
    layers = [(d, d)] * 4 + [(f, d)] * 2 + [(d, f)]  # (rows, columns): wq wk wv wo, w1 w3, w2
    if quantize == "int8":  # a byte a value, an fp32 scale a row
        per_layer = sum(r * c + 4 * r for r, c in layers)
    else:  # half a byte a value, an int8 scale a block of 64, an fp32 factor per 256 blocks
        per_layer = sum(r * c // 2 + r * c // 64 + 4 * (r * c // (64 * 256)) for r, c in layers)
    parts = plan["memory"]["parts"]
    assert parts["buffers"] == 32 * per_layer
    embedding_and_output = 2 * args.vocab_size * d
    norms = (2 * 32 + 1) * d
    assert parts["frozen"] == 4 * (embedding_and_output + norms)


def test_the_before_after_evaluation_is_skipped_when_the_model_does_not_fit(capsys):
    plan = plan_of(capsys, "finetune", str(LORA), "--preset", "65B", "--examples", "1000",
                   "--gpu", "H100")  # fmt: skip
    ev = plan["evaluation"]
    assert ev["needed"] > 0.9 * ev["limit"] and ev["limit"] == 80 * 1024**3
    assert ev["skip"].startswith("before/after evaluation skipped") and "H100" in ev["skip"]
    # on a device with room for it (400 GiB), it runs
    roomy = plan_of(capsys, "finetune", str(LORA), "--preset", "65B", "--examples", "1000",
                    "--gpu", "H100", "--gpu-memory", "400")  # fmt: skip
    assert roomy["evaluation"]["skip"] is None


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["finetune", str(ALPACA), "--dry-run"], "--preset SIZE"),
        (["finetune", str(ALPACA), "--dry-run", "--preset", "7B"], "--examples N"),
        (["finetune", str(ALPACA), "--dry-run", "--preset", "7B", "--examples", "0"],
         "--examples 0"),
        (["pretrain", str(PRETRAIN["7B"]), "--gpu", "H100"], "--gpu: a flag of the plan"),
        (["pretrain", str(PRETRAIN["7B"]), "--dry-run", "--gpu", "TPU9"], "--gpu TPU9"),
        (["pretrain", str(PRETRAIN["7B"]), "--dry-run", "--mfu", "1.5"], "--mfu 1.5"),
        (["pretrain", str(PRETRAIN["65B"]), "--dry-run", "--gpus", "12"], "parallel.tp=8"),
    ],
)  # fmt: skip
def test_bad_plans_are_one_line_errors(argv, needle, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


# -- a plan from real data, against the run it plans -------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_tokenizer_path) -> Path:
    out = tmp_path_factory.mktemp("plan") / "base"
    argv = ["init", "--preset", "1M", "--tokenizer", str(small_tokenizer_path), "--out", str(out)]
    assert main([*argv, "dim=64", "n_layers=2", "n_heads=4", "max_seq_len=128"]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [
        {"instruction": f"Say yes {i}" + " and again" * (i * 3 % 7), "input": "", "output": "yes"}
        for i in range(16)
    ]
    path = tmp_path_factory.mktemp("plandata") / "yes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_finetune_plan_reads_the_data_and_matches_its_run(base, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", f"init={base}", f"data.paths=['{data}']", "data.max_len=128",
            "data.val_fraction=0", "batch_size=8", "micro_batch=4", "epochs=2", "gen_eval=0",
            "eval_batches=0", "device=cpu", "progress=false", f"out={out}"]  # fmt: skip
    plan = plan_of(capsys, *argv, "--gpu", "L4")
    report = plan["data"]["report"]["train"]
    assert report["examples"] == 16 and plan["steps"] == 4 and plan["epochs"] == 2
    assert plan["tokens"] == 2 * report["positions"]  # every example twice, no padding
    assert plan["layout"]["precision"] == "fp32"  # device=cpu
    assert not out.exists()
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == plan["steps"] and summary["tokens"] == plan["tokens"]
