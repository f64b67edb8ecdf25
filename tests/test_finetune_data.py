"""Instruction data: readers, tokenized examples and the padded/packed loaders."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from llamaforge.chat_templates import IGNORE_INDEX
from llamaforge.config import from_dict
from llamaforge.finetune.data import (
    BadRecord,
    Example,
    InstructDataConfig,
    InstructDataError,
    PackedLoader,
    PaddedLoader,
    TokenizedExample,
    build_dataset,
    example_is_val,
    padding_waste,
    read_examples,
    tokenize_examples,
)
from llamaforge.model import document_mask
from llamaforge.tokenizer import Tokenizer

from .conftest import shared_file


@pytest.fixture(scope="module")
def meta_tok(meta_tokenizer_path) -> Tokenizer:
    return Tokenizer(meta_tokenizer_path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def user(c):
    return {"role": "user", "content": c}


def asst(c):
    return {"role": "assistant", "content": c}


# -- readers -----------------------------------------------------------------------------


def test_alpaca_array_and_jsonl(tmp_path):
    recs = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=2))
    write_jsonl(tmp_path / "a.jsonl", recs)
    for name in ("a.json", "a.jsonl"):
        r = read_examples(tmp_path / name)
        assert r.format == "alpaca"
        assert [e.messages for e in r.examples] == [
            [user("Add the numbers.\n\n2 and 3"), asst("5")],
            [user("Say hi."), asst("Hi!")],
        ]
    assert read_examples(tmp_path / "a.json").examples[1].source.endswith("a.json[1]")
    assert read_examples(tmp_path / "a.jsonl").examples[1].source.endswith("a.jsonl:2")


def test_dolly(tmp_path):
    rec = {
        "instruction": "Who wrote it?",
        "context": "Hamlet is a play by Shakespeare.",
        "response": "Shakespeare.",
        "category": "closed_qa",
    }
    r = read_examples(write_jsonl(tmp_path / "d.jsonl", [rec]))
    assert r.format == "dolly"
    assert r.examples[0].messages == [
        user("Who wrote it?\n\nHamlet is a play by Shakespeare."),
        asst("Shakespeare."),
    ]


def test_openai_messages(tmp_path):
    conv = [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        asst("Hello."),
        user("Bye"),
        asst("Bye."),
    ]
    r = read_examples(write_jsonl(tmp_path / "o.jsonl", [{"messages": conv}]))
    assert r.format == "openai" and r.examples[0].messages == conv


def test_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["Add.", "Sub."], "input": ["1 1", "2 1"], "output": ["2", "1"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    r = read_examples(tmp_path / "ds")
    assert r.format == "alpaca" and len(r.examples) == 2
    assert r.examples[1].messages == [user("Sub.\n\n2 1"), asst("1")]
    assert "[row 1]" in r.examples[1].source
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(read_examples(tmp_path / "dd").examples) == 2
    with pytest.raises(InstructDataError, match="no split 'test'.*'train'"):
        read_examples(tmp_path / "dd", split="test")


def test_forced_format_and_unknown(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2", "x": 1}])
    assert read_examples(f, "qa").format == "qa"
    with pytest.raises(InstructDataError, match="unknown format 'nope'"):
        read_examples(f, "nope")
    g = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(InstructDataError, match=r"u.jsonl:1.*cannot tell the format.*alpaca"):
        read_examples(g)


BAD = [
    ('{"instruction": "ok", "output": "fine"}', None),
    ('{"instruction": "broken", "output": ', "malformed_json"),
    ('{"instruction": "no output"}', "missing_field"),
    ('{"instruction": "empty", "output": "  "}', "empty_response"),
    ('{"instruction": "typed", "output": 3}', "wrong_type"),
    ("[1, 2]", "not_an_object"),
]


def test_bad_records_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(line for line, _ in BAD) + "\n")
    with pytest.raises(BadRecord, match=r"bad.jsonl:2: malformed JSON") as e:
        read_examples(f)
    assert e.value.reason == "malformed_json"
    r = read_examples(f, skip_bad=True)
    assert len(r.examples) == 1
    assert r.skipped == Counter(reason for _, reason in BAD if reason)
    f.write_text(BAD[0][0] + "\n" + BAD[2][0] + "\n")
    with pytest.raises(BadRecord, match=r"bad.jsonl:2: missing field 'output'"):
        read_examples(f)


@pytest.mark.parametrize(
    "turns, reason, match",
    [
        (
            [("human", "a"), ("human", "b")],
            "not_alternating",
            "message 1 is 'user', expected 'assistant'",
        ),
        ([("human", "a"), ("bing", "b")], "unknown_role", "unknown role 'bing'"),
        ([("human", "a"), ("gpt", "")], "empty_response", "empty"),
        ([("human", "a"), ("gpt", "b"), ("human", "c")], "no_response", "does not end"),
        ([("gpt", "a"), ("human", "b")], "not_alternating", "expected 'user'"),
    ],
)
def test_sharegpt_bad_conversations(tmp_path, turns, reason, match):
    good = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    bad = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    (tmp_path / "s.json").write_text(json.dumps([good, bad]))
    with pytest.raises(BadRecord, match=rf"s.json\[1\].*{match}") as e:
        read_examples(tmp_path / "s.json")
    assert e.value.reason == reason
    r = read_examples(tmp_path / "s.json", skip_bad=True)
    assert r.skipped == Counter({reason: 1})
    assert r.examples[0].messages[0] == {"role": "system", "content": "s"}


def test_self_instruct_real():
    f = shared_file("instruct/self-instruct/seed_tasks.jsonl")
    r = read_examples(f)
    tasks = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    assert r.format == "self_instruct" and len(tasks) == 175
    assert len(r.examples) == sum(len(t["instances"]) for t in tasks)
    first = r.examples[0].messages
    assert first[0]["content"].startswith("Is there anything I can eat for a breakfast")
    assert first[1]["content"].startswith("Yes, you can have 1 oatmeal")
    r2 = read_examples(shared_file("instruct/self-instruct/user_oriented_instructions.jsonl"))
    assert r2.format == "self_instruct" and len(r2.examples) >= 252


def test_sharegpt_real():
    r = read_examples(shared_file("instruct/fastchat/dummy_conversation.json"), skip_bad=True)
    assert r.format == "sharegpt"
    assert len(r.examples) + sum(r.skipped.values()) == 500
    assert r.examples[0].messages[:2] == [
        user("Who are you?"),
        asst(
            "I am Vicuna, a language model trained by researchers from Large Model Systems "
            "Organization (LMSYS)."
        ),
    ]
    assert max(len(e.messages) for e in r.examples) >= 4  # multi-turn


def test_gsm8k_real():
    r = read_examples(shared_file("eval/gsm8k/train.jsonl"))
    assert r.format == "qa" and len(r.examples) == 7473
    assert r.examples[0].messages[1]["content"].endswith("#### 72")


# -- tokenized examples ------------------------------------------------------------------


def test_val_split_is_stable_and_by_content():
    msgs = [[user(f"q{i}"), asst(f"a{i}")] for i in range(2000)]
    val = [example_is_val(m, 0.1) for m in msgs]
    assert 150 < sum(val) < 250
    assert val == [example_is_val(list(m), 0.1) for m in msgs]
    assert not any(example_is_val(m, 0.0) for m in msgs)


def test_overlong_truncate_and_drop(meta_tok):
    exs = [
        Example([user("Say a lot."), asst("word " * 200)], "x:1"),
        Example([user("Short?"), asst("Yes.")], "x:2"),
    ]
    counts: Counter[str] = Counter()
    kept = tokenize_examples(exs, meta_tok, "alpaca", max_len=64, counts=counts)
    assert [len(e.ids) for e in kept][0] == 65 and counts["truncated"] == 1
    counts = Counter()
    kept = tokenize_examples(exs, meta_tok, "alpaca", max_len=64, overlong="drop", counts=counts)
    assert [e.source for e in kept] == ["x:2"] and counts["dropped_overlong"] == 1
    counts = Counter()
    assert tokenize_examples(exs[:1], meta_tok, "alpaca", max_len=8, counts=counts) == []
    assert counts["dropped_no_target_after_truncation"] == 1


def test_build_dataset_report(tmp_path, meta_tok):
    recs = [{"question": f"What is {i} + {i}?", "answer": f"{2 * i}"} for i in range(300)]
    recs.append({"question": "broken"})
    f = write_jsonl(tmp_path / "qa.jsonl", recs)
    cfg = from_dict(
        InstructDataConfig,
        {"paths": [str(f)], "val_fraction": 0.1, "skip_bad": True, "template": "llama2"},
    )
    ds = build_dataset(cfg, meta_tok)
    rep = ds.report
    assert rep["counts"]["read"] == 300 and rep["counts"]["skipped_missing_field"] == 1
    assert len(ds.train) + len(ds.val) == 300 and 10 < len(ds.val) < 60
    assert rep["train"]["examples"] == len(ds.train)
    trained = sum(int((e.labels[1:] != IGNORE_INDEX).sum()) for e in ds.train)
    assert rep["train"]["trained_tokens"] == trained > 0
    assert rep["train"]["prompt_tokens"] > trained
    assert rep["files"][str(f)]["format"] == "qa"
    assert rep["counts"]["truncated"] == rep["counts"]["dropped_overlong"] == 0


# -- loaders -----------------------------------------------------------------------------


def synthetic(n: int, seed: int = 0) -> list[TokenizedExample]:
    """Examples of 3..20 tokens; ids encode (example, position) so mixing shows; the first
    half of each is prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 21))
        ids = 1000 * (i + 1) + np.arange(length)
        labels = ids.copy()
        labels[: length // 2] = IGNORE_INDEX
        out.append(TokenizedExample(ids, labels, f"syn:{i}"))
    return out


def example_of(token: int) -> int:
    return token // 1000 - 1


def test_padded_batches():
    exs = synthetic(10)
    loader = PaddedLoader(exs, 4, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape and x.shape[0] == 4
    for r in range(4):
        ex = exs[example_of(int(x[r, 0]))]
        n = ex.positions
        assert x.shape[1] >= n
        assert x[r, :n].tolist() == ex.ids[:-1].tolist()
        assert y[r, :n].tolist() == ex.labels[1:].tolist()
        assert (y[r, n:] == IGNORE_INDEX).all()
    x, y = next(PaddedLoader(exs, 4, seq_len=32))
    assert x.shape == (4, 32)


def test_packed_never_crosses_examples():
    exs = synthetic(40)
    S = 32
    loader = PackedLoader(exs, 6, S, seed=3)
    for _ in range(5):
        x, y, extras = next(loader)
        assert sorted(extras) == ["documents", "positions"]  # ids, no (rows, 1, S, S) mask
        pos, docs = extras["positions"], extras["documents"]
        assert x.shape == y.shape == pos.shape == docs.shape == (6, S)
        mask = document_mask(docs, flex=False)  # what attention sees of the row
        for r in range(6):
            at = 0
            while at < S and x[r, at] != 0:
                ex = exs[example_of(int(x[r, at]))]
                n = ex.positions
                # inputs and targets shifted within the example
                assert x[r, at : at + n].tolist() == ex.ids[:-1].tolist()
                assert y[r, at : at + n].tolist() == ex.labels[1:].tolist()
                assert pos[r, at : at + n].tolist() == list(range(n))
                assert (docs[r, at : at + n] == docs[r, at]).all()
                # block-diagonal causal: attends exactly to itself and earlier positions
                block = mask[r, 0, at : at + n]
                expect = torch.zeros(n, S, dtype=torch.bool)
                expect[:, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
                assert torch.equal(block, expect)
                at += n
            assert (y[r, at:] == IGNORE_INDEX).all()
            assert mask[r, 0].any(dim=-1).all()  # no query row without a key
        # a target is never the first token of another example
        firsts = {int(e.ids[0]) for e in exs}
        assert not any(int(t) in firsts for t in y.flatten() if t != IGNORE_INDEX)


@pytest.mark.parametrize("loader", [PaddedLoader, PackedLoader])
@pytest.mark.parametrize(
    "examples, kw, needle",
    [
        (0, {}, "no examples to load"),
        (5, {"global_batch": 3, "world_size": 2}, "global batch 3 is not a positive multiple"),
        (5, {"rank": 2, "world_size": 2}, r"rank 2 is not in \[0, 2\)"),
        (5, {"seq_len": 3}, "more than seq_len=3"),
    ],
)
def test_loaders_refuse_what_cannot_be_loaded(loader, examples, kw, needle):
    """The shared constructor's checks, the same for both loaders."""
    kw = {"global_batch": 2, "seq_len": 32, **kw}
    with pytest.raises(InstructDataError, match=needle):
        loader(synthetic(examples), **kw)


def test_packed_loader_needs_seq_len():
    with pytest.raises(InstructDataError, match="PackedLoader: set seq_len"):
        PackedLoader(synthetic(3), 2)


def test_packed_covers_every_example_once_per_epoch():
    exs = synthetic(50)
    loader = PackedLoader(exs, 1, 40, seed=0)
    seen: Counter[int] = Counter()
    for _ in range(len(loader._epoch(0))):
        x, _, extras = next(loader)
        starts = (extras["positions"][0] == 0) & (x[0] != 0)
        seen.update(example_of(int(t)) for t in x[0][starts])
    assert seen == Counter(range(50))
    assert loader.epoch == 1.0


@pytest.mark.parametrize("packed", [False, True])
def test_resume_mid_epoch(packed):
    exs = synthetic(23)

    def make():
        if packed:
            return PackedLoader(exs, 4, 30, seed=7)
        return PaddedLoader(exs, 4, seed=7)

    a = make()
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(8)]  # crosses epoch boundaries
    b = make()
    b.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = next(b)
        for w, g in zip(want[:2], got[:2]):
            assert torch.equal(w, g)
        if packed:
            assert torch.equal(want[2]["documents"], got[2]["documents"])
            assert torch.equal(want[2]["positions"], got[2]["positions"])
    with pytest.raises(InstructDataError, match="loader state"):
        PaddedLoader(exs, 4, seed=8).load_state_dict(state)


def test_epochs_are_reshuffled():
    exs = synthetic(12)
    loader = PaddedLoader(exs, 12, seed=0)
    e0 = [example_of(int(t)) for t in next(loader)[0][:, 0]]
    e1 = [example_of(int(t)) for t in next(loader)[0][:, 0]]
    assert sorted(e0) == sorted(e1) == list(range(12)) and e0 != e1


@pytest.mark.parametrize("packed", [False, True])
def test_two_ranks_cover_global_batch(packed):
    exs = synthetic(30)

    def make(rank, world):
        if packed:
            return PackedLoader(exs, 4, 30, rank=rank, world_size=world, seed=2)
        return PaddedLoader(exs, 4, seq_len=20, rank=rank, world_size=world, seed=2)

    one, r0, r1 = make(0, 1), make(0, 2), make(1, 2)
    for _ in range(5):
        whole, a, b = next(one), next(r0), next(r1)
        assert a[0].shape[0] == b[0].shape[0] == 2
        assert torch.equal(torch.cat([a[0], b[0]]), whole[0])
        assert torch.equal(torch.cat([a[1], b[1]]), whole[1])
        if packed:
            for key in ("documents", "positions"):
                assert torch.equal(torch.cat([a[2][key], b[2][key]]), whole[2][key])
    assert r0.state_dict() == r1.state_dict() == one.state_dict()


def test_padding_waste():
    exs = synthetic(200)
    w = padding_waste(exs, seq_len=64, batch_size=8)
    assert 0 <= w["packed"] < w["padded"] < 1
    total = sum(e.positions for e in exs)
    rows = -(-total // 64)
    assert w["packed"] >= 1 - total / (rows * 64) - 1e-9


def test_real_data_end_to_end(meta_tok):
    """GSM8K under alpaca, packed: every row is exactly seq_len and trains on answers only."""
    f = shared_file("eval/gsm8k/train.jsonl")
    cfg = InstructDataConfig(paths=[str(f)], template="alpaca", max_len=512, val_fraction=0.01)
    r = read_examples(f)
    tok = tokenize_examples(r.examples[:200], meta_tok, "alpaca", max_len=cfg.max_len)
    x, y, extras = next(PackedLoader(tok, 2, 512))
    assert x.shape == (2, 512)
    trained = meta_tok.decode([int(t) for t in y[0] if t != IGNORE_INDEX])
    assert "####" in trained and "Below is an instruction" not in trained
    w = padding_waste(tok, 512, 8)
    assert w["packed"] < w["padded"]
