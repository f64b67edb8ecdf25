"""Zero-shot common sense reasoning (Table 3) and reading comprehension (RACE, Table 6).

Every task reads the file under the shared data folder by default and also the standard
public formats (original JSON/JSONL, HF-datasets field names), so full sets can be run with
``path=...``. Multiple choice is scored by `protocols.score_multiple_choice`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamaforge.eval.base import (
    Doc,
    EvalError,
    Loglikelihood,
    LoglikelihoodResult,
    Request,
    Result,
    TaskInfo,
)
from llamaforge.eval.protocols import continuation
from llamaforge.eval.tasks.common import (
    LabelsOptions,
    MultipleChoiceTask,
    converted_mc,
    field,
    letter_index,
    read_records,
)

# ============================================================================ BoolQ


class BoolQ(MultipleChoiceTask):
    """BoolQ dev. Context ``Passage: <passage>\\nQuestion: <question>?\\nAnswer:``, choices
    " no" / " yes"; main metric acc_uncond (the paper follows Brown et al. for BoolQ)."""

    info = TaskInfo(
        name="boolq",
        table="3",
        main_metric="acc_uncond",
        default_shots=0,
        files=("boolq/boolq.jsonl",),
        note="BoolQ dev (3270); score normalised by P(completion|'Answer:') (Brown et al.)",
    )
    unconditional = True
    fmt = (
        "BoolQ JSONL: {query, choices: [no, yes], gold} (converted) or "
        "{question, passage, answer: bool} (original) or {question, passage, label} (HF)"
    )

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        if "query" in row:
            query, _, gold = converted_mc(row, path, i, self.fmt)
        else:
            q = str(field(row, "question", path, i, self.fmt)).strip()
            passage = str(field(row, "passage", path, i, self.fmt)).strip()
            ans = row.get("answer", row.get("label"))
            if ans is None:
                raise EvalError(f"{path}: record {i} has no 'answer' or 'label'; {self.fmt}")
            gold = int(ans if not isinstance(ans, str) else ans.lower() in ("true", "1"))
            query = f"Passage: {passage}\nQuestion: {q}{'' if q.endswith('?') else '?'}"
        return {"query": query + "\nAnswer:", "choices": [" no", " yes"], "gold": gold}


# ============================================================================ PIQA


class PIQA(MultipleChoiceTask):
    """PIQA validation. Context ``Question: <goal>\\nAnswer:``, choices " <sol1>", " <sol2>"."""

    info = TaskInfo(
        name="piqa",
        table="3",
        main_metric="acc_char",
        default_shots=0,
        files=("piqa/valid.jsonl", "piqa/valid-labels.lst"),
        note="PIQA validation (1838)",
    )
    Options = LabelsOptions
    labels_file = True
    fmt = (
        "PIQA: original valid.jsonl {goal, sol1, sol2} with a labels file (<name>-labels.lst, "
        "option labels_path), or JSONL with {goal, sol1, sol2, label} (HF), or the converted "
        "{query, choices, gold}"
    )

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        if "query" in row:
            query, choices, gold = converted_mc(row, path, i, self.fmt)
            goal = query.strip().removeprefix("Question:").strip()
        else:
            goal = str(field(row, "goal", path, i, self.fmt)).strip()
            choices = [str(field(row, k, path, i, self.fmt)) for k in ("sol1", "sol2")]
            gold = int(field(row, "label", path, i, self.fmt))
        return {
            "query": f"Question: {goal}\nAnswer:",
            "choices": [" " + c.strip() for c in choices],
            "gold": gold,
        }


# ============================================================================ SIQA


class SIQA(MultipleChoiceTask):
    """Social IQa dev. Original (3 choices): ``Q: <context> <question>\\nA:`` with choices
    " <answer>". The converted default file keeps only 2 of the 3 choices and asks for a
    letter (``...Answer:`` with " A" / " B"): it is NOT SIQA -- see info.note."""

    info = TaskInfo(
        name="siqa",
        table="3",
        main_metric="acc_char",
        default_shots=0,
        files=("siqa/siqa.jsonl",),
        note=(
            "2 of 3 choices -- not SIQA: the default file (MosaicML conversion of SIQA dev, "
            "1954) drops one of the three answers and asks for a letter; never report it as "
            "SIQA. Pass path= to the original socialiqa dev.jsonl (+ dev-labels.lst) or an HF "
            "social_i_qa JSONL for the real 3-choice task."
        ),
    )
    Options = LabelsOptions
    labels_file = True
    fmt = (
        "SIQA: original dev.jsonl {context, question, answerA, answerB, answerC} with "
        "dev-labels.lst (1-3), or JSONL with those fields and label (HF), or the converted "
        "{query, choices, gold}"
    )

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        if "query" in row:
            query, choices, gold = converted_mc(row, path, i, self.fmt)
            return {"query": query, "choices": [" " + c for c in choices], "gold": gold}
        ctx = str(field(row, "context", path, i, self.fmt)).strip()
        q = str(field(row, "question", path, i, self.fmt)).strip()
        answers = [str(field(row, f"answer{k}", path, i, self.fmt)) for k in "ABC"]
        gold = int(str(field(row, "label", path, i, self.fmt)).strip()) - 1  # 1-based
        return {
            "query": f"Q: {ctx} {q}\nA:",
            "choices": [" " + a.strip() for a in answers],
            "gold": gold,
        }


# ============================================================================ HellaSwag


def hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow artefacts: " [title]" becomes ". ", other "[...]" tags are dropped
    and runs of spaces collapsed to one."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(r" {2,}", " ", text)


class HellaSwag(MultipleChoiceTask):
    """HellaSwag validation. Context ``<activity_label>: <ctx_a> <Ctx_b>`` (cleaned), choices
    " <ending>" (cleaned); main metric acc_char."""

    info = TaskInfo(
        name="hellaswag",
        table="3",
        main_metric="acc_char",
        default_shots=0,
        files=("hellaswag/hellaswag.jsonl",),
        note="sample of 1000 of the 10042 validation items (original format)",
    )
    fmt = (
        "HellaSwag JSONL: original/HF {activity_label, ctx_a, ctx_b, endings, label} or the "
        "converted {query, choices, gold}"
    )

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        if "query" in row:
            query, choices, gold = converted_mc(row, path, i, self.fmt)
            return {"query": query, "choices": [continuation(c) for c in choices], "gold": gold}
        ctx_a = str(field(row, "ctx_a", path, i, self.fmt))
        ctx_b = str(field(row, "ctx_b", path, i, self.fmt))
        label = str(field(row, "activity_label", path, i, self.fmt))
        endings = field(row, "endings", path, i, self.fmt)
        gold_raw = field(row, "label", path, i, self.fmt)
        if not isinstance(endings, list) or str(gold_raw).strip() == "":
            raise EvalError(f"{path}: record {i}: endings must be a list, label an index")
        ctx = ctx_a + " " + ctx_b.capitalize()
        return {
            "query": hellaswag_clean(label + ": " + ctx),
            "choices": [" " + hellaswag_clean(str(e)) for e in endings],
            "gold": int(gold_raw),
        }


# ============================================================================ WinoGrande


class WinoGrande(MultipleChoiceTask):
    """WinoGrande dev, partial scoring: each option fills the blank, the context is the
    sentence up to the blank with the option in it, and the same continuation (the rest of the
    sentence) is scored under both contexts; acc = the right option gives it the higher
    log-likelihood."""

    info = TaskInfo(
        name="winogrande",
        table="3",
        main_metric="acc",
        default_shots=0,
        files=("winogrande/winogrande.jsonl",),
        note="WinoGrande dev (1267), partial scoring (same continuation, two contexts)",
    )
    fmt = (
        "WinoGrande JSONL: original/HF {sentence with '_', option1, option2, answer: '1'|'2'} "
        "or the converted {context_options, continuation, gold}"
    )

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        if "context_options" in row:
            contexts = [str(c) for c in field(row, "context_options", path, i, self.fmt)]
            cont = str(field(row, "continuation", path, i, self.fmt))
            gold = int(field(row, "gold", path, i, self.fmt))
        else:
            sentence = str(field(row, "sentence", path, i, self.fmt))
            if "_" not in sentence:
                raise EvalError(f"{path}: record {i}: sentence has no blank '_'; {self.fmt}")
            k = sentence.index("_")
            opts = [str(field(row, f"option{j}", path, i, self.fmt)) for j in (1, 2)]
            contexts = [sentence[:k] + o for o in opts]
            cont = sentence[k + 1 :]
            gold = int(str(field(row, "answer", path, i, self.fmt)).strip()) - 1
        cont = " " + cont.strip()
        return {"contexts": contexts, "continuation": cont, "gold": gold}

    def fewshot_prefix(self, shots: Sequence[Doc]) -> str:
        return "".join(s["contexts"][s["gold"]] + s["continuation"] + "\n\n" for s in shots)

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        prefix = self.fewshot_prefix(shots)
        return [Loglikelihood(prefix + c, doc["continuation"]) for c in doc["contexts"]]

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        lps = [r.logprob for r in results if isinstance(r, LoglikelihoodResult)]
        if len(lps) != len(doc["contexts"]):
            raise EvalError("winogrande: expected one loglikelihood result per option")
        best = max(range(len(lps)), key=lambda j: (lps[j], -j))
        return {"acc": float(best == doc["gold"])}


# ============================================================================ ARC


class _ARC(MultipleChoiceTask):
    """ARC. Context ``Question: <question>\\nAnswer:``, choices " <text>"; main acc_char."""

    fmt = (
        "ARC JSONL: original {question: {stem, choices: [{text, label}]}, answerKey} or HF "
        "{question, choices: {text: [...], label: [...]}, answerKey} or converted "
        "{query, choices, gold}"
    )

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        if "query" in row:
            query, choices, gold = converted_mc(row, path, i, self.fmt)
            stem = query.strip().removeprefix("Question:").strip()
        else:
            stem, choices, gold = parse_stem_choices(row, path, i, self.fmt)
        return {
            "query": f"Question: {stem}\nAnswer:",
            "choices": [" " + c.strip() for c in choices],
            "gold": gold,
        }


def parse_stem_choices(
    row: dict[str, Any], path: Path, i: int, fmt: str
) -> tuple[str, list[str], int]:
    """Question stem, choice texts and gold index of the AI2 formats (ARC, OpenBookQA):
    original ``question: {stem, choices: [{text, label}]}`` or HF ``question``/
    ``question_stem`` + ``choices: {text, label}``; ``answerKey`` a label."""
    q = field(row, "question", path, i, fmt) if "question_stem" not in row else None
    if isinstance(q, dict):
        stem = str(field(q, "stem", path, i, fmt))
        ch = field(q, "choices", path, i, fmt)
        texts = [str(c["text"]) for c in ch]
        labels = [str(c["label"]) for c in ch]
    else:
        stem = str(q if q is not None else row["question_stem"])
        ch = field(row, "choices", path, i, fmt)
        if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
            raise EvalError(f"{path}: record {i}: choices must be {{text, label}}; {fmt}")
        texts = [str(t) for t in ch["text"]]
        labels = [str(lab) for lab in ch["label"]]
    gold = letter_index(field(row, "answerKey", path, i, fmt), labels, path, i)
    if not 0 <= gold < len(texts):
        raise EvalError(f"{path}: record {i}: answerKey out of range; {fmt}")
    return stem.strip(), texts, gold


class ARCEasy(_ARC):
    info = TaskInfo(
        name="arc_easy",
        table="3",
        main_metric="acc_char",
        default_shots=0,
        files=("arc/arc_easy.jsonl",),
        note="ARC-Easy test (2376)",
    )


class ARCChallenge(_ARC):
    info = TaskInfo(
        name="arc_challenge",
        table="3",
        main_metric="acc_char",
        default_shots=0,
        files=("arc/arc_challenge.jsonl",),
        note="ARC-Challenge test (1172)",
    )


# ============================================================================ OpenBookQA


class OpenBookQA(MultipleChoiceTask):
    """OpenBookQA test. Context = the question stem, choices " <text>"; main metric
    acc_uncond (the paper follows Brown et al.: P(c|context) / P(c|"Answer:"))."""

    info = TaskInfo(
        name="openbookqa",
        table="3",
        main_metric="acc_uncond",
        default_shots=0,
        files=("openbookqa/openbookqa.jsonl",),
        note="OpenBookQA test (500); score normalised by P(completion|'Answer:') (Brown et al.)",
    )
    unconditional = True
    fmt = (
        "OpenBookQA JSONL: original {id, question: {stem, choices: [{text, label}]}, "
        "answerKey} or HF {question_stem, choices: {text, label}, answerKey} or converted "
        "{query, choices, gold}"
    )

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        if "query" in row:
            stem, choices, gold = converted_mc(row, path, i, self.fmt)
        else:
            stem, choices, gold = parse_stem_choices(row, path, i, self.fmt)
        return {
            "query": stem.strip(),
            "choices": [" " + c.strip() for c in choices],
            "gold": gold,
        }


# ============================================================================ RACE


class RACE(MultipleChoiceTask):
    """RACE (middle + high), Brown et al.'s setup: ``Article: <article>\\n\\n`` then, for
    articles given with all their questions, the earlier questions with their answers, then
    ``Question: <question>\\nAnswer:`` and choices " <option>". Cloze questions (with "_")
    are written up to the blank and the option continues them. Main metric acc_char."""

    info = TaskInfo(
        name="race",
        table="6",
        main_metric="acc_char",
        default_shots=0,
        files=("race/race.jsonl",),
        note="sample of 1000 RACE questions (500 middle + 500 high, split not stated)",
    )
    fmt = (
        "RACE JSONL: one question per record {article, question, options: [4], answer: "
        "'A'-'D'} (HF ehovy/race) or one article per record {article, problems: [{question, "
        "options, answer}]} (EleutherAI/race)"
    )

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        path = self.data_path(data_dir)
        rows = read_records(path, self.fmt)
        docs: list[Doc] = []
        for i, row in enumerate(rows, 1):
            article = str(field(row, "article", path, i, self.fmt))
            if "problems" in row:
                problems = row["problems"]
                if isinstance(problems, str):
                    import ast

                    problems = ast.literal_eval(problems)
                for j in range(len(problems)):
                    docs.append(self._doc(article, problems[:j], problems[j], path, i))
            else:
                docs.append(self._doc(article, [], row, path, i))
            if limit is not None and len(docs) >= limit:
                break
        if not docs:
            raise EvalError(f"{path}: no records; expected {self.fmt}")
        return self.take(docs, limit)

    def _doc(
        self,
        article: str,
        before: Sequence[dict[str, Any]],
        prob: dict[str, Any],
        path: Path,
        i: int,
    ) -> Doc:
        text = f"Article: {article.strip()}\n\n"
        for p in before:
            opts = [str(o) for o in p["options"]]
            ans = opts[letter_index(p["answer"], None, path, i)]
            q = str(p["question"])
            if "_" in q:
                text += q.replace("_", ans, 1).strip() + "\n"
            else:
                text += f"Question: {q.strip()}\nAnswer: {ans}\n"
        q = str(field(prob, "question", path, i, self.fmt))
        opts = [str(o) for o in field(prob, "options", path, i, self.fmt)]
        gold = letter_index(field(prob, "answer", path, i, self.fmt), None, path, i)
        if "_" in q:
            text += q[: q.index("_")].rstrip()
        else:
            text += f"Question: {q.strip()}\nAnswer:"
        return {"query": text, "choices": [" " + o.strip() for o in opts], "gold": gold}
