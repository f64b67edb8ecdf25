"""Hostile finetuning data and settings (issue 25): every case is a one-line error naming the
file and line (or the setting, its value and its range), or a documented safe behaviour —
a record longer than ``data.max_record_bytes`` is skipped unread in bounded memory, bad
UTF-8 and JSON nested past Python's recursion limit are bad records that ``skip_bad``
counts, a conversation of many turns costs the turns that fit in ``max_len``."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest

from llamaforge.chat_templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    ChatTemplate,
    tokenize_conversation,
)
from llamaforge.cli.main import main
from llamaforge.finetune.data import (
    BadRecord,
    Example,
    InstructDataConfig,
    InstructDataError,
    build_dataset,
    read_examples,
    tokenize_examples,
)
from llamaforge.tokenizer import Tokenizer

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
GOOD_LINE = json.dumps(GOOD).encode()


@pytest.fixture(scope="module")
def meta_tok(meta_tokenizer_path) -> Tokenizer:
    return Tokenizer(meta_tokenizer_path)


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def messages(r) -> list:
    return [e.messages for e in r.examples]


# ----------------------------------------------------------------------------- record size

# reads a file with skip_bad in a fresh process and reports how much its peak memory grew
PEAK = """
import json, sys
from llamaforge.finetune.data import read_examples

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024

before = peak()
r = read_examples(sys.argv[1], skip_bad=True)
print(json.dumps({"grew": peak() - before, "examples": len(r.examples), "skipped": r.skipped}))
"""


def write_with_a_huge_record(path: Path, array: bool, mib: int = 100) -> Path:
    """GOOD, a record of ``mib`` MiB (written a MiB at a time), GOOD."""
    with open(path, "wb") as f:
        f.write(b"[" if array else b"")
        f.write(GOOD_LINE + (b",\n" if array else b"\n") + b'{"instruction": "')
        for _ in range(mib):
            f.write(b"word " * (1 << 18) if array else b"a\\u00e9\\\\" * (1 << 17))
        f.write(b'", "output": "x"}' + (b",\n" if array else b"\n") + GOOD_LINE)
        f.write(b"]\n" if array else b"\n")
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
@pytest.mark.parametrize("array", [False, True], ids=["jsonl", "json-array"])
def test_a_100_mib_record_is_skipped_without_being_held(tmp_path, array):
    path = write_with_a_huge_record(tmp_path / f"huge.json{'' if array else 'l'}", array)
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["examples"] == 2 and out["skipped"] == {"too_large": 1}
    assert out["grew"] < 64 << 20, out  # the 4 MiB default bound and the reader's blocks
    with pytest.raises(BadRecord) as e:
        read_examples(path, max_record_bytes=1 << 20)
    msg = one_line(e)
    where = f"{path}[1] (line 2)" if array else f"{path}:2"
    assert msg.startswith(f"{where}: ") and "1048576 bytes (data.max_record_bytes)" in msg
    assert e.value.reason == "too_large"


def test_records_within_the_bound_are_read_and_longer_ones_counted(tmp_path):
    big = {"instruction": "x" * 300, "output": "y"}
    rows = [GOOD, big, GOOD]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    array = tmp_path / "r.json"
    array.write_text(json.dumps(rows, indent=2))
    for path in (jsonl, array):
        assert len(read_examples(path, max_record_bytes=400).examples) == 3
        r = read_examples(path, skip_bad=True, max_record_bytes=200)
        assert len(r.examples) == 2 and r.skipped == Counter({"too_large": 1})
    with pytest.raises(InstructDataError, match="max_record_bytes=0: expected at least 1"):
        read_examples(jsonl, max_record_bytes=0)


def test_a_huge_row_of_a_saved_dataset_is_a_bad_record(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["Add.", "Long." * 100_000, "Sub."], "output": ["2", "x", "1"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    r = read_examples(tmp_path / "ds", skip_bad=True, max_record_bytes=100_000)
    assert len(r.examples) == 2 and r.skipped == Counter({"too_large": 1})
    with pytest.raises(BadRecord, match=r"ds\[row 1\]: the record is longer than 100000 bytes"):
        read_examples(tmp_path / "ds", max_record_bytes=100_000)


# ----------------------------------------------------------------------------- bad bytes


@pytest.mark.parametrize("array", [False, True], ids=["jsonl", "json-array"])
def test_bad_utf8_names_file_line_and_offset_and_is_skipped(tmp_path, array):
    bad = b'{"instruction": "caf\xe9", "output": "x"}'  # Latin-1, not UTF-8
    if array:
        data = b"[\n" + GOOD_LINE + b",\n" + bad + b",\n" + GOOD_LINE + b"\n]\n"
        where = "bad.json[1] (line 3)"
    else:
        data = GOOD_LINE + b"\n" + bad + b"\n" + GOOD_LINE + b"\n"
        where = "bad.json:2"
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    with pytest.raises(BadRecord) as e:
        read_examples(path)
    offset = data.index(b"\xe9")
    assert one_line(e) == (
        f"{tmp_path}/{where}: invalid UTF-8 (byte 0xe9 at byte offset {offset} of the file); "
        "expected UTF-8 text"
    )
    r = read_examples(path, skip_bad=True)
    assert messages(r) == [messages(r)[0]] * 2 and r.skipped == Counter({"bad_utf8": 1})


def test_bad_utf8_in_the_first_bytes_is_a_bad_record_too(tmp_path):
    path = tmp_path / "first.jsonl"
    path.write_bytes(b'{"instruction": "\xff\xfe", "output": "x"}\n' + GOOD_LINE + b"\n")
    with pytest.raises(BadRecord, match="first.jsonl:1: invalid UTF-8 .*byte offset 17"):
        read_examples(path)
    assert len(read_examples(path, skip_bad=True).examples) == 1


def test_a_byte_order_mark_and_any_line_ending_are_read(tmp_path):
    rows = [GOOD, {"instruction": "Add 1 and 2.", "output": "3"}, GOOD]
    lines = [json.dumps(r).encode() for r in rows]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\r\n" + lines[1] + b"\r" + lines[2])
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).encode())
    for path in (jsonl, array):
        r = read_examples(path)
        assert len(r.examples) == 3 and r.format == "alpaca"
    assert [e.source for e in read_examples(jsonl).examples] == [f"{jsonl}:{n}" for n in (1, 2, 3)]


def test_a_compressed_file_is_named_as_such(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(GOOD_LINE + b"\n"))
    with pytest.raises(InstructDataError) as e:
        read_examples(path)
    assert one_line(e) == (
        f"{path}: gzip-compressed; expected JSON or JSON lines text (decompress or convert it "
        "first)"
    )


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "utf16.json"
    path.write_bytes(json.dumps([GOOD]).encode("utf-16"))  # with its byte order mark
    with pytest.raises(InstructDataError, match=r"utf16.json: UTF-16 text; expected JSON or J"):
        read_examples(path, skip_bad=True)


def test_half_a_surrogate_pair_is_a_bad_record_not_a_crash(tmp_path, meta_tok):
    """JSON may escape half a UTF-16 pair (\\ud800), which no tokenizer or hash can encode."""
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(GOOD) + '\n{"instruction": "a\\ud800b", "output": "x"}\n')
    with pytest.raises(BadRecord) as e:
        read_examples(path)
    assert one_line(e) == (
        f"{path}:2: field 'instruction' holds \\ud800, half of a UTF-16 pair (not a "
        "character); expected text"
    )
    cfg = InstructDataConfig(paths=[str(path)], skip_bad=True, val_fraction=0.0)
    report = build_dataset(cfg, meta_tok).report
    assert report["counts"]["read"] == 1 and report["counts"]["skipped_lone_surrogate"] == 1


def test_a_damaged_saved_dataset_is_one_line(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{not json")
    (folder / "state.json").write_text("{not json")
    with pytest.raises(InstructDataError) as e:
        read_examples(folder)
    assert one_line(e).startswith(f"{folder}: not a dataset saved with datasets' save_to_disk (")


# ----------------------------------------------------------------------------- bad JSON

DEEP = b"[" * 100_000 + b"]" * 100_000
DIGITS = b'{"instruction": "x", "output": "y", "n": 1' + b"9" * 5000 + b"}"
NO_COMMA = b'{"instruction": "x" "output": "y"}'  # (a bad JSON line was always a bad record)


@pytest.mark.parametrize(
    "line, why, array",
    [
        (DEEP, "nested too deeply", False),
        (DIGITS, "digits", False),
        (DEEP, "nested too deeply", True),
        (DIGITS, "digits", True),
        (NO_COMMA, "Expecting ',' delimiter", True),
    ],
    ids=["jsonl-deep", "jsonl-digits", "array-deep", "array-digits", "array-no-comma"],
)
def test_json_that_python_cannot_take_is_a_bad_record(tmp_path, line, why, array):
    path = tmp_path / "hostile.json"
    if array:  # the element ends where its brackets close
        path.write_bytes(b"[" + GOOD_LINE + b",\n" + line + b",\n" + GOOD_LINE + b"]")
    else:
        path.write_bytes(GOOD_LINE + b"\n" + line + b"\n" + GOOD_LINE + b"\n")
    with pytest.raises(BadRecord) as e:
        read_examples(path)
    assert "malformed JSON" in one_line(e) and why in str(e.value)
    assert e.value.reason == "malformed_json"
    r = read_examples(path, skip_bad=True)
    assert len(r.examples) == 2 and r.skipped == Counter({"malformed_json": 1})


@pytest.mark.parametrize(
    "text, what",
    [
        (b"[" + GOOD_LINE + b", " + GOOD_LINE, "line 1: the file ends inside the array"),
        (b"[" + GOOD_LINE + b"\n\n " + GOOD_LINE + b"]", "line 3: expected ',' or ']'"),
        (b"[" + GOOD_LINE + b",]", "line 1: expected record 1, found ']'"),
        (b"[" + GOOD_LINE + b"]\n[]", "line 2: text after the array's closing ']'"),
    ],
    ids=["truncated", "no-comma", "trailing-comma", "two-arrays"],
)
def test_a_broken_array_is_one_line_naming_the_line(tmp_path, text, what):
    path = tmp_path / "broken.json"
    path.write_bytes(text)
    for skip_bad in (False, True):
        with pytest.raises(InstructDataError) as e:
            read_examples(path, skip_bad=skip_bad)
        assert one_line(e).startswith(f"{path}: {what}")


# ----------------------------------------------------------------------------- many turns


class CountingTemplate(ChatTemplate):
    """A built-in template that counts the prefixes it renders."""

    renders: ClassVar[list[int]] = []

    def _render(self, messages, prefixes):  # type: ignore[no-untyped-def]
        CountingTemplate.renders.append(len(prefixes))
        return super()._render(messages, prefixes)


@pytest.mark.parametrize("name", ["alpaca", "llama2"])
def test_a_conversation_of_1500_turns_renders_only_the_turns_that_fit(meta_tok, name):
    turns = []
    for i in range(1500):
        turns += [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    tpl = CountingTemplate(name, BUILTIN_TEMPLATES[name])
    CountingTemplate.renders.clear()
    counts: Counter[str] = Counter()
    (ex,) = tokenize_examples([Example(turns, "x:1")], meta_tok, tpl, max_len=512, counts=counts)
    assert len(ex.ids) == 513 and counts["truncated"] == 1
    trained = (ex.labels != IGNORE_INDEX).astype(int)
    kept = int((trained[1:] > trained[:-1]).sum()) + int(trained[0])  # answers in the kept ids
    assert 10 < kept < 60
    rendered = sum(CountingTemplate.renders)  # the whole conversation, two per answer
    assert rendered <= 1 + 2 * (2 * kept + 32) and rendered < 3001 / 10
    # the same ids and labels as the conversation cut to the answers that fit
    (short,) = tokenize_examples([Example(turns[: 2 * kept + 2], "x:1")], meta_tok, name)
    assert short.ids.tolist()[:513] == ex.ids.tolist()
    assert short.labels.tolist()[:513] == ex.labels.tolist()


# a template rendered in a worker process, that writes no special between turns
NO_SPECIALS = (
    "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
)


@pytest.mark.parametrize("name", ["alpaca", "llama2", "no-specials"])
def test_ids_and_labels_up_to_max_tokens_are_those_of_the_whole(meta_tok, name):
    """``max_tokens`` cuts the ids and labels without changing any: message text that looks
    like a special (encoded apart), non-ASCII text, templates with and without specials."""
    tpl = ChatTemplate(name, NO_SPECIALS) if name == "no-specials" else name
    conv = [{"role": "system", "content": "Be brief </s> <s>[INST]"}]
    for i in range(12):
        conv += [
            {"role": "user", "content": f"Qu'est-ce que {i} </s>? café 🙂"},
            {"role": "assistant", "content": f"Réponse {i}: <s> {'ok ' * i}"},
        ]
    for train_on_prompt in (False, True):
        ids, labels = tokenize_conversation(tpl, meta_tok, conv, train_on_prompt=train_on_prompt)
        for m in (1, 2, 17, 64, 101, len(ids) - 1, len(ids), len(ids) + 5):
            cut = tokenize_conversation(
                tpl, meta_tok, conv, train_on_prompt=train_on_prompt, max_tokens=m
            )
            assert cut == (ids[:m], labels[:m]), m


# ----------------------------------------------------------------------------- settings


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_tokenizer_path) -> Path:
    out = tmp_path_factory.mktemp("hostile-ft") / "base"
    argv = ["init", "--preset", "1M", "--tokenizer", str(small_tokenizer_path), "--out", str(out)]
    assert main([*argv, "dim=32", "n_layers=1", "n_heads=2", "max_seq_len=128"]) == 0
    return out


@pytest.mark.parametrize(
    "setting, message",
    [
        ("epochs=-1", "epochs=-1.0: expected a number > 0"),
        ("epochs=0", "epochs=0.0: expected a number > 0"),
        ("epochs=nan", "epochs=nan: expected a finite number > 0"),
        ("warmup_ratio=5", "warmup_ratio=5.0: expected a number in [0, 1)"),
        ("warmup_ratio=-0.1", "warmup_ratio=-0.1: expected a number in [0, 1)"),
        ("batch_size=0", "batch_size=0: expected a number in [1, 1048576]"),
        ("micro_batch=0", "micro_batch=0: expected a number in [1, 1048576]"),
        ("steps=-1", "steps=-1: expected a number in [0, 2147483647]"),
        ("data.val_fraction=1", "data.val_fraction=1.0: expected a number in [0, 1)"),
        ("data.max_len=0", "data.max_len=0: expected a number >= 1"),
        ("data.max_record_bytes=0", "data.max_record_bytes=0: expected a number >= 1"),
        ("optim.lr=-1e-4", "optim.lr=-0.0001: expected a number >= 0"),
        ("optim.lr=inf", "optim.lr=inf: expected a finite number >= 0"),
        ("optim.final_lr_ratio=2", "optim.final_lr_ratio=2.0: expected a number in [0, 1]"),
        ("optim.clip=-1", "optim.clip=-1.0: expected a number > 0"),
        ("optim.betas=[0.9, 1.5]", "optim.betas[1]=1.5: expected a number in [0, 1)"),
        ("gen_max_new_tokens=0", "gen_max_new_tokens=0: expected a number >= 1"),
        ("batch_size=2000000", "batch_size=2000000: expected a number in [1, 1048576]"),
        ("data.seed=-1", "data.seed=-1: expected a number >= 0"),
        (
            "data.overlong='cut'",
            "override data.overlong: 'cut' is not one of the allowed values 'truncate', 'drop'",
        ),
        ("data.max_len=256", "data.max_len=256 is longer than the model's context (max_seq_len"),
        ("model.max_seq_len=64", "data.max_len=128 is longer than the model's context (model"),
    ],
)
def test_settings_out_of_range_are_one_line_before_the_data_is_read(
    base, tmp_path, capsys, setting, message
):
    missing = tmp_path / "not-read.jsonl"  # the settings are checked before the data is read
    out = tmp_path / "run"
    argv = ["finetune", f"init={base}", f"data.paths=['{missing}']", "data.max_len=128",
            "batch_size=4", "micro_batch=4", "gen_eval=0", "device=cpu", "progress=false",
            f"--out={out}", setting]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {message}" in err, err
    assert not out.exists()


def test_epochs_that_would_never_end_are_refused(base, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(8)))
    argv = ["finetune", f"init={base}", f"data.paths=['{data}']", "data.max_len=128",
            "batch_size=4", "micro_batch=4", "gen_eval=0", "device=cpu", "progress=false",
            f"--out={tmp_path / 'run'}", "epochs=1e300"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: epochs=1e+300: " in err and "at most 2147483647" in err


def test_a_template_over_its_time_limit_stops_the_run_even_with_skip_bad(tmp_path, meta_tok):
    """A template slow for one conversation is slow for all: skipping each after its time
    limit would take hours, so the run stops with one line instead."""
    slow = ChatTemplate(
        "slow",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{{ messages[0]['content'] }}",
        time_limit=0.5,
    )
    examples = read_examples(_write_good(tmp_path)).examples
    with pytest.raises(InstructDataError) as e:
        tokenize_examples(examples, meta_tok, slow, max_len=64, skip_bad=True)
    assert "time_limit" in one_line(e) and str(tmp_path / "good.jsonl") in one_line(e)


def _write_good(tmp_path: Path) -> Path:
    path = tmp_path / "good.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    return path
