"""Preference tuning (``llamaforge finetune`` with ``method`` dpo or simpo): the readers of
the common pair shapes, the trained tokens (the final answer only), the reference (the base,
frozen: adapters off with LoRA, stored log-probs with full finetuning), end-to-end runs from
the CLI with their metrics and held-out accuracy, resume, and 2 FSDP2 ranks against 1."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import llamaforge
from llamaforge.chat_templates import load_template
from llamaforge.cli.main import main
from llamaforge.data.base import DataError
from llamaforge.finetune.lora import LoraConfig, apply_lora
from llamaforge.finetune.preference import (
    PairRecord,
    adapters_disabled,
    pair_rows,
    read_pairs,
    sequence_logps,
    tokenize_pair,
)

from .conftest import tiny_model

COLOURS = "red green blue black white yellow brown pink".split()


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- readers -----------------------------------------------------------------------------------


def test_the_common_shapes_are_read_alike(tmp_path):
    prompt, good, bad = "Name a colour.", "Red.", "A table."
    user = {"role": "user", "content": prompt}
    shapes = {
        "strings": {"prompt": prompt, "chosen": good, "rejected": bad},
        "messages": {  # UltraFeedback binarized: the prompt's messages lead both answers
            "prompt": prompt,
            "chosen": [user, {"role": "assistant", "content": good}],
            "rejected": [user, {"role": "assistant", "content": bad}],
        },
        "trl": {  # TRL's conversational form: the prompt apart
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        },
        "hh": {
            "chosen": f"\n\nHuman: {prompt}\n\nAssistant: {good}",
            "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {bad}",
        },
    }
    for name, rec in shapes.items():
        pairs, skipped, fmt = read_pairs(_write(tmp_path / f"{name}.jsonl", [rec, rec]))
        assert fmt == ("messages" if name == "trl" else name) and not skipped
        assert len(pairs) == 2
        assert pairs[0].prompt == [user] and (pairs[0].chosen, pairs[0].rejected) == (good, bad)
        assert pairs[1].source == f"{tmp_path / name}.jsonl:2"


def test_multi_turn_hh_keeps_earlier_turns_as_prompt(tmp_path):
    head = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A colour?"
    rec = {"chosen": head + "\n\nAssistant: Red.", "rejected": head + "\n\nAssistant: No."}
    [pair], _, _ = read_pairs(_write(tmp_path / "hh.jsonl", [rec]))
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("Red.", "No.")


def test_bad_records_are_named_or_skipped_and_counted(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    rows = [good, {"prompt": "p", "chosen": "a"}, "{not json", {**good, "rejected": ""}, good]
    path = _write(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: 'rejected' must be a non-empty string"):
        read_pairs(path)
    rows[1] = {**good, "chosen": 3}
    path = _write(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: 'chosen' must be a non-empty string"):
        read_pairs(path)
    pairs, skipped, _ = read_pairs(path, skip_bad=True)
    assert len(pairs) == 2
    assert sum(skipped.values()) == 3 and skipped["bad_chosen"] == 1, skipped

    def conv(user: str, answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    other = {"chosen": conv("x", "a"), "rejected": conv("y", "b")}
    with pytest.raises(DataError, match=r"x\.jsonl:1: 'chosen' and 'rejected' lead with different"):
        read_pairs(_write(tmp_path / "x.jsonl", [other]))


# -- trained tokens -----------------------------------------------------------------------------


def test_only_the_final_answer_is_trained_golden(small_tokenizer):
    tok, tpl = small_tokenizer, load_template("alpaca")
    prompt = [
        {"role": "user", "content": "Which module parses Python source?"},
        {"role": "assistant", "content": "The tokenize module splits it."},
        {"role": "user", "content": "And into a tree?"},
    ]
    rec = PairRecord(prompt, "The ast module.", "The json module.", "golden")
    pair = tokenize_pair(tpl, tok, rec, 512, Counter())
    assert pair is not None
    for side, answer in ((pair.chosen, rec.chosen), (pair.rejected, rec.rejected)):
        trained = side.labels != -100
        assert (side.labels[trained] == side.ids[trained]).all()
        # one contiguous run at the end: the final answer and its eos, nothing of the prompt
        first = int(trained.argmax())
        assert trained[first:].all() and not trained[:first].any()
        ids = side.ids[trained].tolist()
        assert ids[-1] == tok.eos_id
        assert tok.decode(ids[:-1]).strip() == answer
    x, y, extras = pair_rows([pair], [0])
    assert x.shape[0] == 2 and extras["index"].tolist() == [0, 0]
    n = pair.chosen.positions
    assert (y[0, :n] == torch.from_numpy(pair.chosen.labels[1:])).all()


# -- the reference ------------------------------------------------------------------------------


def test_lora_reference_is_the_base_and_ignores_the_adapters(small_tokenizer):
    base = tiny_model(small_tokenizer.vocab_size, seed=0, norm_gains=True)
    model = tiny_model(small_tokenizer.vocab_size, seed=0, norm_gains=True)
    apply_lora(model, LoraConfig(enabled=True, targets=["all", "output"], rank=4, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, small_tokenizer.vocab_size, (4, 20), generator=g)
    y = x.roll(-1, 1)
    y[:, :8] = -100
    want = sequence_logps(base, x, y, {})[0]
    for std in (0.05, 0.5):  # changing the adapters changes the policy, not the reference
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, std, generator=g)
        with torch.no_grad(), adapters_disabled(model):
            ref = sequence_logps(model, x, y, {})[0]
        assert torch.equal(ref, want)
        policy = sequence_logps(model, x, y, {})[0]
        assert (policy - want).abs().max() > 1e-3
    assert all("forward" not in vars(m) for m in model.modules())  # switched back on


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_tokenizer_path) -> Path:
    out = tmp_path_factory.mktemp("pref") / "base"
    argv = ["init", "--preset", "1M", "--tokenizer", str(small_tokenizer_path), "--out", str(out)]
    assert main([*argv, "dim=64", "n_layers=2", "n_heads=4", "max_seq_len=128"]) == 0
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rows = [
        {"prompt": f"Repeat the word {c}, example {i}.", "chosen": c,
         "rejected": COLOURS[(i + 3) % len(COLOURS)]}
        for i, c in enumerate(COLOURS[i % len(COLOURS)] for i in range(48))
    ]  # fmt: skip
    return _write(tmp_path_factory.mktemp("prefdata") / "pairs.jsonl", rows)


def args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "method=dpo",
        f"init={base}",
        f"data.paths=['{data}']",
        "data.max_len=128",
        "data.val_fraction=0.25",
        "batch_size=8",
        "micro_batch=4",
        "steps=4",
        "optim.lr=1e-3",
        "gen_eval=2",
        "gen_max_new_tokens=3",
        "eval_batches=2",
        "checkpoint.every=2",
        "device=cpu",
        "progress=false",
        f"--out={out}",
        *extra,
    ]


def _rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize(
    "extra",
    [(), ("lora.enabled=true", "lora.rank=4"), ("method=simpo",)],
    ids=["full", "lora", "simpo"],
)
def test_preference_run_from_the_cli(base, pairs, tmp_path, capsys, extra):
    out = tmp_path / "run"
    assert main(args(base, pairs, out, *extra)) == 0
    err = capsys.readouterr().err
    assert "held-out preference accuracy" in err and "exact match" in err
    summary = json.loads((out / "summary.json").read_text())
    acc = summary["preference_accuracy"]
    assert acc["n"] == summary["data"]["val"]["pairs"] > 0 and 0 <= acc["after"] <= 1
    ev = summary["evaluation"]["held_out"]
    assert ev["before"]["n"] == ev["after"]["n"] == 2
    rows = _rows(out)
    assert rows.keys() == {1, 2, 3, 4}
    for r in rows.values():
        assert {
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
        } <= r.keys()
        assert r["rewards/margins"] == pytest.approx(
            r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6
        )
    if "method=simpo" not in extra:  # step 1's policy is the reference: DPO's rewards are 0
        assert rows[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
        assert rows[1]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert abs(rows[4]["rewards/margins"]) > 5e-5  # … and not after an update
    lora = "lora.enabled=true" in extra
    # the base's log-probs: DPO's reference, and the "before" of held-out accuracy
    assert (out / "reference_logps.pt").exists() == (not lora)
    assert (summary.get("adapter") is not None) == lora


def test_full_reference_is_the_base_stored_once(base, pairs, tmp_path):
    out = tmp_path / "full"
    assert main(args(base, pairs, out, "gen_eval=0")) == 0
    stored = torch.load(out / "reference_logps.pt", weights_only=True)["logps"].view(-1, 2)
    from llamaforge.config import load_config
    from llamaforge.finetune.preference import build_preference_dataset
    from llamaforge.finetune.run import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, args(base, pairs, out)[1:-2])
    model, tok = llamaforge.load(base, device="cpu")
    data = build_preference_dataset(cfg, tok)
    every = [*data.train, *data.val]
    x, y, _ = pair_rows(every, list(range(len(every))))
    with torch.no_grad():
        want = sequence_logps(model.float(), x, y, {})[0].view(-1, 2)
    assert stored.shape == want.shape
    assert torch.allclose(stored, want, atol=1e-4), (stored - want).abs().max()
    tuned, _ = llamaforge.load(out / "model", device="cpu")
    with torch.no_grad():
        after = sequence_logps(tuned.float(), x, y, {})[0].view(-1, 2)
    assert (after - want).abs().max() > 1e-2  # the policy moved; the stored reference did not


@pytest.mark.parametrize("extra", [(), ("lora.enabled=true", "lora.rank=4")], ids=["full", "lora"])
def test_stop_and_resume_is_bitwise_identical(base, pairs, tmp_path, extra):
    extra = (*extra, "gen_eval=0", "steps=6")
    straight = tmp_path / "straight"
    assert main(args(base, pairs, straight, *extra)) == 0
    stopped = tmp_path / "stopped"
    assert main(args(base, pairs, stopped, *extra, "stop_at=2")) == 0
    assert main(args(base, pairs, stopped, *extra)) == 0

    def losses(out: Path) -> dict[int, tuple]:
        return {s: (r["loss"], r["grad_norm"], r["rewards/margins"]) for s, r in _rows(out).items()}

    assert losses(stopped) == losses(straight)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_match_one_and_resume_on_one(base, pairs, tmp_path, lora):
    """FSDP2 over 2 ranks equals 1 process (each rank reads half the pairs; the loss is the
    mean over the global batch's pairs), and its checkpoint resumes in 1 process."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    extra = ["gen_eval=0", "steps=4"]
    if lora:
        extra += ["lora.enabled=true", "lora.rank=4", "lora.dropout=0"]

    def run(out: Path, nproc: int, *more: str) -> dict[int, dict]:
        port = str(29500 + (os.getpid() + 23 + nproc) % 1000)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                    str(nproc), "--master_port", port]  # fmt: skip
        cmd = [*launcher, "-m", "llamaforge", *args(base, pairs, out, *extra, *more)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return _rows(out)

    one = run(tmp_path / "one", 1)
    assert run(tmp_path / "two", 2, "stop_at=2").keys() == {1, 2}
    two_then_one = run(tmp_path / "two", 1)  # resumed from the 2-rank checkpoint at step 2
    assert one.keys() == two_then_one.keys() == {1, 2, 3, 4}
    for step in one:
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            assert two_then_one[step][key] == pytest.approx(one[step][key], abs=1e-4), (step, key)


def test_bad_settings_are_clear_errors(base, pairs, tmp_path, capsys):
    assert main(args(base, pairs, tmp_path / "a", "preference.beta=0")) != 0
    assert "preference.beta=0" in capsys.readouterr().err
    assert main(args(base, pairs, tmp_path / "b", "data.packing=true")) != 0
    assert "data.packing" in capsys.readouterr().err
