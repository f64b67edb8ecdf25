"""Code generation (Table 8): HumanEval (zero-shot) and MBPP (3-shot), pass@k.

Each doc gets one request for ``n`` samples at ``temperature``; every sample is checked by
`llamaforge.eval.sandbox.check_candidates` (the candidate's code in the sandbox, the tests
in the harness); the doc's pass@k values are Chen et al.'s unbiased estimator over its n
samples (`protocols.pass_at_k`). The paper samples pass@1 at temperature 0.1 and pass@100
(HumanEval) / pass@80 (MBPP) at 0.8; ``setting="pass@1"`` or
``setting="pass@100"``/``"pass@80"`` selects those (temperature, n and ks), and explicit
``n``/``temperature``/``ks`` options override. The default is n=1 at T=0.1 (pass@1 from a
single sample, so a CPU run is possible; its variance is high -- use n >= 10 for reports).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from llamaforge import config
from llamaforge.eval.base import Doc, EvalError, Generate, Request, Result, TaskInfo
from llamaforge.eval.protocols import pass_at_k
from llamaforge.eval.tasks.common import BaseTask, TaskOptions, field, read_records

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass
class CodeOptions(TaskOptions):
    setting: str | None = config.setting(
        None, "the paper's sampling setting (n, temperature, ks); default pass@1"
    )
    n: int | None = config.setting(None, "samples per problem (default: the setting's)")
    temperature: float | None = config.setting(
        None, "sampling temperature (default: the setting's; 0: greedy, needs n=1)"
    )
    top_p: float = config.setting(0.95, "nucleus mass when sampling")
    ks: list[int] | None = config.setting(
        None, "the k of the pass@k reported, each <= n (default: the setting's)"
    )
    max_new_tokens: int = config.setting(512, "generation length cap")
    timeout: float = config.setting(3.0, "seconds each program may run")
    memory_mb: int = config.setting(1024, "memory limit of each program")
    workers: int | None = config.setting(None, "programs run at once (default: CPU count)")
    seed: int = config.setting(1234, "sampling seed")


@dataclass
class HumanEvalOptions(CodeOptions):
    setting: Literal["pass@1", "pass@100"] | None = config.setting(
        None, "pass@1: n=1 at T=0.1 (default); pass@100: n=100 at T=0.8, as in the paper"
    )


@dataclass
class MBPPOptions(CodeOptions):
    setting: Literal["pass@1", "pass@80"] | None = config.setting(
        None, "pass@1: n=1 at T=0.1 (default); pass@80: n=80 at T=0.8, as in the paper"
    )
    split: Literal["test", "prompt", "validation", "train", "all"] = config.setting(
        "test", "the evaluated task ids (test: 11-510, as in the paper)"
    )


class _CodeTask(BaseTask):
    Options: ClassVar[type[TaskOptions]] = CodeOptions
    opt: CodeOptions
    settings: dict[str, dict[str, Any]] = {}
    default_setting = "pass@1"

    def check_options(self) -> None:
        preset = self.settings[self.opt.setting or self.default_setting]
        for key in ("n", "temperature", "ks"):
            if getattr(self.opt, key) is None:
                setattr(self.opt, key, preset[key])
        self.opt.ks = [int(k) for k in self.opt.ks or ()]
        n, t = int(self.opt.n or 0), float(self.opt.temperature or 0.0)
        if n < 1 or any(k < 1 or k > n for k in self.opt.ks):
            raise EvalError(f"{self.info.name}: need 1 <= k <= n for every k (n={n})")
        if t <= 0 and n != 1:
            raise EvalError(f"{self.info.name}: greedy decoding (temperature 0) needs n=1")

    def generate_request(self, prompt: str, until: tuple[str, ...]) -> Generate:
        t = float(self.opt.temperature or 0.0)
        return Generate(
            prompt,
            until=until,
            max_new_tokens=self.opt.max_new_tokens,
            temperature=t,
            top_p=self.opt.top_p if t > 0 else 1.0,
            num_samples=int(self.opt.n or 1),
            seed=self.opt.seed,
        )

    def program(self, doc: Doc, completion: str) -> str:
        raise NotImplementedError

    def case(self, doc: Doc, completion: str) -> tuple[str, str, str | None, str | None]:
        """(candidate code, trusted test code, entry point, whole program) for run_tests."""
        raise NotImplementedError

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        (samples,) = results
        if not isinstance(samples, list) or len(samples) != self.opt.n:
            raise EvalError(f"{self.info.name}: expected {self.opt.n} samples")
        from llamaforge.eval.sandbox import check_candidates  # lazy: keeps the registry light

        outcome = check_candidates(
            [self.case(doc, s) for s in samples],
            timeout=self.opt.timeout,
            memory_mb=self.opt.memory_mb,
            workers=self.opt.workers,
        )
        c = sum(1 for r in outcome if r.passed)
        n = len(samples)
        return {f"pass@{k}": pass_at_k(n, c, k) for k in self.opt.ks}


# ============================================================================ HumanEval


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs: prompt + completion, the tests, and ``check(<entry>)``."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})"


class HumanEval(_CodeTask):
    """HumanEval (164 problems), zero-shot: the prompt is the problem's prompt (signature and
    docstring); completions stop at "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint"."""

    info = TaskInfo(
        name="humaneval",
        table="8",
        main_metric="pass@1",
        default_shots=0,
        files=("humaneval/HumanEval.jsonl.gz",),
        note=(
            "HumanEval (164); default n=1 sample at T=0.1 (pass@1 from one sample); "
            "setting='pass@100' samples n=100 at T=0.8 as in the paper"
        ),
    )
    Options = HumanEvalOptions
    settings = {
        "pass@1": {"n": 1, "temperature": 0.1, "ks": (1,)},
        "pass@100": {"n": 100, "temperature": 0.8, "ks": (1, 10, 100)},
    }
    fmt = "HumanEval JSONL(.gz): {task_id, prompt, entry_point, test, canonical_solution}"

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        path = self.data_path(data_dir)
        docs = []
        for i, row in enumerate(read_records(path, self.fmt), 1):
            docs.append(
                {
                    k: str(field(row, k, path, i, self.fmt))
                    for k in ("task_id", "prompt", "entry_point", "test")
                }
                | {"canonical_solution": str(row.get("canonical_solution", ""))}
            )
        if not docs:
            raise EvalError(f"{path}: no records; expected {self.fmt}")
        return self.take(docs, limit)

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        return [self.generate_request(doc["prompt"], HUMANEVAL_STOP)]

    def program(self, doc: Doc, completion: str) -> str:
        return humaneval_program(doc["prompt"], completion, doc["test"], doc["entry_point"])

    def case(self, doc: Doc, completion: str) -> tuple[str, str, str | None, str | None]:
        """The candidate (prompt + completion) runs in the sandbox; the test code and
        ``check(<entry>)`` in the harness (`sandbox.run_tests`)."""
        program = self.program(doc, completion)
        return doc["prompt"] + completion, doc["test"], doc["entry_point"], program


# ============================================================================ MBPP

MBPP_SPLITS = {
    "test": range(11, 511),
    "prompt": range(1, 11),
    "validation": range(511, 601),
    "train": range(601, 975),
}
MBPP_SHOT_IDS = (2, 3, 4)


def mbpp_prompt(text: str, tests: Sequence[str]) -> str:
    """Austin et al. (2021)'s MBPP prompt up to the code."""
    return (
        f"You are an expert Python programmer, and here is your task: {text} "
        f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n"
    )


def mbpp_program(setup: str, completion: str, tests: Sequence[str]) -> str:
    """The program MBPP runs: the test setup code, the completion, then the asserts."""
    return (setup + "\n" if setup.strip() else "") + completion + "\n" + "\n".join(tests) + "\n"


class MBPP(_CodeTask):
    """MBPP test (task ids 11-510), 3-shot in Austin et al.'s format with the standard shot
    tasks 2, 3, 4: ``You are an expert Python programmer, and here is your task: <text> Your
    code should pass these tests:\\n\\n<tests>\\n[BEGIN]\\n<code>\\n[DONE]`` blocks separated
    by a blank line; the completion stops at "[DONE]"."""

    info = TaskInfo(
        name="mbpp",
        table="8",
        main_metric="pass@1",
        default_shots=3,
        files=("mbpp/mbpp.jsonl",),
        note=(
            "MBPP test ids 11-510 (500); shots = tasks 2, 3, 4; default n=1 sample at T=0.1; "
            "setting='pass@80' samples n=80 at T=0.8 as in the paper"
        ),
    )
    Options = MBPPOptions
    opt: MBPPOptions
    settings = {
        "pass@1": {"n": 1, "temperature": 0.1, "ks": (1,)},
        "pass@80": {"n": 80, "temperature": 0.8, "ks": (1, 10, 80)},
    }
    fmt = (
        "MBPP: original mbpp.jsonl {task_id, text, code, test_list, test_setup_code} or "
        "sanitized-mbpp.json [{task_id, prompt, code, test_list, test_imports}] (also HF)"
    )

    def read(self, path: Path) -> list[Doc]:
        docs = []
        for i, row in enumerate(read_records(path, self.fmt), 1):
            text = row.get("text", row.get("prompt"))
            if text is None:
                raise EvalError(f"{path}: record {i} has no 'text' or 'prompt'; {self.fmt}")
            setup = row.get("test_setup_code") or ""
            if not setup and row.get("test_imports"):
                setup = "\n".join(row["test_imports"])
            docs.append(
                {
                    "task_id": int(field(row, "task_id", path, i, self.fmt)),
                    "text": str(text).strip(),
                    "code": str(field(row, "code", path, i, self.fmt)).replace("\r\n", "\n"),
                    "test_list": [str(t) for t in field(row, "test_list", path, i, self.fmt)],
                    "setup": str(setup),
                }
            )
        if not docs:
            raise EvalError(f"{path}: no records; expected {self.fmt}")
        return docs

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        docs = self.read(self.data_path(data_dir))
        split = self.opt.split
        if split != "all":
            ids = MBPP_SPLITS[split]
            docs = [d for d in docs if d["task_id"] in ids]
        return self.take(docs, limit)

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        by_id = {d["task_id"]: d for d in self.read(self.data_path(data_dir))}
        missing = [i for i in MBPP_SHOT_IDS if i not in by_id]
        if missing:
            raise EvalError(f"mbpp: shot task ids {missing} not in {self.data_path(data_dir)}")
        return [by_id[i] for i in MBPP_SHOT_IDS]

    def choose_shots(self, doc: Doc, pool: Sequence[Doc], k: int, rng: random.Random) -> list[Doc]:
        """Austin et al.'s fixed prompt: tasks 2, 3, 4 (the first k of them)."""
        if k > len(pool):
            raise EvalError(f"mbpp: {k} shots asked for, pool has {len(pool)}")
        return list(pool[:k])

    def prompt(self, doc: Doc, shots: Sequence[Doc]) -> str:
        blocks = [mbpp_prompt(s["text"], s["test_list"]) + s["code"] + "\n[DONE]" for s in shots]
        blocks.append(mbpp_prompt(doc["text"], doc["test_list"]))
        return "\n\n".join(blocks)

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        return [self.generate_request(self.prompt(doc, shots), ("[DONE]",))]

    def program(self, doc: Doc, completion: str) -> str:
        return mbpp_program(doc["setup"], completion, doc["test_list"])

    def case(self, doc: Doc, completion: str) -> tuple[str, str, str | None, str | None]:
        """The candidate (setup + completion) runs in the sandbox; setup + asserts in the
        harness (`sandbox.run_tests`)."""
        setup = doc["setup"] + "\n" if doc["setup"].strip() else ""
        tests = setup + "\n".join(doc["test_list"]) + "\n"
        return setup + completion, tests, None, self.program(doc, completion)
