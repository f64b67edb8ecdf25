"""The evaluation engine (LlamaforgeLM, runner, report, CLI) on a real tiny model and tokenizer."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from llamaforge.checkpoint.native import save
from llamaforge.eval.base import (
    Doc,
    Generate,
    Loglikelihood,
    Request,
    Result,
    Rolling,
    Task,
    TaskInfo,
)
from llamaforge.eval.lm import LlamaforgeLM
from llamaforge.inference.generate import generate_completions

from .conftest import tiny_model

MAX_LEN = 48

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Rome"], 0),
    ("Which number is even?", ["three", "four", "seven"], 1),
    ("What colour is the sky on a clear day?", ["green", "red", "blue"], 2),
    ("Which animal barks?", ["a dog", "a cat"], 0),
    ("What does a function return by default in Python?", ["None", "zero", "False"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which keyword defines a function?", ["def", "class", "import"], 0),
    ("What is two plus two?", ["three", "four", "five"], 1),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mc_rows() -> list[dict]:
    return [{"question": q, "choices": c, "gold": g} for q, c, g in QUESTIONS]


@dataclass
class TinyMC(Task):
    """Multiple choice from test.jsonl (few-shot pool: train.jsonl): acc and acc_char."""

    def __post_init__(self) -> None:
        self.info = TaskInfo(
            name=self.options.get("name", "tiny_mc"),
            table="3",
            main_metric="acc",
            default_shots=0,
            files=("tiny/test.jsonl", "tiny/train.jsonl"),
        )

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        rows = [json.loads(x) for x in (data_dir / "tiny/test.jsonl").read_text().splitlines()]
        return rows[:limit] if limit is not None else rows

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        lines = (data_dir / "tiny/train.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    def prompt(self, doc: Doc) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        prefix = "".join(f"{self.prompt(s)} {s['choices'][s['gold']]}\n\n" for s in shots)
        ctx = prefix + self.prompt(doc)
        return [Loglikelihood(ctx, f" {c}") for c in doc["choices"]]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        lps = [r.logprob for r in results]  # type: ignore[union-attr]
        norm = [lp / len(" " + c) for lp, c in zip(lps, doc["choices"])]
        best = max(range(len(lps)), key=lambda i: lps[i])
        best_n = max(range(len(norm)), key=lambda i: norm[i])
        return {"acc": float(best == doc["gold"]), "acc_char": float(best_n == doc["gold"])}


@dataclass
class TinyGen(Task):
    """Greedy generation, a rolling perplexity and a sampled request per doc."""

    def __post_init__(self) -> None:
        self.info = TaskInfo("tiny_gen", "4", "nonempty", 0, ("tiny/test.jsonl",))

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        return TinyMC().load(data_dir, limit)

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        return TinyMC().fewshot_docs(data_dir)

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        ctx = f"Q: {doc['question']}\nA:"
        return [
            Generate(ctx, until=("\n",), max_new_tokens=6),
            Rolling(doc["question"]),
            Generate(ctx, until=("\n",), max_new_tokens=4, temperature=0.8, num_samples=2),
        ]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        greedy, logp, samples = results
        assert isinstance(logp, float) and isinstance(greedy, list) and len(samples) == 2
        return {"nonempty": float(bool(greedy[0])), "logp": logp}


class CountingLM:
    """Counts the requests that reach the real model underneath, then delegates."""

    def __init__(self, lm: LlamaforgeLM) -> None:
        self.lm, self.n = lm, 0
        self.ckpt_dir = lm.ckpt_dir
        self.describe = lm.describe

    def loglikelihood(self, requests):
        self.n += len(requests)
        return self.lm.loglikelihood(requests)

    def loglikelihood_rolling(self, requests):
        self.n += len(requests)
        return self.lm.loglikelihood_rolling(requests)

    def generate(self, requests):
        self.n += len(requests)
        return self.lm.generate(requests)


@pytest.fixture(scope="module", name="tiny_model")
def _tiny_model(small_tokenizer):
    # a less flat distribution than the 0.02 init: greedy is not all ties
    return tiny_model(
        small_tokenizer.vocab_size, n_kv_heads=None, max_seq_len=MAX_LEN, output_scale=25
    )


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, small_tokenizer, tmp_path_factory) -> Path:
    return save(tiny_model, small_tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "tiny").mkdir()
    write_jsonl(root / "tiny/test.jsonl", mc_rows())
    train = [
        {"question": f"Is {i} a number?", "choices": ["yes", "no"], "gold": 0} for i in range(6)
    ]
    write_jsonl(root / "tiny/train.jsonl", train)
    return root


def make_lm(model, tok, **kw) -> LlamaforgeLM:
    return LlamaforgeLM(model, tok, progress=False, **kw)


def reference_logprob(model, tok, lm: LlamaforgeLM, req: Loglikelihood):
    """log P(continuation | context) from one full forward pass of the unpadded sequence."""
    ctx, cont = lm.encode_pair(req.context, req.continuation)
    full = list(ctx + cont)[-(MAX_LEN + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([full[:-1]]))[0].float()
    logp = torch.log_softmax(logits, -1)
    n = len(cont)
    pos = range(len(full) - 1 - n, len(full) - 1)
    lp = sum(float(logp[p, full[p + 1]]) for p in pos)
    greedy = all(int(logits[p].argmax()) == full[p + 1] for p in pos)
    return lp, greedy, n


REQS = [
    Loglikelihood("The capital of France is", " Paris"),
    Loglikelihood("Question: Which keyword defines a function?\nAnswer:", " def"),
    Loglikelihood("Question: Which keyword defines a function?\nAnswer:", " class"),
    Loglikelihood("Q: what does the len function return?\nA:", " the number of items in it"),
    Loglikelihood("", " hello world"),
    Loglikelihood("A context that ends in a space ", "word"),
    Loglikelihood("The capital of France is", " Paris"),  # duplicate
]


def test_loglikelihood_matches_full_forward_pass(tiny_model, small_tokenizer):
    lm = make_lm(tiny_model, small_tokenizer)
    got = lm.loglikelihood(REQS)
    assert lm.forward_passes == 1  # every request in one padded batch
    for req, res in zip(REQS, got):
        lp, greedy, n = reference_logprob(tiny_model, small_tokenizer, lm, req)
        assert res.num_tokens == n
        assert res.logprob == pytest.approx(lp, abs=1e-5, rel=1e-5)
        assert res.is_greedy == greedy
    assert got[0] == got[-1]


def test_continuation_tokens_follow_lm_eval_split(tiny_model, small_tokenizer):
    lm = make_lm(tiny_model, small_tokenizer)
    tok = small_tokenizer
    ctx, cont = lm.encode_pair("The capital of France is", " Paris")
    whole = tok.encode("The capital of France is Paris", bos=True)
    assert list(ctx) == tok.encode("The capital of France is", bos=True)
    assert list(ctx + cont) == whole  # no stray "▁" before the continuation
    ctx2, cont2 = lm.encode_pair("ends with space ", "word")
    assert (ctx2, cont2) == lm.encode_pair("ends with space", " word")


def test_loglikelihood_independent_of_batching_and_order(tiny_model, small_tokenizer):
    base = make_lm(tiny_model, small_tokenizer).loglikelihood(REQS)
    perm = list(range(len(REQS)))
    random.Random(1).shuffle(perm)
    configs = (
        {"batch_size": 1},
        {"batch_size": 2},
        {"batch_tokens": MAX_LEN},
        {"batch_size": 3, "share_context": False},
    )
    for kw in configs:
        lm = make_lm(tiny_model, small_tokenizer, **kw)
        got = lm.loglikelihood([REQS[i] for i in perm])
        assert lm.forward_passes > 1
        for j, i in enumerate(perm):
            assert got[j].logprob == pytest.approx(base[i].logprob, abs=1e-5, rel=1e-5)
            assert got[j].is_greedy == base[i].is_greedy


def test_is_greedy_for_the_argmax_continuation(tiny_model, small_tokenizer):
    tok = small_tokenizer
    lm = make_lm(tiny_model, tok)
    ctx = "def f(x):\n    return"
    ids = tok.encode(ctx, bos=True)
    greedy_ids = []
    with torch.no_grad():
        for _ in range(3):
            greedy_ids.append(int(tiny_model(torch.tensor([ids + greedy_ids]))[0, -1].argmax()))
    # token-level requests: the greedy continuation and one that differs in its last token
    other = greedy_ids[:2] + [(greedy_ids[2] + 1) % tok.vocab_size]
    (lp_g, g), (lp_o, o) = lm.loglikelihood_tokens(
        [(tuple(ids), tuple(greedy_ids)), (tuple(ids), tuple(other))]
    )
    assert g and not o and lp_g > lp_o


def test_left_truncation_at_max_seq_len(tiny_model, small_tokenizer):
    lm = make_lm(tiny_model, small_tokenizer)
    long_ctx = " ".join(f"word{i}" for i in range(60))
    req = Loglikelihood(long_ctx, " and the end")
    ctx, cont = lm.encode_pair(req.context, req.continuation)
    assert len(ctx) + len(cont) > MAX_LEN + 1
    (res,) = lm.loglikelihood([req])
    lp, greedy, n = reference_logprob(tiny_model, small_tokenizer, lm, req)
    assert res.logprob == pytest.approx(lp, abs=1e-5, rel=1e-5) and res.num_tokens == n
    # a continuation longer than the context is scored in windows of MAX_LEN // 2
    ctx, cont = lm.encode_pair("x", " y" * (MAX_LEN + 5))
    assert len(cont) > MAX_LEN
    (long,) = lm.loglikelihood([Loglikelihood("x", " y" * (MAX_LEN + 5))])
    half = MAX_LEN // 2
    pieces = lm.loglikelihood_tokens(
        [(ctx + cont[:a], cont[a : a + half]) for a in range(0, len(cont), half)]
    )
    assert long.num_tokens == len(cont)
    assert long.logprob == pytest.approx(sum(lp for lp, _ in pieces), rel=1e-9)
    assert long.is_greedy == all(g for _, g in pieces)


def test_rolling_sums_windows_over_a_long_text(tiny_model, small_tokenizer):
    tok = small_tokenizer
    lm = make_lm(tiny_model, tok, batch_tokens=2 * MAX_LEN)
    text = " ".join(f"token {i} of a long text." for i in range(30))
    full = [tok.bos_id, *tok.encode(text, bos=False)]
    assert len(full) > 2 * MAX_LEN
    # by hand: every token predicted once, each from the MAX_LEN tokens before its window's end
    expected = 0.0
    with torch.no_grad():
        for a in range(1, len(full), MAX_LEN):
            b = min(a + MAX_LEN, len(full))
            start = max(0, b - 1 - MAX_LEN)
            logp = torch.log_softmax(tiny_model(torch.tensor([full[start : b - 1]]))[0].float(), -1)
            for t in range(a, b):
                expected += float(logp[t - 1 - start, full[t]])
    short = "a short text"
    got = lm.loglikelihood_rolling([Rolling(text), Rolling(short)])
    assert got[0] == pytest.approx(expected, abs=1e-4, rel=1e-5)
    sfull = [tok.bos_id, *tok.encode(short, bos=False)]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(torch.tensor([sfull[:-1]]))[0].float(), -1)
    assert got[1] == pytest.approx(
        sum(float(logp[i, sfull[i + 1]]) for i in range(len(sfull) - 1)), abs=1e-5
    )


def test_generate_greedy_matches_generate_completions(tiny_model, small_tokenizer):
    lm = make_lm(tiny_model, small_tokenizer, batch_size=2)
    prompts = ["Q: What is two plus two?\nA:", "def add(a, b):", "The"]
    reqs = [Generate(p, until=(), max_new_tokens=8) for p in prompts]
    got = lm.generate(reqs)
    for p, g in zip(prompts, got):
        (ref,) = generate_completions(
            tiny_model, small_tokenizer, [p], max_new_tokens=8, temperature=0.0, top_p=1.0
        )
        assert g == [ref.text]
    # until: cut before the first occurrence of a stop string that the text contains
    text = got[0][0]
    stop = text.strip()[1:3] or text[:1]
    assert stop and stop in text
    (cut,) = lm.generate([Generate(prompts[0], until=(stop, "never"), max_new_tokens=8)])
    assert cut == [text[: text.find(stop)]]


def test_sampling_reproducible_and_independent_of_batch(tiny_model, small_tokenizer):
    r = Generate("The", until=(), max_new_tokens=5, temperature=1.0, num_samples=3, seed=7)
    others = [
        Generate("def f():", until=(), max_new_tokens=5, temperature=1.0, num_samples=2, seed=7),
        Generate("Q:", until=("\n",), max_new_tokens=5, temperature=1.0, seed=3),
    ]
    for mode in ("per_sample", "per_request"):
        lm = make_lm(tiny_model, small_tokenizer, sample_mode=mode)
        (alone,) = lm.generate([r])
        together = lm.generate([others[0], r, others[1]])[1]
        again = make_lm(tiny_model, small_tokenizer, sample_mode=mode).generate([r])[0]
        assert alone == together == again and len(alone) == 3
        assert len(set(alone)) > 1  # the samples differ from one another
        if mode == "per_sample":
            per_sample = alone
    # per_sample: sample j only depends on (seed, j)
    lm = make_lm(tiny_model, small_tokenizer)
    fewer = lm.generate([Generate(r.context, (), 5, 1.0, 1.0, 2, 7)])[0]
    assert fewer == per_sample[:2]


def test_runner_end_to_end_json_and_cache(tiny_ckpt, data_dir, tmp_path):
    from llamaforge.eval.report import render
    from llamaforge.eval.runner import evaluate

    lm = CountingLM(LlamaforgeLM.from_checkpoint(tiny_ckpt, device="cpu", progress=False))
    cache = tmp_path / "cache"
    kw = dict(data_dir=data_dir, shots=1, limit=6, seed=1, cache_dir=cache, progress=False)
    res = evaluate(lm, [TinyMC(), TinyGen()], **kw)
    json.dumps(res)  # JSON-ready
    assert res["checkpoint"]["path"] == str(tiny_ckpt) and len(res["checkpoint"]["sha256"]) == 64
    assert res["settings"]["dtype"] == "float32"
    mc = res["tasks"]["tiny_mc"]
    for key in ("metrics", "main_metric", "table", "shots", "limit", "n_docs", "data_sha256"):
        assert key in mc
    assert mc["n_docs"] == 6 and mc["shots"] == 1 and mc["limit"] == 6 and not mc["cached"]
    acc = mc["metrics"]["acc"]
    assert set(acc) == {"value", "stderr", "n"} and acc["n"] == 6 and 0 <= acc["value"] <= 1
    assert res["tasks"]["tiny_gen"]["metrics"]["logp"]["value"] < 0
    first = lm.n
    assert first > 0

    again = evaluate(lm, [TinyMC(), TinyGen()], **kw)
    assert lm.n == first  # served from the cache: no request reached the model
    assert again["tasks"]["tiny_mc"]["cached"]
    assert again["tasks"]["tiny_mc"]["metrics"] == mc["metrics"]

    evaluate(lm, [TinyMC()], **{**kw, "limit": 5})
    assert lm.n > first  # another limit misses
    n2 = lm.n
    evaluate(lm, [TinyMC(options={"name": "tiny_mc", "extra": 1})], **{**kw, "limit": 5})
    assert lm.n > n2  # another task option misses
    n3 = lm.n
    evaluate(lm, [TinyMC()], **{**kw, "limit": 5, "use_cache": False})
    assert lm.n > n3

    md = render(res)
    # Table 3's layout: one column per benchmark, its value (± stderr) row, then its metric row
    table3 = md.split("## Table 3", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table3.splitlines() if line.startswith("|")]
    assert rows[0] == "|  | tiny_mc |", rows
    assert rows[2].startswith("| value | ") and " ± " in rows[2], rows
    assert rows[3] == "| metric | acc |", rows
    # Table 4's layout (benchmark x shots): tiny_gen ran with 1 shot
    table4 = md.split("## Table 4", 1)[1]
    assert "|  | 1-shot |" in table4 and "| tiny_gen | " in table4


def test_runner_shots_are_per_doc_and_deterministic(tiny_model, small_tokenizer, data_dir):
    from llamaforge.eval.runner import run_task

    seen: list[list[Request]] = []

    class Recording(TinyMC):
        def requests(self, doc, shots):
            out = super().requests(doc, shots)
            seen.append(out)
            return out

    lm = make_lm(tiny_model, small_tokenizer)
    a = run_task(lm, Recording(), data_dir, shots=2, limit=4, seed=5)
    first = list(seen)
    seen.clear()
    run_task(lm, Recording(), data_dir, shots=2, limit=3, seed=5)
    assert seen == first[:3]  # doc i's shots do not depend on --limit
    assert a["n_unique_requests"] <= a["n_requests"]
    seen.clear()
    run_task(lm, Recording(), data_dir, shots=2, limit=4, seed=6)
    assert seen != first


def test_report_layouts():
    from llamaforge.eval.report import render

    def entry(table, shots, metrics, main):
        return {
            "table": table,
            "shots": shots,
            "main_metric": main,
            "limit": None,
            "n_docs": 10,
            "note": "",
            "metrics": {k: {"value": v, "stderr": 0.01, "n": 10} for k, v in metrics.items()},
        }

    runs = [
        {
            "checkpoint": {"path": "ck"},
            "tasks": {
                "hellaswag": entry("3", 0, {"acc_char": 0.5}, "acc_char"),
                "arc_easy": entry("3", 0, {"acc_char": 0.25}, "acc_char"),
                "naturalquestions": entry("4", 0, {"em": 0.1}, "em"),
                "mmlu": entry("9", 5, {"acc": 0.3, "acc_stem": 0.2, "acc_humanities": 0.4}, "acc"),
                "realtoxicityprompts": entry("11", 0, {"toxicity": 0.106}, "toxicity"),
            },
        },
        {
            "checkpoint": {"path": "ck"},
            "tasks": {"naturalquestions": entry("4", 5, {"em": 0.2}, "em")},
        },
    ]
    md = render(runs)
    assert md.index("HellaSwag") < md.index("ARC-e")  # the paper's column order
    assert "| value | 50.0 ± 1.0 | 25.0 ± 1.0 |" in md
    assert "| NaturalQuestions | 10.0 ± 1.0 | 20.0 ± 1.0 |" in md
    assert "| MMLU | 5 | 40.0 ± 1.0 | 20.0 ± 1.0 | – | – | 30.0 ± 1.0 |" in md
    assert "0.106 ± 0.010" in md
    assert "Table 6" not in md and "Table 8" not in md


def test_cli_writes_json_and_reports_errors(tiny_ckpt, data_dir, tmp_path, capsys):
    from llamaforge.cli.eval import main

    assert (
        main(["--ckpt", str(tmp_path / "nope"), "--tasks", "x", "--data-dir", str(data_dir)]) == 2
    )
    assert "nope" in capsys.readouterr().err
    assert main(["--ckpt", str(tiny_ckpt), "--tasks", "a", "--data-dir", str(tmp_path / "no")]) == 2
    assert "no such data directory" in capsys.readouterr().err
    tasks = pytest.importorskip("llamaforge.eval.tasks")
    code = main(["--ckpt", str(tiny_ckpt), "--tasks", "no_such_task", "--data-dir", str(data_dir)])
    assert code == 2 and "no_such_task" in capsys.readouterr().err
    # a real task on the shared data, when both are present
    from tests.conftest import SHARED_DATA

    name = "arc_easy"
    if name not in tasks.TASKS or not (SHARED_DATA / "eval").is_dir():
        pytest.skip("arc_easy or the shared eval data is not available")
    out = tmp_path / "out.json"
    argv = ["--ckpt", str(tiny_ckpt), "--tasks", name, "--limit", "3", "--output", str(out)]
    argv += ["--data-dir", str(SHARED_DATA / "eval"), "--cache-dir", str(tmp_path / "c")]
    assert main([*argv, "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["tasks"][name]["n_docs"] == 3
    assert math.isfinite(res["tasks"][name]["metrics"][res["tasks"][name]["main_metric"]]["value"])
    assert "Table" in capsys.readouterr().out


def test_task_options_take_one_route(tmp_path, monkeypatch, capsys):
    """Options for a task that is not evaluated are refused alike by `evaluate` and by the
    command line, there before any dataset is fetched (nothing is cached offline here, so
    a fetch would fail with another error)."""
    from llamaforge.cli.eval import main
    from llamaforge.eval.base import EvalError
    from llamaforge.eval.runner import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("LLAMAFORGE_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    argv = ["--ckpt", str(ckpt), "--tasks", "boolq", "--data-source", "hub"]
    assert main([*argv, "--task-option", "gsm8k.maj_k=8"]) == 2
    err = capsys.readouterr().err
    assert "options for task(s) not evaluated: ['gsm8k'] (the tasks are boolq)" in err, err
    assert not (tmp_path / "cache").exists()
    with pytest.raises(EvalError, match=r"options for task\(s\) not evaluated: \['gsm8k'\]"):
        evaluate(None, ["boolq"], tmp_path, task_options={"gsm8k": {"maj_k": 8}})  # type: ignore[arg-type]
