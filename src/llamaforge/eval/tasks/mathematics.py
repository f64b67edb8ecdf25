"""Mathematical reasoning (Table 7): GSM8K and MATH, greedy accuracy and maj1@k.

Per doc: one greedy generation (``acc``) and, when option ``maj_k`` > 0, one request for
``maj_k`` samples at ``temperature`` (default 0.6, Minerva's) scored by majority vote
(``maj1@<k>``). The paper uses k=100 for GSM8K and k=256 for MATH; the default here is 0
(greedy only) so a CPU run stays possible.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from llamaforge.config import setting
from llamaforge.eval.base import Doc, EvalError, Generate, Request, Result, TaskInfo
from llamaforge.eval.protocols import (
    extract_gsm8k_answer,
    extract_math_answer,
    last_boxed,
    maj_at_k,
    normalize_math_answer,
    normalize_number,
)
from llamaforge.eval.tasks.common import (
    BaseTask,
    TaskOptions,
    field,
    read_records,
)


@dataclass
class MathOptions(TaskOptions):
    maj_k: int = setting(
        0, "also sample k solutions and score their majority answer (maj1@k); 0: greedy only"
    )
    temperature: float = setting(0.6, "sampling temperature of the maj1@k samples")
    top_p: float = setting(1.0, "nucleus mass of the maj1@k samples")
    max_new_tokens: int = setting(256, "generation length cap")
    seed: int = setting(1234, "seed of the maj1@k samples")


@dataclass
class GSM8KOptions(MathOptions):
    fewshot_path: str | None = setting(
        None, "the file whose first 8 problems are the shots (default: the GSM8K train file)"
    )


@dataclass
class MATHOptions(MathOptions):
    max_new_tokens: int = setting(512, "generation length cap")


class _MathTask(BaseTask):
    Options: ClassVar[type[TaskOptions]] = MathOptions
    opt: MathOptions
    until: tuple[str, ...] = ()

    def check_options(self) -> None:
        if self.opt.maj_k < 0:
            raise EvalError(f"{self.info.name}: maj_k must be >= 0")
        if self.opt.maj_k > 0 and self.opt.temperature <= 0:
            raise EvalError(f"{self.info.name}: maj1@k sampling needs temperature > 0")

    def prompt(self, doc: Doc, shots: Sequence[Doc]) -> str:
        raise NotImplementedError

    def extract(self, text: str) -> str | None:
        raise NotImplementedError

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        prompt = self.prompt(doc, shots)
        n = self.opt.max_new_tokens
        reqs: list[Request] = [Generate(prompt, until=self.until, max_new_tokens=n)]
        k = self.opt.maj_k
        if k > 0:
            reqs.append(
                Generate(
                    prompt,
                    until=self.until,
                    max_new_tokens=n,
                    temperature=self.opt.temperature,
                    top_p=self.opt.top_p,
                    num_samples=k,
                    seed=self.opt.seed,
                )
            )
        return reqs

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        gens = [r for r in results if isinstance(r, list)]
        if len(gens) != len(results) or not gens or not gens[0]:
            raise EvalError(f"{self.info.name}: expected generation results")
        out = {"acc": float(self.extract(gens[0][0]) == doc["answer"])}
        k = self.opt.maj_k
        if k > 0:
            if len(gens) < 2 or len(gens[1]) != k:
                raise EvalError(f"{self.info.name}: expected {k} samples for maj1@{k}")
            out[f"maj1@{k}"] = maj_at_k([self.extract(t) for t in gens[1]], doc["answer"])
        return out

    def choose_shots(self, doc: Doc, pool: Sequence[Doc], k: int, rng: random.Random) -> list[Doc]:
        """A fixed prompt: the first k examples of the pool, the same for every doc."""
        if k > len(pool):
            raise EvalError(f"{self.info.name}: {k} shots asked for, pool has {len(pool)}")
        return list(pool[:k])


# ============================================================================ GSM8K

_CALC = re.compile(r"<<[^<>]*>>")


class GSM8K(_MathTask):
    """GSM8K test (1319). 8-shot chain of thought: the first 8 problems of the GSM8K train
    file (a fixed prompt), each ``Question: <q>\\nAnswer: <solution>`` with the solution's
    calculator annotations ``<<...>>`` removed and its final ``#### <n>`` line kept; the test
    problem ends with ``Question: <q>\\nAnswer:``. The answer is the number after "####" or
    the last number of the generation (`protocols.extract_gsm8k_answer`)."""

    info = TaskInfo(
        name="gsm8k",
        table="7",
        main_metric="acc",
        default_shots=8,
        files=("gsm8k/test.jsonl", "gsm8k/train.jsonl"),
        note=(
            "GSM8K test (1319); 8 shots = the first 8 train problems; maj1@k with option "
            "maj_k (paper: k=100, T=0.6 Minerva setup)"
        ),
    )
    Options = GSM8KOptions
    until = ("\n\n", "Question:")
    fmt = (
        "GSM8K JSONL: original {question, answer: '<solution>\\n#### <n>'} or converted "
        "{context, chain_of_thought, answer}"
    )

    def read(self, path: Path) -> list[Doc]:
        docs = []
        for i, row in enumerate(read_records(path, self.fmt), 1):
            if "context" in row:
                q = str(row["context"])
                sol = str(field(row, "chain_of_thought", path, i, self.fmt))
                ans = str(field(row, "answer", path, i, self.fmt))
            else:
                q = str(field(row, "question", path, i, self.fmt))
                full = str(field(row, "answer", path, i, self.fmt))
                if "####" not in full:
                    raise EvalError(f"{path}: record {i}: answer has no '#### <n>'; {self.fmt}")
                sol, ans = full.rsplit("####", 1)
            gold = normalize_number(ans)
            if gold is None:
                raise EvalError(f"{path}: record {i}: answer {ans!r} is not a number")
            docs.append({"question": q.strip(), "solution": sol.strip(), "answer": gold})
        if not docs:
            raise EvalError(f"{path}: no records; expected {self.fmt}")
        return docs

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        return self.take(self.read(self.data_path(data_dir)), limit)

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        return self.read(self.data_path(data_dir, "fewshot_path", self.info.files[1]))

    def prompt(self, doc: Doc, shots: Sequence[Doc]) -> str:
        parts = [
            f"Question: {s['question']}\nAnswer: {_CALC.sub('', s['solution'])}\n"
            f"#### {s['answer']}\n\n"
            for s in shots
        ]
        return "".join(parts) + f"Question: {doc['question']}\nAnswer:"

    def extract(self, text: str) -> str | None:
        return extract_gsm8k_answer(text)


# ============================================================================ MATH

MINERVA_SHOTS: tuple[dict[str, str], ...] = (
    {
        "problem": "Find the domain of the expression $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "solution": (
            "The expressions inside each square root must be non-negative. Therefore, "
            "$x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the "
            "denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, "
            "the domain of the expression is $\\boxed{[2,5)}$."
        ),
        "answer": "[2,5)",
    },
    {
        "problem": (
            "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find "
            "$\\det (\\mathbf{A} \\mathbf{B}).$"
        ),
        "solution": (
            "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})"
            "(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$"
        ),
        "answer": "24",
    },
    {
        "problem": (
            "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound "
            "weights instead, how many times must Terrell lift them in order to lift the same "
            "total weight?"
        ),
        "solution": (
            "If Terrell lifts two 20-pound weights 12 times, he lifts a total of "
            "$2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights "
            "instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of "
            "weight.  Equating this to 480 pounds, we can solve for $n$:\n"
            "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n"
            "\\end{align*}"
        ),
        "answer": "16",
    },
    {
        "problem": (
            "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n"
            "\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\n"
            "find $\\frac{a}{b},$ assuming $b$ is nonzero."
        ),
        "solution": (
            "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n"
            "$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n"
            "$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$"
        ),
        "answer": "-\\frac{2}{3}",
    },
)
"""The four worked examples of Minerva's MATH prompt (Lewkowycz et al. 2022, from MATH's
train set)."""


class MATH(_MathTask):
    """MATH test (5000). Minerva's 4-shot prompt: ``Problem:\\n<problem>\\n\\nSolution:\\n
    <solution>\\nFinal Answer: The final answer is $<answer>$. I hope it is correct.``
    blocks, then ``Problem:\\n<problem>\\n\\nSolution:``. The answer is the last
    ``\\boxed{}`` (else Minerva's "final answer is" sentence), normalised
    (`protocols.normalize_math_answer`) and compared as a string with the normalised gold."""

    info = TaskInfo(
        name="math",
        table="7",
        main_metric="acc",
        default_shots=4,
        files=("math/math.jsonl",),
        note=(
            "MATH test (5000); Minerva 4-shot prompt; string match after normalisation (no "
            "symbolic equivalence); maj1@k with option maj_k (paper: k=256)"
        ),
    )
    Options = MATHOptions
    until = ("\n\nProblem:", "Problem:")
    fmt = (
        "MATH JSONL: original/HF {problem, solution (with \\boxed{answer}), level, type} or "
        "converted {context, answer, chain_of_thought, category}"
    )

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        path = self.data_path(data_dir)
        docs = []
        for i, row in enumerate(read_records(path, self.fmt), 1):
            if "context" in row:
                q = str(row["context"])
                ans = str(field(row, "answer", path, i, self.fmt))
                cat = str(row.get("category", ""))
            else:
                q = str(field(row, "problem", path, i, self.fmt))
                boxed = last_boxed(str(field(row, "solution", path, i, self.fmt)))
                if boxed is None:
                    raise EvalError(f"{path}: record {i}: solution has no \\boxed{{}} answer")
                ans = boxed
                cat = str(row.get("type", ""))
            docs.append({"problem": q.strip(), "answer": normalize_math_answer(ans), "type": cat})
        if not docs:
            raise EvalError(f"{path}: no records; expected {self.fmt}")
        return self.take(docs, limit)

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        return [dict(s) for s in MINERVA_SHOTS]

    def prompt(self, doc: Doc, shots: Sequence[Doc]) -> str:
        parts = [
            f"Problem:\n{s['problem']}\n\nSolution:\n{s['solution']}\n"
            f"Final Answer: The final answer is ${s['answer']}$. I hope it is correct.\n\n"
            for s in shots
        ]
        return "".join(parts) + f"Problem:\n{doc['problem']}\n\nSolution:"

    def extract(self, text: str) -> str | None:
        return extract_math_answer(text)
