"""The study of the paper's claims (science/study.py, science/report.py, `llamaforge
experiment`): its plan, its statistics, and — slow — the short version end to end from the
CLI, which checks the machinery (cells, skipping, resuming, the page), not the results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llamaforge.science.blocks import GPT2, LADDER, LLAMA
from llamaforge.science.report import (
    Stat,
    achievable,
    compute_optimal,
    difference,
    loss_at,
    stable_up_to,
    tokens_to_reach,
    verdict,
)
from llamaforge.science.study import FULL, SHORT, Size, best_lr, seed_cells, sweep_cells


def _result(val: float | None, diverged: bool = False) -> dict:
    return {"val_loss": val, "diverged": diverged}


def test_cells_are_keyed_by_what_defines_the_run():
    a = FULL.cell("stdlib", GPT2, FULL.ladder_size, 3e-3, 0)
    assert a.key() == FULL.cell("stdlib", GPT2, FULL.ladder_size, 3e-3, 0).key()
    others = [
        FULL.cell("shared", GPT2, FULL.ladder_size, 3e-3, 0),
        FULL.cell("stdlib", replace(GPT2, bias=False), FULL.ladder_size, 3e-3, 0),
        FULL.cell("stdlib", GPT2, Size(64, 4, 2), 3e-3, 0),
        FULL.cell("stdlib", GPT2, FULL.ladder_size, 1e-3, 0),
        FULL.cell("stdlib", GPT2, FULL.ladder_size, 3e-3, 1),
        replace(a, tokens=a.tokens + 1),
    ]
    assert len({a.key(), *(c.key() for c in others)}) == 1 + len(others)


def test_the_plan_shares_the_pre_norm_sweep_and_covers_every_rung():
    planned = sweep_cells(FULL, ("ladder", "norm", "scaling"))
    ladder = [c for e, _, c in planned if e == "ladder"]
    assert len(ladder) == len(FULL.corpora) * len(LADDER) * len(FULL.ladder_lrs)
    assert {c.arch for c in ladder} == {arch for _, arch in LADDER}
    pre = {c.key() for e, label, c in planned if e == "norm" and label == "pre"}
    shared = pre & {c.key() for c in ladder}  # the GPT-2 sweep's lrs inside the norm grid
    assert len(shared) == len(set(FULL.ladder_lrs) & set(FULL.norm_lrs))
    post = [c for e, label, c in planned if e == "norm" and label == "post"]
    assert {c.arch.norm_position for c in post} == {"post"} and len(post) == len(FULL.norm_lrs)
    scaling = [c for e, _, c in planned if e == "scaling"]
    assert [c.size for c in scaling] == list(FULL.scaling_sizes)
    assert {c.arch for c in scaling} == {LLAMA} and all(c.evals > 1 for c in scaling)
    assert sweep_cells(FULL, ("norm",)) == [p for p in planned if p[0] == "norm"]


def test_the_smallest_scaling_model_sees_well_over_20_tokens_per_parameter():
    from llamaforge.model import ModelArgs
    from llamaforge.science.blocks import VariantTransformer
    from llamaforge.science.study import MULTIPLE_OF, VOCAB

    small = min(FULL.scaling_sizes, key=lambda s: s.dim * s.n_layers)
    args = ModelArgs(
        dim=small.dim,
        n_layers=small.n_layers,
        n_heads=small.n_heads,
        vocab_size=VOCAB,
        multiple_of=MULTIPLE_OF,
        max_seq_len=FULL.seq_len,
    )
    with __import__("torch").device("meta"):
        n = VariantTransformer(args, LLAMA).num_params()
    assert FULL.scaling_tokens / n > 40


def test_seeds_follow_the_best_learning_rate_and_skip_diverged_sweeps():
    sc = SHORT
    results = {}
    for name, arch in LADDER:
        for lr in sc.ladder_lrs:
            cell = sc.cell("stdlib", arch, sc.ladder_size, lr, 0)
            # the higher lr wins for the GPT-2 rung; every other rung diverged at it
            loss = 3.0 - lr if name == "gpt2" else (math.nan if lr == max(sc.ladder_lrs) else 4.0)
            results[cell.key()] = _result(loss, diverged=math.isnan(loss))
    seeds = seed_cells(sc, results, ("ladder",))
    by_rung = {label: c for _, label, c in seeds}
    assert len(seeds) == len(LADDER) * (sc.seeds - 1)
    assert by_rung["gpt2"].lr == max(sc.ladder_lrs)
    assert all(c.lr == min(sc.ladder_lrs) for label, c in by_rung.items() if label != "gpt2")
    assert {c.seed for _, _, c in seeds} == set(range(1, sc.seeds))
    assert seed_cells(sc, {}, ("ladder",)) == []  # nothing before the sweep is done
    sweep = [sc.cell("stdlib", GPT2, sc.ladder_size, lr, 0) for lr in sc.ladder_lrs]
    assert best_lr(sweep, {c.key(): _result(None, True) for c in sweep}) is None


def test_verdicts_need_two_standard_errors():
    a, b = Stat([3.00, 3.02, 3.01]), Stat([2.95, 2.96, 2.94])
    d, se = difference(a, b)
    assert d == pytest.approx(-0.06) and se == pytest.approx(math.sqrt(2 * 0.01**2 / 3))
    assert verdict(d, se, "lower loss") == "reproduced"
    assert verdict(-d, se, "lower loss") == "not reproduced (worse)"
    assert verdict(-0.5 * se, se, "lower loss") == "within noise"
    assert verdict(1.5 * se, se, "no worse") == "reproduced (no worse)"
    assert verdict(3 * se, se, "no worse") == "not reproduced (worse)"


def test_stability_is_the_largest_lr_before_the_first_failure():
    by_lr = {1e-3: _result(3.0), 1e-2: _result(2.9), 1e-1: _result(None, True), 1.0: _result(3)}
    assert stable_up_to(by_lr) == 1e-2
    assert stable_up_to({1e-3: None}) is None


def test_compute_optimal_size_follows_the_lower_envelope():
    # a small model that is ahead early and a large one that overtakes it later
    def curve(tokens, a, b):
        return [{"tokens": t, "val_loss": a - b * math.log10(t)} for t in tokens]

    small = {"flops_per_token": 1, "curve": curve((1e3, 1e4, 1e5, 1e6), 5, 0.5)}
    large = {"flops_per_token": 10, "curve": curve((1e2, 1e3, 1e4, 1e5), 5.5, 0.9)}
    assert loss_at(small["curve"], 10**3.5, "tokens") == pytest.approx(5 - 0.5 * 3.5)
    assert loss_at(small["curve"], 10, "tokens") is None
    assert achievable(small, 10) is None  # before its first evaluation
    assert achievable(small, 1e7) == (pytest.approx(2.0), True)  # past its end: its last loss
    opt = compute_optimal([(Size(8, 1, 1), small), (Size(64, 1, 1), large)], budgets=6)
    labels = [label for _, label, _, _ in opt]
    assert labels[0] == "d8·L1" and labels[-1] == "d64·L1"
    assert labels == sorted(labels, key=lambda s: s != "d8·L1")  # one switch, small → large
    for c, _, loss, ended in opt:
        a, b = achievable(small, c), achievable(large, c)
        assert (loss, ended) == min(x for x in (a, b) if x is not None)


# -- the short study, end to end from the CLI -----------------------------------------------


def _experiment(*args: str, cwd: Path, env_extra: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "llamaforge", "experiment", *args],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_short_study_runs_skips_resumes_and_reports(tmp_path):
    out = tmp_path / "study"
    run = _experiment("run", "--short", "--corpora", "stdlib", "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == f"next: llamaforge experiment report --out {out}"
    planned = sweep_cells(replace(SHORT, corpora=("stdlib",)), ("ladder", "norm", "scaling"))
    distinct = {c.key() for _, _, c in planned}
    results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("cells/*/result.json")}
    n_seeds = len(LADDER) * (SHORT.seeds - 1)
    assert len(results) == len(distinct) + n_seeds
    assert distinct <= set(results)
    trained = [r for r in results.values() if not r["diverged"]]
    assert trained and all(r["val_loss"] < math.log(2048) for r in trained)
    assert all(r["flops_per_token"] > 0 and r["params"] > 0 for r in results.values())
    # lr 1.0 is in the short grid to make a run fail: the study records it and goes on
    assert any(r["diverged"] for r in results.values())

    again = _experiment("run", "--short", "--corpora", "stdlib", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"0 cells trained, {len(results)} already done, 0 failed" in again.stdout

    # a cell whose result was lost resumes from its checkpoint to the same loss
    key, first = next((k, r) for k, r in results.items() if not r["diverged"])
    (out / "cells" / key / "result.json").unlink()
    resumed = _experiment("run", "--short", "--corpora", "stdlib", "--out", str(out), cwd=tmp_path)
    assert resumed.returncode == 0 and "1 cells trained" in resumed.stdout
    assert "resumed from" in resumed.stdout + resumed.stderr
    redone = json.loads((out / "cells" / key / "result.json").read_text())
    assert redone["val_loss"] == first["val_loss"]

    page = tmp_path / "docs" / "science.md"
    page.parent.mkdir()
    page.write_text(
        "# Kept title\n\nintro\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nkept tail\n"
    )
    rep = _experiment("report", "--out", str(out), "--page", str(page), cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("# Kept title\n\nintro\n") and text.endswith("kept tail\n")
    assert "old" not in text.split("<!-- results:start -->")[1]
    for rung, _ in LADDER:
        assert f"| {rung} |" in text
    assert "| pre-norm is more stable than post-norm |" in text
    assert "- **Unigram baselines** (" in text and "stdlib " in text
    assert all(
        (page.parent / "science" / f).stat().st_size > 1000
        for f in ("ladder.png", "norm.png", "scaling.png")
    )


def test_bad_requests_exit_2_with_the_reason(tmp_path):
    bad = _experiment("run", "--only", "ladder,bogus", "--out", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "--only" in bad.stderr and "bogus" in bad.stderr
    missing = _experiment(
        "run",
        "--short",
        "--corpora",
        "shared",
        "--out",
        str(tmp_path / "s"),
        cwd=tmp_path,
        env_extra={"LLAMAFORGE_SHARED_DATA": str(tmp_path / "nowhere")},
    )
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    empty = _experiment("report", "--out", str(tmp_path / "none"), cwd=tmp_path)
    assert empty.returncode == 2 and "none" in empty.stderr


def test_tokens_to_reach_interpolates_the_first_crossing():
    curve = [{"tokens": t, "val_loss": v} for t, v in ((100, 5.0), (1000, 4.0), (10000, 3.0))]
    assert tokens_to_reach(curve, 4.5) == pytest.approx(10**2.5)
    assert tokens_to_reach(curve, 3.0) == pytest.approx(10000)
    assert tokens_to_reach(curve, 5.5) == 100  # already there at the first evaluation
    assert tokens_to_reach(curve, 2.9) is None
