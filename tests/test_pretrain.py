"""`python -m llamaforge pretrain` end to end on a tiny prepared corpus: data-parallel
equivalence (real torchrun processes, Gloo), bitwise resume, crash recovery, the final
native checkpoint and configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llamaforge
from llamaforge.cli.main import main as cli_main
from llamaforge.config import ConfigError, load_config
from llamaforge.training.checkpointer import list_checkpoints
from llamaforge.training.pretrain import PretrainConfig, run_pretrain
from llamaforge.training.trainer import TrainingError

from .conftest import REPO, story_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small prepared corpus with its own 300-piece tokenizer."""
    return story_corpus(tmp_path_factory.mktemp("pretrain_data"), rows=600)


def overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model.preset=1M",
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.multiple_of=16",
        f"data.dir={corpus}",
        f"data.tokenizer={corpus / 'tokenizer.model'}",
        "data.seq_len=32",
        "batch_tokens=256",  # 8 sequences: 2 micro-batches of 4 in one process
        "micro_batch=4",
        "steps=10",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "eval_every=5",
        "eval_batches=2",
        "checkpoint.every=5",
        "checkpoint.keep=0",
        "progress=false",
        f"out={out}",
        *extra,
    ]


def cfg_of(corpus: Path, out: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, overrides(corpus, out, *extra))


def command(corpus: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    args = ["-m", "llamaforge", "pretrain", *overrides(corpus, out, *extra)]
    if nproc == 1:
        return [sys.executable, *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    return [*launcher, "--master_port", str(29500 + os.getpid() % 1000), *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def run(corpus: Path, out: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(corpus, out, *extra, nproc=nproc),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path, key: str = "loss") -> dict[int, float]:
    """step -> value (None where the row has no such key); a replayed step (after a
    resume) keeps its last line."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r.get(key) for r in rows}


@pytest.mark.slow
def test_two_processes_match_one_and_reshard_on_resume(corpus, tmp_path):
    one = tmp_path / "one"
    val3 = "eval_batches=3"  # validation split over 2 ranks: one of them repeats uncounted
    run(corpus, one, val3)
    ref, ref_val = metrics(one), metrics(one, "val_loss")
    assert sorted(ref) == list(range(1, 11))
    for parallel in ("fsdp", "ddp"):
        two = tmp_path / parallel
        run(corpus, two, f"parallel.data={parallel}", val3, nproc=2)
        got = metrics(two)
        assert sorted(got) == sorted(ref)
        for step in ref:
            assert abs(got[step] - ref[step]) < 1e-4, (parallel, step, got[step], ref[step])
        got_val = {s: v for s, v in metrics(two, "val_loss").items() if v is not None}
        assert sorted(got_val) == [5, 10]
        for step, v in got_val.items():
            assert abs(v - ref_val[step]) < 1e-4, (parallel, step, v, ref_val[step])
    # the FSDP run's step-5 checkpoint (sharded over 2 ranks) resumed in one process
    resumed = tmp_path / "resharded"
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-000005"
    proc = run(corpus, resumed, f"resume={ckpt}", val3)
    assert "at step 5" in proc.stderr
    got = metrics(resumed)
    assert sorted(got) == list(range(6, 11))
    for step in got:
        assert abs(got[step] - ref[step]) < 1e-4, (step, got[step], ref[step])


def test_stop_and_resume_is_bitwise_identical_and_model_generates(corpus, tmp_path):
    full = run_pretrain(cfg_of(corpus, tmp_path / "full"))
    assert full["step"] == 10 and full["model"] is not None
    ref, ref_norm = metrics(tmp_path / "full"), metrics(tmp_path / "full", "grad_norm")

    part = tmp_path / "part"
    first = run_pretrain(cfg_of(corpus, part, "stop_at=4"))
    assert first["step"] == 4 and first["model"] is None
    assert [s for s, _ in list_checkpoints(part / "checkpoints")] == [4]
    second = run_pretrain(cfg_of(corpus, part))  # resume = "auto"
    assert second["step"] == 10
    assert metrics(part) == ref  # bitwise: same floats
    assert metrics(part, "grad_norm") == ref_norm
    assert second["val_loss"] == full["val_loss"]
    assert [s for s, _ in list_checkpoints(part / "checkpoints")] == [4, 5, 10]

    row = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["tokens"] == 10 * 256 and row["tokens_per_s"] > 0 and row["mfu"] is None
    assert row["peak_mem_bytes"] > 0 and "val_loss" in row and row["lr"] > 0

    # (d) the end-of-run native checkpoint loads and generates
    model, tok = llamaforge.load(tmp_path / "full" / "model")
    assert tok is not None and model.args.dim == 32 and model.args.vocab_size == 300
    text = llamaforge.generate(model, tok, "Story 3:", max_new_tokens=8, seed=0)
    assert isinstance(text, str)
    ids = tok.encode("Story 3: the fox")
    import torch

    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids]))).all()


@pytest.mark.slow
def test_sigkill_resumes_from_last_complete_checkpoint(corpus, tmp_path):
    extra = ("steps=300", "checkpoint.every=20", "eval_every=0", "eval_batches=0")
    run(corpus, tmp_path / "ref", *extra)
    ref = metrics(tmp_path / "ref")
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(corpus, out, *extra),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # kill between two checkpoints, after the first
            if log.is_file() and len(log.read_text().splitlines()) >= 30:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    reached = max(metrics(out))
    assert proc.returncode == -signal.SIGKILL and reached < 300
    complete = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert complete and complete[-1] <= reached
    proc2 = run(corpus, out, *extra)
    assert f"at step {complete[-1]}" in proc2.stderr
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    replayed = [r["step"] for r in lines[reached:]]
    assert replayed == list(range(complete[-1] + 1, 301))
    assert metrics(out) == ref  # replayed steps and the rest: the same losses, bitwise


def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "term"
    extra = ("steps=2000", "checkpoint.every=1000", "eval_every=0", "eval_batches=0")
    proc = subprocess.Popen(
        command(corpus, out, *extra), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    log = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    last = max(metrics(out))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [last] and last < 2000


def test_indivisible_batch_tokens_is_a_clear_error(corpus, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"batch_tokens=250 .*micro_batch \(4\).*seq_len \(32\)"):
        run_pretrain(cfg_of(corpus, tmp_path / "bad", "batch_tokens=250"))
    assert cli_main(["pretrain", *overrides(corpus, tmp_path / "bad", "batch_tokens=250")]) == 2
    assert "data-parallel ranks (1) = 128" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_dry_run_plans_the_prepared_data_as_the_run_draws_it(corpus, tmp_path, capsys):
    out = tmp_path / "planned"
    extra = ("steps=4", "eval_batches=0")
    argv = ["pretrain", *overrides(corpus, out, *extra), "--dry-run", "--json", "--gpu", "L4"]
    assert cli_main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not out.exists()  # nothing written, nothing trained
    assert plan["data"]["prepared"] and plan["data"]["source_tokens"]["stories"] > 0
    assert plan["steps"] == 4 and plan["tokens"] == 4 * 256 and plan["batch"]["accumulation"] == 2
    assert plan["model"]["args"]["vocab_size"] == 300  # the data's tokenizer
    summary = run_pretrain(cfg_of(corpus, out, *extra))
    assert summary["step"] == plan["steps"] and summary["tokens"] == plan["tokens"]
    assert summary["epochs"] == pytest.approx(plan["data"]["epochs"])


TABLE2 = {"7B": 6_738_415_616, "13B": 13_015_864_320, "33B": 32_528_943_616, "65B": 65_285_660_672}


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.toml")), ids=str)
def test_shipped_configs_are_valid(path):
    from llamaforge.training.flops import count_params
    from llamaforge.training.trainer import check_config, grad_accum_steps, layout_of, model_args

    cfg = load_config(PretrainConfig, path)
    check_config(cfg)
    seq = cfg.data.seq_len
    args = model_args(cfg, 32000 if "shared" in cfg.data.dir else 2048, seq)
    assert args.max_seq_len >= cfg.data.seq_len
    size = path.stem.removeprefix("llama-")
    if size in TABLE2:  # the paper's recipes: Table 2 sizes, 4M-token batches, its lr
        assert count_params(args)["total"] == TABLE2[size]
        assert cfg.batch_tokens == 4 * 2**20 and cfg.data.seq_len == 2048
        assert cfg.optim.lr == (3e-4 if size in ("7B", "13B") else 1.5e-4)
        tokens = 1.0e12 if size in ("7B", "13B") else 1.4e12
        assert abs(cfg.steps * cfg.batch_tokens - tokens) < cfg.batch_tokens
        assert cfg.optim.warmup_steps == 2000 and cfg.activation_checkpointing == "selective"
        for world in (8, 64, 256, 2048):  # GPUs; a tensor group reads one batch part
            assert grad_accum_steps(cfg, seq, layout_of(cfg, world).dp) >= 1
    else:
        assert grad_accum_steps(cfg, seq, 1) >= 1


def test_non_finite_steps_are_skipped_then_the_run_stops(corpus, tmp_path):
    # lr 1e30 blows the weights up after one step: every later gradient is NaN
    out = tmp_path / "nan"
    extra = ("optim.lr=1e30", "optim.warmup_steps=0", "checkpoint.every=1", "eval_batches=0")
    with pytest.raises(TrainingError, match=r"not finite for 4 steps in a row.*step-000001"):
        run_pretrain(cfg_of(corpus, out, *extra, "max_skipped_steps=3"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r.get("skipped", False) for r in rows] == [False, True, True, True, True]
    # no checkpoint for a skipped step; the good one stays
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [1]
    assert (
        cli_main(["pretrain", *overrides(corpus, tmp_path / "nan2", *extra, "max_skipped_steps=0")])
        == 1
    )


def test_summary_plot_and_carbon(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    summary = run_pretrain(cfg_of(corpus, out, "steps=4", "power_watts=400", "tensorboard=false"))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["step"] == 4 and saved["tokens"] == 4 * 256 and saved["world_size"] == 1
    c = summary["carbon"]
    assert c["watts"] == 400 and c["gpu_hours"] == pytest.approx(summary["device_hours"])
    assert c["mwh"] == pytest.approx(summary["device_hours"] * 400 * 1.1 / 1e6)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "carbon (paper's formula, 400 W" in capsys.readouterr().err
    assert not (out / "tensorboard").exists()
    # on demand, from the CLI, to another path
    from llamaforge.cli.main import main as cli_main

    assert cli_main(["plot", str(out), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert cli_main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics file" in capsys.readouterr().err


def test_tensorboard_mirror(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    run_pretrain(cfg_of(corpus, out, "steps=2", "tensorboard=true", "plot=false"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not (out / "loss.png").exists()


def test_cli_pretrain_reports_bad_settings(corpus, tmp_path, capsys):
    from llamaforge.cli.main import main as cli_main

    assert (
        cli_main(["pretrain", *overrides(corpus, tmp_path / "x", "activation_checkpointing=some")])
        == 2
    )
    err = capsys.readouterr().err
    assert "activation_checkpointing" in err and "'some'" in err and "'selective'" in err
    assert cli_main(["pretrain", *overrides(corpus, tmp_path / "x", "optim.lrr=1")]) == 2
    assert "lrr" in capsys.readouterr().err
    assert cli_main(["pretrain", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_metrics_reader_and_wandb_without_the_package(corpus, tmp_path, capsys):
    from llamaforge.training.metrics import read_metrics

    run = tmp_path / "m"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 3.0, "tokens": 8}\n{"step": 2, "loss": 2.0, "tokens": 16}\n'
        '{"step": 2, "loss": 2.5, "tokens": 16}\n{"step": 3, "lo'  # replayed step, torn line
    )
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(1, 3.0), (2, 2.5)]
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert cli_main(["pretrain", *overrides(corpus, tmp_path / "w", "wandb_project=proj")]) == 2
        assert "wandb_project='proj' but wandb is not installed" in capsys.readouterr().err


def test_torn_metrics_line_then_resume_loses_no_row_and_plots(corpus, tmp_path, capsys):
    import logging
    import shutil

    from llamaforge.training.metrics import MetricsWriter, read_metrics

    out = tmp_path / "torn"
    extra = ("checkpoint.every=2", "eval_every=0", "eval_batches=0", "tensorboard=false")
    run_pretrain(cfg_of(corpus, out, "steps=4", "plot=false", *extra))
    log = out / "metrics.jsonl"
    text = log.read_text()
    log.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # killed mid-row
    shutil.rmtree(out / "checkpoints" / "step-000004")  # the kill came before that save too
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("llamaforge.training.metrics").addHandler(handler)
    try:
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # the torn row skipped
        assert "skipped a torn line" in records[-1].getMessage()
        run_pretrain(cfg_of(corpus, out, "steps=6", *extra))  # resumes at step 2
        assert any("cut a torn last line" in r.getMessage() for r in records)
    finally:
        logging.getLogger("llamaforge.training.metrics").removeHandler(handler)
    rows = [json.loads(x) for x in log.read_text().splitlines()]  # every line whole
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert cli_main(["plot", str(out)]) == 0 and (out / "loss.png").stat().st_size > 1000
    # a whole row that lost only its newline is kept; the next row starts a new line
    run = tmp_path / "w"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "tokens": 8}')
    w = MetricsWriter(run, tensorboard="false")
    w.write({"step": 2, "loss": 2.0, "tokens": 16})
    w.close()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    # an older version's resume appended a row onto the fragment: the row is recovered
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 3.0, "tokens": 8}\n{"step": 2, "lo{"step": 2, "loss": 2.0, '
        '"tokens": 16}\n{"step": 3, "loss": 1.0, "tokens": 24}\n'
    )
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_learning_rate_schedule_is_warmup_then_cosine_to_ten_percent():
    from llamaforge.training.optim import lr_at

    def lr(step: int) -> float:
        return lr_at(step, peak=3e-4, warmup=2000, total=10_000)

    assert lr(0) == pytest.approx(3e-4 / 2000) and lr(999) == pytest.approx(1.5e-4)
    assert lr(1999) == pytest.approx(3e-4) and lr(2000) == pytest.approx(3e-4)
    assert lr(6000) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert lr(10_000) == pytest.approx(3e-5) and lr(50_000) == pytest.approx(3e-5)
    steps = [lr(s) for s in range(2000, 10_001, 500)]
    assert all(a > b for a, b in zip(steps, steps[1:]))


def test_every_validation_loss_reaches_metrics_jsonl(corpus, tmp_path):
    """A validation step that is not a logging step still writes its row (it used to be
    computed and dropped: eval_every=3 with log_every=2 kept only step 6's)."""
    cfg = cfg_of(corpus, tmp_path / "run", "eval_every=3", "log_every=2", "steps=7")
    summary = run_pretrain(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    validated = [r["step"] for r in rows if r.get("val_loss") is not None]
    assert validated == [3, 6, 7]
    assert rows[-1]["val_loss"] == summary["val_loss"]
    assert {r["step"] for r in rows} == {2, 3, 4, 6, 7}
