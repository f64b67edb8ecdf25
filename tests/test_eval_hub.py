"""The benchmarks from the Hugging Face Hub (`llamaforge.eval.hub`), without network.

Each test builds a real ``datasets`` cache — the folders and Arrow files that
``datasets.load_dataset`` leaves after a download, the Hub's field names — from the shared
files, and runs the hub code in a fresh process with ``HF_DATASETS_OFFLINE=1``: the code a
user with network runs, minus the download."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llamaforge.cli.main import main

from .conftest import REPO, shared_file

pytest.importorskip("datasets")

SHA = "0123456789abcdef0123456789abcdef01234567"  # the "Hub commit" of the cached copies


def put_in_cache(
    cache: Path, repo: str, config: str, splits: dict[str, list[dict[str, Any]]]
) -> None:
    """What ``load_dataset(repo, config)`` leaves in HF_DATASETS_CACHE after a download:
    ``<ns>___<name>/<config>/<version>/<commit>/`` with ``dataset_info.json`` and one Arrow
    file per split."""
    from datasets import Dataset, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter

    ns, name = repo.split("/")
    folder = cache / f"{ns}___{name}" / config / "0.0.0" / SHA
    folder.mkdir(parents=True, exist_ok=True)
    infos = SplitDict()
    info = None
    features = Dataset.from_list([r for rows in splits.values() for r in rows]).features
    for split, rows in splits.items():
        ds = Dataset.from_list(rows, features=features)
        with ArrowWriter(path=str(folder / f"{name}-{split}.arrow")) as w:
            w.write_table(ds.data.table)
            w.finalize()
        infos.add(SplitInfo(split, num_examples=len(ds), dataset_name=name))
        info = ds.info
    assert info is not None
    info.dataset_name, info.config_name, info.version = name, config, "0.0.0"
    info.splits = infos
    info.write_to_directory(str(folder))


def jsonl(rel: str) -> list[dict[str, Any]]:
    path = shared_file(f"eval/{rel}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def arc_rows(rel: str) -> list[dict[str, Any]]:
    """The shared (converted) ARC file in the Hub's allenai/ai2_arc schema."""
    out = []
    for i, r in enumerate(jsonl(rel)):
        labels = [chr(65 + j) for j in range(len(r["choices"]))]
        stem = r["query"].strip().removeprefix("Question:").strip()
        out.append(
            {
                "id": f"q{i}",
                "question": stem,
                "choices": {"text": r["choices"], "label": labels},
                "answerKey": labels[int(r["gold"])],
            }
        )
    return out


def mmlu_rows(split: str, subjects: list[str]) -> list[dict[str, Any]]:
    """Shared MMLU CSVs in cais/mmlu's schema {question, subject, choices, answer: int}."""
    rows = []
    for subject in subjects:
        path = shared_file(f"eval/mmlu/{split}/{subject}_{split}.csv")
        with path.open(newline="", encoding="utf-8") as f:
            items = list(csv.reader(f))
        for q, a, b, c, d, ans in items[1:] if items[0][0] == "question" else items:
            answer = int(ans) if ans.isdigit() else "ABCD".index(ans)
            rows.append(
                {"question": q, "subject": subject, "choices": [a, b, c, d], "answer": answer}
            )
    return rows


def populate(cache: Path) -> None:
    put_in_cache(cache, "allenai/ai2_arc", "ARC-Easy", {"test": arc_rows("arc/arc_easy.jsonl")})
    put_in_cache(
        cache, "Rowan/hellaswag", "default", {"validation": jsonl("hellaswag/hellaswag.jsonl")}
    )
    put_in_cache(
        cache,
        "openai/gsm8k",
        "main",
        {"test": jsonl("gsm8k/test.jsonl"), "train": jsonl("gsm8k/train.jsonl")[:50]},
    )
    labels = shared_file("eval/piqa/valid-labels.lst").read_text().split()
    piqa = [{**r, "label": int(lab)} for r, lab in zip(jsonl("piqa/valid.jsonl"), labels)]
    put_in_cache(cache, "ybisk/piqa", "default", {"validation": piqa})
    mbpp = [{**r, "task_id": int(r["task_id"])} for r in jsonl("mbpp/mbpp.jsonl")]
    by_split = {
        "prompt": [r for r in mbpp if 1 <= r["task_id"] <= 10],
        "test": [r for r in mbpp if 11 <= r["task_id"] <= 510],
        "validation": [r for r in mbpp if 511 <= r["task_id"] <= 600],
        "train": [r for r in mbpp if r["task_id"] > 600],
    }
    put_in_cache(cache, "google-research-datasets/mbpp", "full", by_split)
    subjects = ["anatomy", "virology"]
    put_in_cache(
        cache,
        "cais/mmlu",
        "all",
        {"test": mmlu_rows("test", subjects), "dev": mmlu_rows("dev", subjects)},
    )


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory) -> dict[str, str]:
    """An environment with a populated datasets cache, offline, and no shared data."""
    root = tmp_path_factory.mktemp("hub")
    populate(root / "hf-datasets")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAFORGE_")}
    env.update(
        PYTHONPATH=str(REPO / "src"),
        HF_HOME=str(root / "hf-home"),
        HF_DATASETS_CACHE=str(root / "hf-datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        LLAMAFORGE_EVAL_HUB_DIR=str(root / "eval-hub"),
    )
    return env


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


CASES = [
    ("arc_easy", {}),
    ("hellaswag", {}),
    ("gsm8k", {}),
    ("piqa", {}),
    ("mbpp", {}),
    ("mmlu", {"subjects": ["anatomy", "virology"]}),
]


def test_hub_rows_load_as_the_local_files(hub_env):
    """The Hub's rows (through datasets, offline from its cache) give the same docs and
    few-shot pools as the shared files, and the provenance names the dataset and commit."""
    from llamaforge.eval.tasks import get_task

    code = (
        "import json\n"
        "from llamaforge.eval.hub import fetch_task_data\n"
        "from llamaforge.eval.tasks import get_task\n"
        "out = {}\n"
        f"for name, opts in {CASES!r}:\n"
        "    hd = fetch_task_data(name)\n"
        "    task = get_task(name, **{**hd.options, **opts})\n"
        "    docs = task.load(hd.data_dir, None)\n"
        "    pool = task.fewshot_docs(hd.data_dir)\n"
        "    out[name] = {'docs': docs, 'pool': pool[:5], 'source': hd.source}\n"
        "print(json.dumps(out))\n"
    )
    proc = _python(code, hub_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    local = shared_file("eval")
    for name, opts in CASES:
        task = get_task(name, **opts)
        docs = task.load(local, None)
        assert got[name]["docs"] == json.loads(json.dumps(docs)), name
        pool = task.fewshot_docs(local)[:5]
        if name != "gsm8k":  # the cached train split is its first 50 rows: same first 5
            assert got[name]["pool"] == json.loads(json.dumps(pool)), name
        source = got[name]["source"]
        assert source["kind"] == "huggingface"
        first = source if "dataset" in source else source["splits"][0]
        assert first["revision"] == SHA and first["fingerprint"], name
    assert got["arc_easy"]["source"]["dataset"] == "allenai/ai2_arc"
    assert got["arc_easy"]["source"]["config"] == "ARC-Easy"
    assert got["piqa"]["source"]["requested_revision"] == "refs/convert/parquet"


def test_cli_eval_reads_the_hub_offline_and_records_the_dataset(
    hub_env, tmp_path, small_tokenizer_path, capsys
):
    """`llamaforge eval` without a data folder: the Hub's copy, the same scores as the
    local files, the dataset id and revision in the results JSON; a task with no local
    copy and nothing cached is one line saying what to fetch."""
    ckpt = tmp_path / "ckpt"
    status = main(
        ["init", "--preset", "1M", "--tokenizer", str(small_tokenizer_path), "--out", str(ckpt)]
    )
    assert status == 0
    capsys.readouterr()
    common = ["--ckpt", str(ckpt), "--tasks", "arc_easy", "--limit", "6", "--no-progress"]
    hub_json = tmp_path / "hub.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamaforge",
            "eval",
            *common,
            "--no-cache",
            "--output",
            str(hub_json),
        ],
        capture_output=True,
        text=True,
        env=hub_env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    hub = json.loads(hub_json.read_text())["tasks"]["arc_easy"]
    assert hub["data_source"]["dataset"] == "allenai/ai2_arc"
    assert hub["data_source"]["split"] == "test" and hub["data_source"]["revision"] == SHA

    local_json = tmp_path / "local.json"
    status = main(
        ["eval", *common, "--no-cache", "--data-dir", str(shared_file("eval")),
         "--data-source", "local", "--output", str(local_json)]
    )  # fmt: skip
    assert status == 0
    local = json.loads(local_json.read_text())["tasks"]["arc_easy"]
    assert local["data_source"]["kind"] == "local"
    assert hub["metrics"] == local["metrics"]

    proc = subprocess.run(
        [sys.executable, "-m", "llamaforge", "eval", "--ckpt", str(ckpt), "--tasks", "boolq"],
        capture_output=True,
        text=True,
        env=hub_env,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llamaforge eval: error: Hugging Face dataset google/boolq")
    assert "load_dataset('google/boolq', split='validation')" in lines[0]
    assert "--data-dir" in lines[0]
