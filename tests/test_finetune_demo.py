"""The embedded instruction-following demo: the stdlib instruction set (deterministic, answers
re-checked with ``ast``, held-out subjects unseen in training, split as finetuning splits) and
``llamaforge quickstart-instruct`` end to end with tiny settings."""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

import pytest

from llamaforge.demos.stdlib_tasks import (
    QUESTIONS,
    TASKS,
    StdlibTask,
    generate_tasks,
    split_tasks,
    write_jsonl,
)
from llamaforge.finetune.data import InstructDataConfig, build_dataset, read_examples

PER_TASK = 300


@pytest.fixture(scope="module")
def tasks() -> list[StdlibTask]:
    return generate_tasks(seed=0, per_task=PER_TASK)


def test_the_set_is_deterministic_balanced_and_seeded(tasks):
    again = generate_tasks(seed=0, per_task=PER_TASK)
    assert again == tasks
    counts = Counter(t.task for t in tasks)
    assert set(counts) == set(TASKS)
    assert all(counts[t] == PER_TASK for t in TASKS)  # the stdlib has more than enough
    assert len({t.instruction for t in tasks}) == len(tasks)
    other = generate_tasks(seed=1, per_task=PER_TASK)
    assert [t.instruction for t in other] != [t.instruction for t in tasks]


def _count(args: ast.arguments) -> int:
    return (
        len(args.posonlyargs)
        + len(args.args)
        + len(args.kwonlyargs)
        + (args.vararg is not None)
        + (args.kwarg is not None)
    )


def test_every_answer_is_what_ast_says(tasks):
    for t in tasks:
        assert t.instruction == f"{QUESTIONS[t.task]}\n{t.code}"
        assert "\n" not in t.code and t.answer and t.answer == t.answer.strip()
        if t.task == "imported_module":
            (node,) = ast.parse(t.code).body
            if isinstance(node, ast.Import):
                assert [a.name for a in node.names] == [t.answer]
            else:
                assert isinstance(node, ast.ImportFrom) and node.level == 0
                assert node.module == t.answer
            continue
        (fn,) = ast.parse(t.code + "\n    pass\n").body
        assert isinstance(fn, ast.FunctionDef) and fn.name == t.subject
        if t.task == "function_name":
            assert t.answer == fn.name
        elif t.task == "parameter_count":
            assert t.answer == str(_count(fn.args))
        else:
            first = (fn.args.posonlyargs + fn.args.args)[0].arg
            assert t.answer == first and first not in ("self", "cls")


def test_held_out_subjects_never_appear_as_training_subjects(tasks):
    train, held = split_tasks(tasks, 0.05)
    assert 0.02 < len(held) / len(tasks) < 0.1
    assert {t.subject for t in train}.isdisjoint(t.subject for t in held)
    defined = {t.code.split("(")[0] for t in train if t.task != "imported_module"}
    for t in held:
        if t.task == "imported_module":
            assert all(u.answer != t.answer for u in train if u.task == "imported_module")
        else:
            assert f"def {t.subject}" not in defined


def test_finetuning_reads_the_file_and_holds_out_the_same_examples(
    tasks, tmp_path, small_tokenizer
):
    path = write_jsonl(tasks, tmp_path / "instructions.jsonl")
    read = read_examples(path)
    assert read.format == "openai" and not read.skipped
    assert [e.messages for e in read.examples] == [t.messages() for t in tasks]
    cfg = InstructDataConfig(paths=[str(path)], template="llama2", max_len=256, val_fraction=0.05)
    dataset = build_dataset(cfg, small_tokenizer)
    train, held = split_tasks(tasks, 0.05)
    assert len(dataset.val) == len(held) and len(dataset.train) == len(train)
    assert dataset.report["counts"]["truncated"] == 0


def test_the_command_maps_flags_to_settings_and_exits_on_the_scores(monkeypatch, capsys):
    import llamaforge.demos.instruct as demo
    from llamaforge.cli.main import main

    seen, result = [], {"after": 0.5}

    def fake(cfg):
        seen.append(cfg)
        return {"held_out": {w: {"all": {"exact_match": result[w] if w in result else 0.0}}
                             for w in ("before", "after")}}  # fmt: skip

    monkeypatch.setattr(demo, "run_quickstart_instruct", fake)
    argv = ["quickstart-instruct", "--out", "runs/x", "--base", "b", "finetune.steps=7"]
    assert main(argv) == 0
    cfg = seen[-1]
    assert (cfg.out, cfg.base, cfg.finetune.steps) == ("runs/x", "b", 7)
    assert cfg.finetune.data.template == "llama2" and cfg.pretrain.steps == 240
    assert cfg.pretrain.model.dim == 128  # the rest of quickstart.toml
    result["after"] = 0.0
    assert main(["quickstart-instruct"]) == 1  # no better than before
    capsys.readouterr()
    assert main(["quickstart-instruct", "--help"]) == 0
    out = capsys.readouterr().out
    assert "tasks.per_task = 3000" in out and "finetune.optim.lr = 0.005" in out


@pytest.mark.slow
def test_quickstart_instruct_end_to_end(tmp_path, monkeypatch, capsys):
    import llamaforge
    from llamaforge.cli.main import main
    from llamaforge.inference.chat import ChatSession, resolve_template

    from .conftest import run_next

    monkeypatch.chdir(tmp_path)  # no runs/quickstart/model here: it pretrains one
    out = tmp_path / "demo"
    tiny = [
        "pretrain.steps=4",
        "pretrain.optim.warmup_steps=1",
        "pretrain.corpus.vocab_size=512",
        "pretrain.model.dim=64",
        "pretrain.model.n_layers=2",
        "pretrain.model.max_seq_len=128",
        "pretrain.data.seq_len=64",
        "pretrain.batch_tokens=512",
        "pretrain.micro_batch=8",
        "pretrain.eval_batches=1",
        "pretrain.device=cpu",
        "tasks.per_task=60",
        "finetune.steps=3",
        "finetune.batch_size=8",
        "finetune.micro_batch=8",
        "finetune.eval_batches=1",
        "finetune.device=cpu",
        "held_out=6",
        "max_new_tokens=4",
        "examples=3",
    ]
    assert main(["quickstart-instruct", f"--out={out}", *tiny]) in (0, 1)
    text, err = capsys.readouterr()
    assert "held-out instructions (6" in text and "exact match" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrained"] and summary["base"] == str(out / "base" / "model")
    assert summary["finetune"]["steps"] == 3
    assert (out / "finetune" / "model" / "params.json").is_file()
    assert (out / "data" / "instructions.jsonl").is_file()
    for when in ("before", "after"):
        scores = summary["held_out"][when]
        assert scores["all"]["n"] == 6 and 0.0 <= scores["all"]["exact_match"] <= 1.0
        assert sum(scores[t]["n"] for t in TASKS if t in scores) == 6
    rows = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len(summary["examples"]) == 3
    assert set(rows[0]) >= {"task", "instruction", "reference", "before", "after"}
    # finetuning said how to chat with its model; the demo ends with it, and with how to
    # type one of its questions (two lines: the first ends with a backslash)
    model = out / "finetune" / "model"
    assert f"next: llamaforge chat --ckpt {model}" in err.splitlines()
    last = text.strip().splitlines()
    assert last[-1] == f"next: llamaforge chat --ckpt {model} --temperature 0"
    typed = [ln[8:] for ln in last[-3:-1]]
    assert [ln[:8] for ln in last[-3:-1]] == ["    >>> ", "    ... "] and typed[0][-1] == "\\"
    replied = run_next(text, "--device", "cpu", input="\n".join(typed) + "\n")
    assert "replies of up to 64 tokens, half of the model's context of 128" in replied.stderr
    tuned, tok = llamaforge.load(model)
    session = ChatSession(tuned, tok, resolve_template(None, tok, model), temperature=0)
    question = typed[0][:-1] + "\n" + typed[1]
    assert question == summary["examples"][0]["instruction"]  # one message, as in training
    assert replied.stdout == session.send(question) + "\n"

    # a second run reuses the base it pretrained
    assert main(["quickstart-instruct", f"--out={out}", *tiny]) in (0, 1)
    again = json.loads((out / "summary.json").read_text())
    assert not again["pretrained"] and again["base"] == str(out / "base" / "model")

    # an explicit base that is not a checkpoint is an error naming the setting
    capsys.readouterr()
    assert main(["quickstart-instruct", f"--out={out}", f"--base={Path('nowhere')}", *tiny]) != 0
    assert "base='nowhere': not a native checkpoint directory" in capsys.readouterr().err
