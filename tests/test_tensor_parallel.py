"""Tensor + sequence parallelism (``parallel.tp``) with real torchrun processes on the CPU
(Gloo): losses against one process with the same global batch, resume across layouts,
sharded greedy generation and evaluation, and the errors for layouts and models that do
not split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge.config import ConfigError, load_config
from llamaforge.model import ModelArgs
from llamaforge.parallel import LayoutError, check_tp_divisible, make_layout
from llamaforge.training.pretrain import PretrainConfig, run_pretrain

from .conftest import SHARED_DATA, json_objects
from .test_pretrain import corpus, env, metrics, overrides, run  # noqa: F401 (a fixture)

# 2 query heads over 2 kv heads, FFN 96, vocab 300, sequences of 32: all divide by 2
TINY = ("model.n_kv_heads=2", "model.vocab_size=300")


def close(got: dict[int, float], ref: dict[int, float], what: str) -> None:
    assert got and set(got) <= set(ref), (what, sorted(got), sorted(ref))
    for step in got:
        assert abs(got[step] - ref[step]) < 1e-4, (what, step, got[step], ref[step])


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:  # noqa: F811
    """One process, the same global batch: the losses every layout must reproduce."""
    out = tmp_path_factory.mktemp("tp") / "one"
    run(corpus, out, *TINY)
    assert sorted(metrics(out)) == list(range(1, 11))
    return out


@pytest.mark.slow
def test_tp2_matches_one_process_and_generates_the_same(corpus, reference, tmp_path):  # noqa: F811
    two = tmp_path / "tp2"
    # with full activation checkpointing (recomputing a split block): the same losses
    run(corpus, two, *TINY, "parallel.tp=2", "eval_batches=3", "activation_checkpointing=full",
        nproc=2)  # fmt: skip
    close(metrics(two), metrics(reference), "tp 2")
    # the validation loss too (tensor groups share their batches)
    val = {s: v for s, v in metrics(two, "val_loss").items() if v is not None}
    assert sorted(val) == [5, 10]
    # the exported model: greedy text with --tp 2 (torchrun) equals one process's
    model = two / "model"
    argv = ["generate", "--ckpt", str(model), "--temperature", "0", "--max-new-tokens", "12"]
    argv += ["--prompt", "Story 7: the fox", "--prompt", "the dog sat"]
    one = subprocess.run([sys.executable, "-m", "llamaforge", *argv], env=env(), text=True,
                         capture_output=True, timeout=120)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    split = torchrun(2, ["-m", "llamaforge", *argv, "--tp", "2"])
    assert split.stdout == one.stdout and "=== [2/2]" in one.stdout


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    port = ["--master_port", str(28500 + os.getpid() % 1000)]
    proc = subprocess.run([*launcher, *port, *args], env=env(), text=True, capture_output=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_dp2_tp2_matches_and_resumes_on_other_layouts(corpus, reference, tmp_path):  # noqa: F811
    four = tmp_path / "dp2tp2"
    sel = "activation_checkpointing=selective"  # the paper's, composed with tp and FSDP2
    run(corpus, four, *TINY, "parallel.tp=2", "parallel.dp_shard=2", sel, nproc=4)
    ref = metrics(reference)
    close(metrics(four), ref, "dp 2 x tp 2")
    # its step-5 checkpoint (DCP, sharded over dp 2 × tp 2) resumed on other layouts
    ckpt = four / "checkpoints" / "step-000005"
    for name, extra, nproc in (
        ("one", (), 1),
        ("tp2", ("parallel.tp=2",), 2),
        ("hsdp", ("parallel.dp_replicate=2",), 2),  # 2 replicas of 1 FSDP2 shard
    ):
        out = tmp_path / f"resumed-{name}"
        proc = run(corpus, out, *TINY, *extra, f"resume={ckpt}", nproc=nproc)
        assert "at step 5" in proc.stderr
        got = metrics(out)
        assert sorted(got) == list(range(6, 11)), name
        close(got, ref, f"resumed on {name}")


@pytest.mark.slow
def test_eval_tp2_matches_one_process(reference, tmp_path):
    if not (SHARED_DATA / "eval" / "arc").is_dir():
        pytest.skip("the shared eval data (arc) is not available")
    argv = ["eval", "--ckpt", str(reference / "model"), "--tasks", "arc_easy", "--limit", "4"]
    argv += ["--data-dir", str(SHARED_DATA / "eval"), "--no-progress", "--no-cache"]
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        args = ["-m", "llamaforge", *argv, "--output", str(out)]
        if nproc == 1:
            proc = subprocess.run([sys.executable, *args], env=env(), text=True,
                                  capture_output=True, timeout=120)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-2000:]
        else:
            torchrun(2, [*args, "--tp", "2"])
        results.append(json.loads(out.read_text())["tasks"]["arc_easy"])
    one, two = results
    assert one["n_docs"] == two["n_docs"] == 4
    for metric, v in one["metrics"].items():
        assert abs(two["metrics"][metric]["value"] - v["value"]) < 1e-9, metric


def test_layout_errors_name_the_numbers():
    assert make_layout(8, tp=2).dp_shard == 4
    lay = make_layout(8, tp=2, dp_replicate=2)
    assert (lay.dp_replicate, lay.dp_shard, lay.tp, lay.dp) == (2, 2, 2, 4)
    assert [lay.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(LayoutError, match=r"dp_shard=2 × parallel.tp=2 = 4.*world size .* 2"):
        make_layout(2, tp=2, dp_shard=2)
    with pytest.raises(LayoutError, match=r"tp=3 .* does not divide the world size 4"):
        make_layout(4, tp=3)
    with pytest.raises(LayoutError, match="ddp"):
        make_layout(4, data="ddp", tp=2)
    with pytest.raises(LayoutError, match="async_tp"):
        make_layout(2, async_tp=True)


@pytest.mark.parametrize(
    "fields, tp, named",
    [
        (dict(n_heads=6, n_kv_heads=6), 4, "n_heads=6"),
        (dict(n_heads=8, n_kv_heads=2), 4, "n_kv_heads=2"),
        (dict(n_heads=4, multiple_of=8, dim=64), 4, None),  # ffn 176, vocab 300: fine
        (dict(n_heads=4, multiple_of=2, dim=64), 4, r"ffn_hidden_dim\)=170"),
        (dict(n_heads=4, vocab_size=301, dim=64), 2, "vocab_size=301"),
    ],
)
def test_model_sizes_that_do_not_split(fields, tp, named):
    args = ModelArgs(**{"dim": 48, "n_layers": 1, "vocab_size": 300, **fields}).validate()
    if named is None:
        check_tp_divisible(args, tp)
        return
    with pytest.raises(LayoutError, match=rf"parallel.tp={tp}: the model's .*{named}"):
        check_tp_divisible(args, tp)


def test_config_errors_and_the_old_parallel_key(corpus, tmp_path):  # noqa: F811
    old = load_config(PretrainConfig, None, ["parallel=ddp"])  # before the [parallel] table
    assert old.parallel.data == "ddp" and old.parallel.tp == 1
    toml = tmp_path / "c.toml"
    toml.write_text('parallel = "fsdp"\n[model]\npreset = "1M"\n')
    assert load_config(PretrainConfig, toml).parallel.data == "fsdp"
    toml.write_text("[parallel]\ntp = 2\ndp_replicate = 1\n")
    assert load_config(PretrainConfig, toml).parallel.tp == 2
    with pytest.raises(ConfigError, match=r"parallel.tp=2 .* does not divide the world size 1"):
        run_pretrain(load_config(PretrainConfig, None, overrides(corpus, tmp_path / "a",
                                                                 "parallel.tp=2")))  # fmt: skip


def test_info_memory_per_gpu_for_a_layout(capsys):
    from llamaforge.cli.main import main

    assert main(["info", "--preset", "65B", "--tp", "8", "--dp", "256", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = info["params"]["total"]
    per = info["layout"]["bytes_per_gpu"]
    assert info["layout"]["gpus"] == 2048
    assert per["selective"]["optimizer"] == 8 * n // 2048 == 2 * per["selective"]["weights"]
    s, h, L, V, t = 2048, 8192, 80, 32000, 8  # Korthikanti et al.: 34·sbh/t per layer
    assert per["selective"]["activations"] == int(L * 34 * s * h / t + 10 * s * V / t)
    assert per["none"]["activations"] == int(L * s * h * (34 + 5 * 64 * s / h) / t + 10 * s * V / t)
    assert per["full"]["activations"] < per["selective"]["activations"]
    assert main(["info", "--preset", "65B", "--tp", "8", "--dp", "256"]) == 0
    text = capsys.readouterr().out
    assert "per GPU with tp 8 × dp_shard 256 (2048 GPUs" in text and "fits in 80 GiB" in text
    assert main(["info", "--layouts"]) == 0
    table = capsys.readouterr().out
    assert "| 65B | 8 × 256 |" in table and "| 7B | 1 × 8 |" in table


@pytest.mark.slow
def test_split_layers_match_the_whole_model_and_the_loss_never_gathers_logits():
    """tests/scripts/tp_layers.py under 2 torchrun processes: GQA heads split (4 query and
    2 kv heads → 2 and 1 per rank), logits split over the vocabulary and equal to the
    whole model's, the same loss and gradients, and the loss's collectives all-reduces of
    per-position scalars only — no all-gather, so full logits never exist."""
    from .conftest import REPO

    proc = torchrun(2, [str(REPO / "tests" / "scripts" / "tp_layers.py")])
    rows = json_objects(proc.stdout)
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        assert r["local_heads"] == [2, 1]
        assert r["logits_sharded_on_vocab"] and r["local_logits_shape"] == [2, 16, 48]
        assert r["logits_diff"] < 1e-5 and r["loss_diff"] < 1e-3, r
        assert r["wq_grad_diff"] < 1e-6 and r["norm_grad_diff"] < 1e-6, r
        assert set(r["loss_collectives"]) == {"c10d_functional.all_reduce"}, r
