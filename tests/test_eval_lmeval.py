"""The lm-evaluation-harness backend: lm-eval on local files, through our engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamaforge.eval.base import Generate, Loglikelihood, Rolling
from tests.test_eval_engine import TinyMC, mc_rows, write_jsonl

lm_eval = pytest.importorskip("lm_eval")

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{gold}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def ckpt(save_tiny) -> Path:
    return save_tiny(seed=1, n_kv_heads=None, output_scale=25)


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("lmeval_task")
    data = root / "data"
    (data / "tiny").mkdir(parents=True)
    rows = mc_rows()
    write_jsonl(data / "tiny/test.jsonl", rows)
    write_jsonl(data / "tiny/train.jsonl", rows[:2])
    tasks = root / "tasks"
    tasks.mkdir()
    name = "llamaforge_tiny_mc"
    (tasks / f"{name}.yaml").write_text(TASK_YAML.format(name=name, test=data / "tiny/test.jsonl"))
    return data, tasks, name


def test_registered_on_import():
    from lm_eval.api.registry import get_model

    from llamaforge.eval.harness import LlamaforgeHarnessLM

    assert get_model("llamaforge") is LlamaforgeHarnessLM


def test_simple_evaluate_matches_our_runner(ckpt, local_task, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    import llamaforge.eval.harness  # noqa: F401  (registers "llamaforge")
    from llamaforge.eval.lm import LlamaforgeLM
    from llamaforge.eval.runner import evaluate

    data, tasks, name = local_task
    out = lm_eval.simple_evaluate(
        model="llamaforge",
        model_args=f"ckpt={ckpt},device=cpu,batch_tokens=512,progress=false",
        tasks=[name],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    theirs = out["results"][name]["acc,none"]
    their_docs = sorted(out["samples"][name], key=lambda s: s["doc_id"])

    lm = LlamaforgeLM.from_checkpoint(ckpt, device="cpu", progress=False)
    ours = evaluate(
        lm, [TinyMC()], data, shots=0, use_cache=False, progress=False, log_samples=True
    )
    acc = ours["tasks"]["tiny_mc"]["metrics"]["acc"]
    assert acc["n"] == len(mc_rows()) == len(their_docs)
    assert theirs == pytest.approx(acc["value"], abs=1e-9)
    for theirs_doc, ours_doc in zip(their_docs, ours["samples"]["tiny_mc"]):
        assert theirs_doc["acc"] == ours_doc["scores"]["acc"]
        their_lps = [float(r[0]) for r in theirs_doc["filtered_resps"]]
        our_lps = [r["logprob"] for r in ours_doc["results"]]
        assert their_lps == pytest.approx(our_lps, rel=1e-6, abs=1e-5)


def test_harness_requests_delegate(ckpt):
    from lm_eval.api.instance import Instance

    from llamaforge.eval.harness import LlamaforgeHarnessLM
    from llamaforge.eval.lm import LlamaforgeLM

    h = LlamaforgeHarnessLM(ckpt=str(ckpt), device="cpu", progress="false")
    ref = LlamaforgeLM.from_checkpoint(ckpt, device="cpu", progress=False)

    def inst(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    ll = h.loglikelihood([inst("loglikelihood", ("Question: why?\nAnswer:", " because"))])
    (r,) = ref.loglikelihood([Loglikelihood("Question: why?\nAnswer:", " because")])
    assert ll == [(r.logprob, r.is_greedy)]
    text = "some text to score " * 10
    (roll,) = h.loglikelihood_rolling([inst("loglikelihood_rolling", (text,))])

    assert roll == pytest.approx(ref.loglikelihood_rolling([Rolling(text)])[0], abs=1e-6)
    gen = h.generate_until(
        [inst("generate_until", ("Q: hi\nA:", {"until": ["\n"], "max_gen_toks": 5}))]
    )
    assert gen == ref.generate([Generate("Q: hi\nA:", ("\n",), 5)])[0]


@pytest.mark.slow
def test_module_cli_runs_lm_eval(ckpt, local_task, tmp_path):
    data, tasks, name = local_task
    out = tmp_path / "res"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "llamaforge.eval.harness", "--model", "llamaforge"]
    cmd += ["--model_args", f"ckpt={ckpt},device=cpu,progress=false", "--tasks", name]
    cmd += ["--include_path", str(tasks), "--output_path", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.rglob("results*.json"))
    assert files and name in json.loads(files[0].read_text())["results"]
