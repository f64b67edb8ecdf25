"""The paper's benchmarks from the Hugging Face Hub, the way the community gets them.

When neither ``--data-dir`` nor ``$LLAMAFORGE_SHARED_DATA/eval`` holds a task's files,
``llamaforge eval`` loads the public dataset through ``datasets`` (the Hub, then its cache in
``~/.cache/huggingface/datasets``; ``HF_DATASETS_OFFLINE=1`` uses the cache alone) and
writes its rows, with the Hub's field names, into the task's own file layout under
``~/.cache/llamaforge/eval-hub/<task>/<revision>/`` — the loaders in ``tasks/`` read the
public formats, so the code that scores a local copy scores the Hub's rows. The dataset
id, config, split and revision (the Hub commit ``datasets`` resolved) and the dataset's
fingerprint go into the results JSON (``data_source``).

`HUB` lists, per task, the dataset the paper reports on (SPEC §1.7): ARC test, BoolQ
validation, HellaSwag validation, PIQA validation, WinoGrande dev (winogrande_xl
validation), NaturalQuestions-open dev, TriviaQA unfiltered dev (nocontext), MMLU test with
the dev shots, GSM8K test, HumanEval, MBPP (every split in one file; the task keeps the test
ids), plus OpenBookQA, LAMBADA and TruthfulQA MC.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamaforge.eval.base import EvalError

MMLU_CSV = "mmlu_csv"  # layout: <file>/<subject>_<split>.csv with the HF-export header


@dataclass(frozen=True)
class HubSplit:
    """One split of a Hub dataset, written to ``file`` (relative to the task's folder)."""

    file: str
    dataset: str
    config: str | None
    split: str  # a datasets split expression: "test", "validation", "prompt+test+train"
    revision: str | None = None  # None: the Hub's main branch
    layout: str = "jsonl"  # "jsonl" (".gz" suffix: gzipped) or MMLU_CSV

    def fetch_hint(self) -> str:
        args = [repr(self.dataset)]
        if self.config:
            args.append(repr(self.config))
        args.append(f"split={self.split!r}")
        if self.revision:
            args.append(f"revision={self.revision!r}")
        return f'python -c "import datasets; datasets.load_dataset({", ".join(args)})"'


@dataclass(frozen=True)
class HubSource:
    splits: tuple[HubSplit, ...]
    options: Mapping[str, Any] = field(default_factory=dict)  # task options for this layout


# The script-based ybisk/piqa loads with datasets >= 4 from the Hub's parquet conversion.
HUB: dict[str, HubSource] = {
    "arc_easy": HubSource((HubSplit("arc/arc_easy.jsonl", "allenai/ai2_arc", "ARC-Easy", "test"),)),
    "arc_challenge": HubSource(
        (HubSplit("arc/arc_challenge.jsonl", "allenai/ai2_arc", "ARC-Challenge", "test"),)
    ),
    "boolq": HubSource((HubSplit("boolq/boolq.jsonl", "google/boolq", None, "validation"),)),
    "hellaswag": HubSource(
        (HubSplit("hellaswag/hellaswag.jsonl", "Rowan/hellaswag", None, "validation"),)
    ),
    "piqa": HubSource(
        (
            HubSplit(
                "piqa/valid.jsonl",
                "ybisk/piqa",
                "default",
                "validation",
                revision="refs/convert/parquet",
            ),
        )
    ),
    "winogrande": HubSource(
        (
            HubSplit(
                "winogrande/winogrande.jsonl", "allenai/winogrande", "winogrande_xl", "validation"
            ),
        )
    ),
    "openbookqa": HubSource(
        (HubSplit("openbookqa/openbookqa.jsonl", "allenai/openbookqa", "main", "test"),)
    ),
    "naturalquestions": HubSource(
        (
            HubSplit(
                "naturalquestions/NQ-open.dev.jsonl",
                "google-research-datasets/nq_open",
                "nq_open",
                "validation",
            ),
            HubSplit(
                "naturalquestions/NQ-open.train.jsonl",
                "google-research-datasets/nq_open",
                "nq_open",
                "train",
            ),
        ),
        options={"fewshot_path": "naturalquestions/NQ-open.train.jsonl"},
    ),
    "triviaqa": HubSource(
        (
            HubSplit(
                "triviaqa/unfiltered.nocontext.validation.jsonl",
                "mandarjoshi/trivia_qa",
                "unfiltered.nocontext",
                "validation",
            ),
        ),
        options={"path": "triviaqa/unfiltered.nocontext.validation.jsonl"},
    ),
    "lambada": HubSource(
        (HubSplit("lambada/lambada_openai.jsonl", "EleutherAI/lambada_openai", "default", "test"),)
    ),
    "gsm8k": HubSource(
        (
            HubSplit("gsm8k/test.jsonl", "openai/gsm8k", "main", "test"),
            HubSplit("gsm8k/train.jsonl", "openai/gsm8k", "main", "train"),
        )
    ),
    "humaneval": HubSource(
        (
            HubSplit(
                "humaneval/HumanEval.jsonl.gz",
                "openai/openai_humaneval",
                "openai_humaneval",
                "test",
            ),
        )
    ),
    "mbpp": HubSource(
        (
            HubSplit(
                "mbpp/mbpp.jsonl",
                "google-research-datasets/mbpp",
                "full",
                "prompt+test+validation+train",
            ),
        )
    ),
    "mmlu": HubSource(
        (
            HubSplit("mmlu/test", "cais/mmlu", "all", "test", layout=MMLU_CSV),
            HubSplit("mmlu/dev", "cais/mmlu", "all", "dev", layout=MMLU_CSV),
        )
    ),
    "truthfulqa_mc": HubSource(
        (
            HubSplit(
                "truthfulqa/mc_task.jsonl",
                "truthfulqa/truthful_qa",
                "multiple_choice",
                "validation",
            ),
        ),
        options={"path": "truthfulqa/mc_task.jsonl"},
    ),
}


def default_hub_dir() -> Path:
    """Where the Hub's rows are written in the tasks' layouts."""
    env = os.environ.get("LLAMAFORGE_EVAL_HUB_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llamaforge" / "eval-hub"


@dataclass(frozen=True)
class HubData:
    """A task's data from the Hub: its folder, the files written, the options the layout
    needs, and the provenance recorded in the results."""

    data_dir: Path
    files: tuple[str, ...]
    options: Mapping[str, Any]
    source: dict[str, Any]


def hub_source(task: str) -> HubSource | None:
    return HUB.get(task)


def _load_split(s: HubSplit) -> tuple[Any, dict[str, Any]]:
    """The split as a ``datasets.Dataset`` and its provenance (id, config, split, revision,
    fingerprint); a download that cannot happen is one EvalError line saying what to fetch."""
    try:
        import datasets
    except ImportError as e:
        raise EvalError(
            f"{s.dataset}: loading benchmarks from the Hugging Face Hub needs the datasets "
            "package (pip install datasets), or pass --data-dir with a local copy"
        ) from e
    logging = datasets.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "Using the latest cached version ..." is not news here
    try:
        builder = datasets.load_dataset_builder(s.dataset, s.config, revision=s.revision)
        builder.download_and_prepare()
        ds = builder.as_dataset(split=s.split)
    except Exception as e:  # offline, not cached, no such config/split, network errors
        offline = "offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE), " if _offline() else ""
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise EvalError(
            f"Hugging Face dataset {s.dataset}"
            + (f" ({s.config}, {s.split})" if s.config else f" ({s.split})")
            + f" unavailable: {offline}{type(e).__name__}: {detail}; fetch it once with "
            f"network ({s.fetch_hint()}), or pass --data-dir with a local copy"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
    source = {
        "dataset": s.dataset,
        "config": s.config,
        "split": s.split,
        "revision": builder.hash,  # the Hub commit datasets resolved (its cache folder)
        "requested_revision": s.revision,
        "fingerprint": ds._fingerprint,
        "rows": len(ds),
    }
    return ds, source


def _offline() -> bool:
    try:
        import datasets

        return bool(datasets.config.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    text = "".join(json.dumps(_jsonable(r), ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".gz":
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _write_mmlu(folder: Path, split: str, rows: Iterable[dict[str, Any]]) -> None:
    """cais/mmlu rows {question, subject, choices: [4], answer: 0-3} as
    ``<subject>_<split>.csv`` with the header ``question,choice0..3,answer``."""
    by_subject: dict[str, list[list[str]]] = {}
    for r in rows:
        choices = [str(c) for c in r["choices"]]
        by_subject.setdefault(str(r["subject"]), []).append(
            [str(r["question"]), *choices, str(r["answer"])]
        )
    folder.mkdir(parents=True, exist_ok=True)
    for subject, items in by_subject.items():
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
        w.writerows(items)
        path = folder / f"{subject}_{split.split('+')[0]}.csv"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        tmp.replace(path)


def fetch_task_data(task: str, hub_dir: Path | None = None) -> HubData:
    """Load ``task``'s Hub dataset (network, else the datasets cache) and write it in the
    task's layout under ``hub_dir/<task>/<revision>``; rewritten only when the dataset's
    fingerprint changed."""
    spec = HUB.get(task)
    if spec is None:
        raise EvalError(
            f"{task}: no Hugging Face dataset is known for this task; pass --data-dir with "
            "a local copy"
        )
    root = Path(hub_dir) if hub_dir is not None else default_hub_dir()
    loaded = [(s, *_load_split(s)) for s in spec.splits]
    tag = "-".join(sorted({str(src["revision"])[:12] for _, _, src in loaded}))
    folder = root / task / tag
    sources = [src for _, _, src in loaded]
    marker = folder / ".complete.json"
    record = json.dumps(sources, sort_keys=True)
    if not (marker.is_file() and marker.read_text() == record):
        for s, ds, _ in loaded:
            target = folder / s.file
            if s.layout == MMLU_CSV:
                _write_mmlu(target, s.split, ds)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_jsonl(target, ds)
        marker.write_text(record)
    source: dict[str, Any] = {"kind": "huggingface", "data_dir": str(folder)}
    if len(sources) == 1:
        source.update(sources[0])
    else:
        source["splits"] = sources
    return HubData(folder, tuple(s.file for s in spec.splits), dict(spec.options), source)


# -- where the benchmark files are ------------------------------------------------------------


def local_data_dir() -> Path | None:
    """$LLAMAFORGE_EVAL_DATA, else $LLAMAFORGE_SHARED_DATA/eval, else None."""
    env = os.environ.get("LLAMAFORGE_EVAL_DATA")
    if env:
        return Path(env)
    shared = os.environ.get("LLAMAFORGE_SHARED_DATA")
    if shared:
        return Path(shared) / "eval"
    return None


def default_data_dir() -> Path:
    local = local_data_dir()
    if local is not None:
        return local
    raise EvalError(
        "no benchmark data directory: pass --data-dir, or set LLAMAFORGE_EVAL_DATA "
        "(or LLAMAFORGE_SHARED_DATA, whose eval/ folder is used)"
    )
