"""Closed-book question answering (Tables 4 and 5) and LAMBADA."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from llamaforge.config import setting
from llamaforge.eval.base import (
    Doc,
    EvalError,
    Generate,
    Loglikelihood,
    LoglikelihoodResult,
    Metric,
    Request,
    Result,
    TaskInfo,
    mean_metric,
)
from llamaforge.eval.protocols import cut_answer, exact_match, qa_prompt
from llamaforge.eval.tasks.common import (
    BaseTask,
    FewshotOptions,
    TaskOptions,
    field,
    read_records,
)


@dataclass
class QAOptions(FewshotOptions):
    max_new_tokens: int = setting(32, "generation length cap (the answer is cut at a newline)")


class _ClosedBookQA(BaseTask):
    """Docs ``{"question", "answers": [...]}``. Greedy generation of the paper's prompt
    (`protocols.qa_prompt`), cut at the first line break, final dot or comma
    (`protocols.cut_answer`); ``em`` = SQuAD-normalised exact match with any gold answer.
    Shots show their first gold answer."""

    Options: ClassVar[type[TaskOptions]] = QAOptions
    opt: QAOptions
    fmt = ""

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        return self.take(self.read(self.data_path(data_dir)), limit)

    def read(self, path: Path) -> list[Doc]:
        rows = read_records(path, self.fmt)
        docs = [self.parse(r, path, i) for i, r in enumerate(rows, 1)]
        if not docs:
            raise EvalError(f"{path}: no records; expected {self.fmt}")
        return docs

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        raise NotImplementedError

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        prompt = qa_prompt(doc["question"], [(s["question"], s["answers"][0]) for s in shots])
        return [Generate(prompt, until=("\n",), max_new_tokens=self.opt.max_new_tokens)]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        (gens,) = results
        if not isinstance(gens, list) or not gens:
            raise EvalError(f"{self.info.name}: expected one generation")
        return {"em": exact_match(cut_answer(gens[0]), doc["answers"])}


class NaturalQuestions(_ClosedBookQA):
    """NaturalQuestions-open dev (the paper's 3610 questions). Few-shot examples are drawn
    (randomly per doc, by the runner's seeded rng) from the EfficientQA test file, a disjoint
    set of NQ-style questions, since NQ-open train is not available here; pass
    ``fewshot_path=`` to an NQ-open train JSONL to use the train split."""

    info = TaskInfo(
        name="naturalquestions",
        table="4",
        main_metric="em",
        default_shots=0,
        files=(
            "naturalquestions/NQ-open.dev.jsonl",
            "naturalquestions/NQ-open.efficientqa.test.1.1.jsonl",
        ),
        note=(
            "NQ-open dev (3610); paper reports 0/1/5/64 shots; shots drawn from the "
            "EfficientQA test set (NQ-open train not available)"
        ),
    )
    fmt = "NQ-open JSONL: {question, answer: [gold, ...]} (also HF nq_open)"

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        q = str(field(row, "question", path, i, self.fmt)).strip()
        answers = row.get("answer", row.get("answers"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers:
            raise EvalError(f"{path}: record {i}: 'answer' must be a non-empty list; {self.fmt}")
        return {"question": q, "answers": [str(a) for a in answers]}

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        return self.read(self.data_path(data_dir, "fewshot_path", self.info.files[1]))


class TriviaQA(_ClosedBookQA):
    """TriviaQA (the paper: dev set of the filtered set). Every alias and the answer value
    are gold. Few-shot examples come from the same file, excluding the doc itself (no train
    split is available here); ``fewshot_path=`` names another file."""

    info = TaskInfo(
        name="triviaqa",
        table="5",
        main_metric="em",
        default_shots=0,
        files=("triviaqa/triviaqa_sm_sub.jsonl",),
        note=(
            "3000-question TriviaQA subsample (not the filtered dev set); shots from the same "
            "file excluding the doc"
        ),
    )
    fmt = (
        "TriviaQA: converted JSONL {context: 'Question: ...\\nAnswer:', answer, aliases}, or "
        "HF/original {question|Question, answer|Answer: {value|Value, aliases|Aliases}} as "
        "JSONL or JSON ({Data: [...]})"
    )

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        if "context" in row:
            q = str(row["context"]).strip()
            q = q.removeprefix("Question:").removesuffix("Answer:").strip()
            value = field(row, "answer", path, i, self.fmt)
            aliases = list(row.get("aliases") or [])
        else:
            q = str(row.get("question", row.get("Question", ""))).strip()
            ans = row.get("answer", row.get("Answer"))
            if not q or not isinstance(ans, dict):
                raise EvalError(f"{path}: record {i}: no question/answer; expected {self.fmt}")
            value = ans.get("value", ans.get("Value"))
            aliases = list(ans.get("aliases", ans.get("Aliases")) or [])
        answers = [str(value)] if value is not None else []
        answers += [str(a) for a in aliases if str(a) not in answers]
        if not answers:
            raise EvalError(f"{path}: record {i}: no gold answer; expected {self.fmt}")
        return {"question": q, "answers": answers}

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        return self.read(self.data_path(data_dir, "fewshot_path"))


class Lambada(BaseTask):
    """LAMBADA (OpenAI test version): predict the last word. Request
    ``Loglikelihood(<text up to the last word>, " <last word>")``; ``acc`` = the word is the
    greedy continuation (every token argmax); ``perplexity`` = exp(-mean log-likelihood of the
    word) over docs (aggregated, lm-eval's definition)."""

    info = TaskInfo(
        name="lambada",
        table="-",
        main_metric="acc",
        default_shots=0,
        files=("lambada/lambada_openai.jsonl",),
        note="LAMBADA OpenAI test (5153); not in the paper's tables",
    )
    fmt = "LAMBADA JSONL: {text} (original / HF lambada_openai) or {context, continuation}"

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        path = self.data_path(data_dir)
        docs = []
        for i, row in enumerate(read_records(path, self.fmt), 1):
            if "context" in row:
                ctx = str(row["context"])
                word = str(field(row, "continuation", path, i, self.fmt))
            else:
                text = str(field(row, "text", path, i, self.fmt)).rstrip()
                if " " not in text:
                    raise EvalError(f"{path}: record {i}: text has a single word")
                ctx, word = text.rsplit(" ", 1)
            docs.append({"context": ctx.rstrip(" "), "word": " " + word.strip()})
        if not docs:
            raise EvalError(f"{path}: no records; expected {self.fmt}")
        return self.take(docs, limit)

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        prefix = "".join(s["context"] + s["word"] + "\n\n" for s in shots)
        return [Loglikelihood(prefix + doc["context"], doc["word"])]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        (r,) = results
        if not isinstance(r, LoglikelihoodResult):
            raise EvalError("lambada: expected a loglikelihood result")
        return {"acc": float(r.is_greedy), "logprob": r.logprob}

    def aggregate(
        self, docs: Sequence[Doc], scores: Sequence[dict[str, float]]
    ) -> dict[str, Metric]:
        lps = [s["logprob"] for s in scores]
        out = {"acc": mean_metric([s["acc"] for s in scores])}
        if lps:
            out["perplexity"] = Metric(math.exp(-sum(lps) / len(lps)), None, len(lps))
        return out
