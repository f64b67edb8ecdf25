"""``llamaforge quickstart-preference``: the rejected answers are plausible and wrong, and the
demo runs end to end with tiny settings on a tiny instruction-tuned stand-in."""

from __future__ import annotations

import json
import random

from llamaforge.demos.preference import (
    quickstart_preference_config,
    rejected_answer,
    run_quickstart_preference,
)
from llamaforge.demos.stdlib_tasks import StdlibTask


def test_rejected_answers_are_plausible_and_wrong():
    rng = random.Random(0)

    def wrong(task: str, code: str, answer: str, others: list[str] = []) -> str | None:  # noqa: B006
        return rejected_answer(StdlibTask(task, code, answer, answer, "m"), others, rng)

    assert wrong("function_name", "def load(fp, *, cls=None):", "load", ["load", "dump"]) == "dump"
    assert wrong("function_name", "def load(fp):", "load", ["load"]) == "fp"
    assert wrong("first_parameter", "def load(fp, *, cls=None):", "fp") == "cls"
    assert wrong("first_parameter", "def load(fp):", "fp") == "load"
    assert wrong("parameter_count", "def f(a, b):", "2") in ("1", "3")
    assert wrong("parameter_count", "def f():", "0") == "1"
    assert wrong("imported_module", "from os.path import join", "os.path") == "join"
    assert wrong("imported_module", "import xml.etree as et", "xml.etree") == "et"
    assert wrong("imported_module", "import xml.etree", "xml.etree") == "xml"
    assert wrong("imported_module", "import os", "os") is None


def test_demo_end_to_end_with_tiny_settings(save_tiny, tmp_path, capsys):
    sft = save_tiny(seed=0, max_seq_len=128)
    cfg = quickstart_preference_config(
        [f"sft={sft}", f"out={tmp_path / 'demo'}", "pairs=32", "held_out=8", "max_new_tokens=3",
         "dpo.steps=3", "dpo.batch_size=8", "dpo.micro_batch=4", "dpo.data.val_fraction=0.1"]
    )  # fmt: skip
    summary = run_quickstart_preference(cfg, log=print)
    out = capsys.readouterr().out
    assert "preference accuracy" in out and "exact match" in out
    assert summary["data"]["train_pairs"] == 32 and summary["data"]["held_out_pairs"] == 8
    for side in ("before", "after"):
        s = summary["held_out"][side]
        assert 0 <= s["preference_accuracy"] <= 1 and s["n"] == 8
    rows = [json.loads(x) for x in open(summary["data"]["path"])]
    assert len(rows) == 32 and all(r["chosen"] != r["rejected"] for r in rows)
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == summary
