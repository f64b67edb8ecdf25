import json

import pytest

import llamaforge
from llamaforge.demos.quickstart import quickstart_config, run_quickstart

from .conftest import run_next


@pytest.mark.slow
def test_quickstart_learns_and_leaves_a_usable_checkpoint(tmp_path, capsys):
    cfg = quickstart_config(
        [
            f"out={tmp_path / 'run'}",
            "corpus.vocab_size=1024",
            "steps=200",
            "optim.warmup_steps=20",
            "batch_tokens=2048",  # 16 × 128
            "data.seq_len=128",
            "model.max_seq_len=128",
            "eval_batches=4",
            "sample_tokens=16",
            "device=cpu",
        ]
    )
    assert cfg.data.dir == str(tmp_path / "run" / "data")
    logs: list[str] = []
    summary = run_quickstart(cfg, log=logs.append)
    assert summary["val_loss"] < summary["unigram_loss"] - 0.5
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 200 and lines[-1]["loss"] < lines[0]["loss"]
    model, tok = llamaforge.load(summary["checkpoint"])
    assert model.args.vocab_size == tok.vocab_size == 1024
    assert len(summary["samples"]) == 3
    # both sources of the mixture were drawn, in proportion
    epochs = summary["epochs"]
    assert set(epochs) == {"code", "docs"} and all(e > 0 for e in epochs.values())
    meta = json.loads((tmp_path / "run" / "data" / "code" / "meta.json").read_text())
    assert meta["clean"]["removed"]["duplicate_file"] >= 1  # the cleaners ran
    # it ends with the command that samples the checkpoint, and that command works as printed
    ckpt = tmp_path / "run" / "model"
    assert logs[-1] == f"\nnext: llamaforge generate --ckpt {ckpt} --prompt 'def '"
    assert run_next(logs[-1]).stdout.strip()  # the continuation of 'def '
    # the pretraining inside it said the same (stderr: the run's summary)
    assert f"next: llamaforge generate --ckpt {ckpt} --prompt The" in capsys.readouterr().err


def test_quickstart_accepts_the_power_watts_hint():
    """The carbon line's hint (`set power_watts=...`) is a quickstart setting too."""
    assert quickstart_config(["power_watts=35"]).power_watts == 35.0


def test_rerun_says_it_replaces_the_previous_run(tmp_path, monkeypatch):
    import llamaforge.demos.quickstart as qs

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"val_loss": 3.8}')

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(qs, "prepare", stop)
    logs: list[str] = []
    with pytest.raises(Stop):
        run_quickstart(quickstart_config([f"out={out}"]), log=logs.append)
    assert "holds a previous quickstart run: this run replaces it" in logs[0]
    logs.clear()
    with pytest.raises(Stop):
        run_quickstart(quickstart_config([f"out={tmp_path / 'fresh'}"]), log=logs.append)
    assert not any("previous" in line for line in logs)


def test_loss_plot_draws_the_runs_unigram_baseline(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from llamaforge.training.metrics import plot_run

    rows = [{"step": s, "tokens": 4096 * s, "loss": 7.0 - s / 10} for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn: list[float] = []
    original = Axes.axhline

    def record(self, y=0, *args, **kwargs):
        drawn.append(y)
        return original(self, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "axhline", record)
    plot_run(tmp_path)
    assert drawn == []  # a run that knows no baseline
    (tmp_path / "summary.json").write_text(json.dumps({"unigram_loss": 6.133}))
    path = plot_run(tmp_path)
    assert drawn == [6.133] and path.read_bytes()[:4] == b"\x89PNG"
