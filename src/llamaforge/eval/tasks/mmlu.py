"""MMLU (Hendrycks et al. 2021), 5-shot (Table 9; per subject Table 16)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from llamaforge.config import setting
from llamaforge.eval.base import Doc, EvalError, Metric, Request, TaskInfo, mean_metric
from llamaforge.eval.protocols import multiple_choice_requests
from llamaforge.eval.tasks.common import (
    LETTERS,
    FewshotOptions,
    MultipleChoiceTask,
    TaskOptions,
    read_csv,
    read_records,
)

_STEM = (
    "abstract_algebra anatomy astronomy college_biology college_chemistry "
    "college_computer_science college_mathematics college_physics computer_security "
    "conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
    "high_school_chemistry high_school_computer_science high_school_mathematics "
    "high_school_physics high_school_statistics machine_learning"
)
_HUMANITIES = (
    "formal_logic high_school_european_history high_school_us_history "
    "high_school_world_history international_law jurisprudence logical_fallacies "
    "moral_disputes moral_scenarios philosophy prehistory professional_law world_religions"
)
_SOCIAL = (
    "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology "
    "human_sexuality professional_psychology public_relations security_studies sociology "
    "us_foreign_policy"
)
_OTHER = (
    "business_ethics clinical_knowledge college_medicine global_facts human_aging management "
    "marketing medical_genetics miscellaneous nutrition professional_accounting "
    "professional_medicine virology"
)
CATEGORIES: dict[str, str] = {
    s: cat
    for cat, names in (
        ("stem", _STEM),
        ("humanities", _HUMANITIES),
        ("social_sciences", _SOCIAL),
        ("other", _OTHER),
    )
    for s in names.split()
}
"""Subject -> category (STEM, humanities, social sciences, other), as in the paper's Table 16."""

_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def mmlu_question(doc: Doc) -> str:
    """``<question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:``"""
    lines = [doc["question"].strip()]
    lines += [f"{LETTERS[j]}. {c}" for j, c in enumerate(doc["texts"])]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_prompt(doc: Doc, shots: Sequence[Doc]) -> str:
    """Hendrycks et al.'s prompt: a header naming the subject, the shots with their answer
    letter, blank lines between, then the question."""
    head = (
        "The following are multiple choice questions (with answers) about "
        f"{format_subject(doc['subject'])}.\n\n"
    )
    body = "".join(f"{mmlu_question(s)} {LETTERS[s['gold']]}\n\n" for s in shots)
    return head + body + mmlu_question(doc)


@dataclass
class MMLUOptions(FewshotOptions):
    subjects: list[str] | str | None = setting(
        None, "evaluate only these subjects (a list, or comma-separated); default all 57"
    )
    fewshot_path: str | None = setting(
        None, "the dev folder/file the shots come from (default: mmlu/dev)"
    )


class MMLU(MultipleChoiceTask):
    """MMLU test (57 subjects, 14042 questions), 5-shot: the first 5 dev examples of the same
    subject ("the examples provided by the benchmark"). Choices " A".." D", scored by raw
    log-likelihood (``acc``). The aggregate gives the micro average over questions (``acc``),
    the macro average over subjects (``acc_subjects``), ``acc_<category>`` (micro within the
    four categories) and ``acc_<subject>`` per subject."""

    info = TaskInfo(
        name="mmlu",
        table="9",
        main_metric="acc",
        default_shots=5,
        files=("mmlu/test", "mmlu/dev"),
        note="MMLU test, 57 subjects (14042); 5 shots = first 5 dev questions of the subject",
    )
    Options: ClassVar[type[TaskOptions]] = MMLUOptions
    opt: MMLUOptions
    fmt = (
        "MMLU: a folder of <subject>_test.csv / <subject>_dev.csv (original: no header, "
        "answer A-D; or HF export: header question,choice0..3,answer 0-3), or a JSONL file of "
        "{question, subject, choices: [4], answer} (HF cais/mmlu)"
    )

    def check_options(self) -> None:
        subjects = self.opt.subjects
        if isinstance(subjects, str):
            subjects = [s for s in subjects.split(",") if s]
        if subjects is not None:
            bad = [s for s in subjects if s not in CATEGORIES]
            if bad:
                raise EvalError(f"mmlu: unknown subject(s) {', '.join(bad)}")
            self.opt.subjects = list(subjects)

    def read(self, path: Path, split: str) -> list[Doc]:
        if path.is_dir():
            files = sorted(path.glob(f"*_{split}.csv"))
            if not files:
                raise EvalError(f"{path}: no *_{split}.csv files; expected {self.fmt}")
            docs: list[Doc] = []
            wanted = self.opt.subjects
            for f in files:
                subject = f.name[: -len(f"_{split}.csv")]
                if wanted is not None and subject not in wanted:
                    continue
                docs += self._read_csv(f, subject)
            return docs
        docs = []
        for i, row in enumerate(read_records(path, self.fmt), 1):
            try:
                texts = [str(c) for c in row["choices"]]
                doc = {
                    "subject": str(row["subject"]),
                    "question": str(row["question"]),
                    "texts": texts,
                    "gold": _answer_index(row["answer"]),
                }
            except (KeyError, TypeError, ValueError) as e:
                raise EvalError(f"{path}: record {i}: {e!r}; expected {self.fmt}") from e
            if self.opt.subjects is None or doc["subject"] in self.opt.subjects:
                docs.append(self._finish(doc))
        return docs

    def _read_csv(self, path: Path, subject: str) -> list[Doc]:
        rows = read_csv(path, self.fmt, header=False)
        if rows and [c.strip().lower() for c in rows[0]] == _HEADER:
            rows = rows[1:]
        docs = []
        for i, row in enumerate(rows, 1):
            if len(row) != 6:
                raise EvalError(f"{path}: row {i} has {len(row)} columns, want 6; {self.fmt}")
            try:
                gold = _answer_index(row[5])
            except ValueError as e:
                raise EvalError(f"{path}: row {i}: bad answer {row[5]!r}; {self.fmt}") from e
            docs.append(
                self._finish(
                    {"subject": subject, "question": row[0], "texts": row[1:5], "gold": gold}
                )
            )
        return docs

    @staticmethod
    def _finish(doc: dict[str, Any]) -> Doc:
        doc["choices"] = [f" {LETTERS[j]}" for j in range(len(doc["texts"]))]
        return doc

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        docs = self.read(self.data_path(data_dir), "test")
        if not docs:
            raise EvalError(f"mmlu: no test questions in {self.data_path(data_dir)}")
        return self.take(docs, limit)

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        return self.read(self.data_path(data_dir, "fewshot_path", self.info.files[1]), "dev")

    def choose_shots(self, doc: Doc, pool: Sequence[Doc], k: int, rng: random.Random) -> list[Doc]:
        """The first k dev examples of the doc's subject (deterministic, as the benchmark)."""
        same = [d for d in pool if d["subject"] == doc["subject"]]
        if k > len(same):
            raise EvalError(
                f"mmlu: {k} shots asked for but {doc['subject']} has {len(same)} dev examples"
            )
        return same[:k]

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        return list(multiple_choice_requests(mmlu_prompt(doc, shots), doc["choices"]))

    def aggregate(
        self, docs: Sequence[Doc], scores: Sequence[dict[str, float]]
    ) -> dict[str, Metric]:
        by_subject: dict[str, list[float]] = defaultdict(list)
        by_cat: dict[str, list[float]] = defaultdict(list)
        for d, s in zip(docs, scores):
            by_subject[d["subject"]].append(s["acc"])
            by_cat[CATEGORIES.get(d["subject"], "other")].append(s["acc"])
        out: dict[str, Metric] = {"acc": mean_metric([s["acc"] for s in scores])}
        for key in ("acc_char", "acc_token"):
            out[key] = mean_metric([s[key] for s in scores if key in s])
        subj_means = [sum(v) / len(v) for v in by_subject.values()]
        out["acc_subjects"] = Metric(
            sum(subj_means) / len(subj_means) if subj_means else float("nan"),
            None,
            len(subj_means),
        )
        for cat, vals in sorted(by_cat.items()):
            out[f"acc_{cat}"] = mean_metric(vals)
        for subject, vals in sorted(by_subject.items()):
            out[f"acc_{subject}"] = mean_metric(vals)
        return out


def _answer_index(answer: Any) -> int:
    s = str(answer).strip()
    if s.isdigit():
        return int(s)
    if len(s) == 1 and s.upper() in LETTERS:
        return LETTERS.index(s.upper())
    raise ValueError(f"answer {answer!r} is neither 0-3 nor A-D")
