"""Multiple-choice evaluation throughput: llamaforge's engine against lm-eval's HF backend.

One model (random weights of the 15M preset with LLaMA's tokenizer, unless --ckpt), exported
to Hugging Face format with ``llamaforge.checkpoint.convert.convert``.
One lm-eval task defined from the
local ARC-Easy file (or HellaSwag with --task hellaswag). Both backends answer the same
requests through ``lm_eval.simple_evaluate``, so the prompts, tokenisation split and metric
code are lm-eval's on both sides; only the model backend differs:

* ``llamaforge``: ``llamaforge.eval.harness`` (padded token-budget batches, output layer on the
  continuation positions only);
* ``hf``: lm-eval's ``HFLM`` on the exported directory (``--hf-batch-size``, default 1 as in
  lm-eval, and a batched run).

Prints scored examples/s for each, the ratios, and checks that both give the same accuracy
(and nearly the same log-likelihoods).

    python bench/eval_throughput.py --limit 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

SHARED = Path(
    os.environ.get(
        "LLAMAFORGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)

TASKS = {
    "arc_easy": (
        "arc/arc_easy.jsonl",
        'doc_to_text: "{{query}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n',
    ),
    "hellaswag": (
        "hellaswag/hellaswag.jsonl",
        'doc_to_text: "{{activity_label}}: {{ctx}}"\n'
        'doc_to_choice: "{{endings}}"\n'
        'doc_to_target: "{{label}}"\n',
    ),
}


def write_task(root: Path, task: str) -> str:
    rel, fields = TASKS[task]
    data = SHARED / "eval" / rel
    if not data.is_file():
        raise SystemExit(f"{data} not found: set LLAMAFORGE_SHARED_DATA to the shared data folder")
    name = f"bench_{task}"
    (root / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        f"{fields}"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        "metadata:\n  version: 1.0\n"
    )
    return name


def build_checkpoint(out: Path, preset: str, tokenizer: Path, seed: int) -> Path:
    from llamaforge.checkpoint.native import save
    from llamaforge.model import build_model
    from llamaforge.presets import get_preset
    from llamaforge.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    torch.manual_seed(seed)
    model = build_model(get_preset(preset, vocab_size=tok.vocab_size))
    with torch.no_grad():  # sharper than the 0.02 init, so the choices' scores differ
        model.output.weight.mul_(20)
    return save(model, tok, out / "native")


def run(lm, task_manager, name: str, limit: int, repeats: int = 1) -> tuple[float, dict]:
    """Best wall time of ``repeats`` runs of simple_evaluate (the machine may be shared)."""
    import lm_eval

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[name],
            task_manager=task_manager,
            limit=limit,
            log_samples=True,
            bootstrap_iters=0,
        )
        best = min(best, time.perf_counter() - t0)
    return best, out


def native_runner(lm, task: str, limit: int, repeats: int) -> tuple[float, float] | None:
    """(seconds, main metric) of llamaforge's own runner on its registry task of that name
    (its own prompt, not lm-eval's; no lm-eval overhead), or None without the registry."""
    try:
        from llamaforge.eval.runner import evaluate
        from llamaforge.eval.tasks import get_task
    except ImportError:
        return None
    best, value = float("inf"), float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = evaluate(
            lm, [get_task(task)], SHARED / "eval", limit=limit, use_cache=False, progress=False
        )
        best = min(best, time.perf_counter() - t0)
        e = res["tasks"][task]
        value = e["metrics"][e["main_metric"]]["value"]
    return best, value


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=sorted(TASKS), default="arc_easy")
    p.add_argument("--limit", type=int, default=200, help="docs scored (each has 4 choices)")
    p.add_argument("--preset", default="15M")
    p.add_argument("--ckpt", help="a native checkpoint instead of a random 15M model")
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizer" / "llama" / "tokenizer.model"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--hf-batch-size", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="best of N timed runs per backend")
    p.add_argument("--json", help="also write the numbers here")
    a = p.parse_args()

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import llamaforge.eval.harness  # noqa: F401  (registers "llamaforge")
    from llamaforge.checkpoint.convert import convert
    from llamaforge.eval.harness import LlamaforgeHarnessLM

    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        root = Path(tmp)
        ckpt = (
            Path(a.ckpt) if a.ckpt else build_checkpoint(root, a.preset, Path(a.tokenizer), a.seed)
        )
        hf_dir = convert(
            ckpt, root / "hf", source="native", target="hf", dtype="float32", progress=False
        )
        (root / "tasks").mkdir()
        name = write_task(root / "tasks", a.task)
        tm = TaskManager(include_path=str(root / "tasks"), include_defaults=False)

        ours = LlamaforgeHarnessLM(
            ckpt=str(ckpt),
            device=a.device,
            dtype="float32",
            batch_tokens=a.batch_tokens,
            progress="false",
        )
        rows = []
        native = native_runner(ours.lm, a.task, a.limit, a.repeats)
        run(ours, tm, name, min(a.limit, 8))  # warm-up (dataset preparation, kernels)
        secs, res = run(ours, tm, name, a.limit, a.repeats)
        ref = res
        rows.append(("llamaforge", secs, res))
        for bs in a.hf_batch_size:
            hf = HFLM(
                pretrained=str(hf_dir),
                dtype="float32",
                device=a.device,
                batch_size=bs,
                add_bos_token=True,
            )
            run(hf, tm, name, min(a.limit, 8))
            secs, res = run(hf, tm, name, a.limit, a.repeats)
            rows.append((f"lm-eval hf (batch_size={bs})", secs, res))

    n = len(ref["samples"][name])
    print(
        f"{a.task}: {n} docs ({sum(len(s['filtered_resps']) for s in ref['samples'][name])} "
        f"requests), {'random ' + a.preset if not a.ckpt else a.ckpt}, {a.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    )
    base_acc = ref["results"][name]["acc,none"]
    ours_lps = [
        float(r[0])
        for s in sorted(ref["samples"][name], key=lambda s: s["doc_id"])
        for r in s["filtered_resps"]
    ]
    ours_eps = n / rows[0][1]
    summary = []
    for label, secs, res in rows:
        acc = res["results"][name]["acc,none"]
        acc_norm = res["results"][name]["acc_norm,none"]
        lps = [
            float(r[0])
            for s in sorted(res["samples"][name], key=lambda s: s["doc_id"])
            for r in s["filtered_resps"]
        ]
        diff = max(abs(x - y) for x, y in zip(lps, ours_lps))
        eps = n / secs
        print(
            f"  {label:30} {eps:8.1f} examples/s  ({secs:6.2f} s)  acc {acc:.4f}  acc_norm "
            f"{acc_norm:.4f}  max |Δ logprob| vs llamaforge {diff:.2e}  "
            f"llamaforge speed-up {ours_eps / eps:.2f}x"
        )
        if acc != base_acc:
            print(f"  WARNING: {label} accuracy {acc} differs from llamaforge's {base_acc}")
        summary.append(
            {
                "backend": label,
                "examples_per_s": eps,
                "seconds": secs,
                "acc": acc,
                "acc_norm": acc_norm,
                "max_abs_logprob_diff": diff,
            }
        )
    if native is not None:
        eps = n / native[0]
        print(
            f"  {'llamaforge runner (own prompt)':30} {eps:8.1f} examples/s  ({native[0]:6.2f} s)"
            f"  main metric {native[1]:.4f}  (no lm-eval pipeline around it)"
        )
        summary.append(
            {"backend": "llamaforge runner", "examples_per_s": eps, "seconds": native[0]}
        )
    if a.json:
        Path(a.json).write_text(
            json.dumps({"task": a.task, "docs": n, "runs": summary}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
