import json

import pytest

import llamaforge
from llamaforge.quickstart import quickstart_config, run_quickstart


@pytest.mark.slow
def test_quickstart_learns_and_leaves_a_usable_checkpoint(tmp_path):
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
    summary = run_quickstart(cfg, log=lambda s: None)
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
