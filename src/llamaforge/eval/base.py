"""The contract between the evaluation engine, the protocols and the tasks.

Data flows one way:

    Task.load(data_dir, limit) -> list[Doc]                         (tasks/)
    Task.requests(doc, shots)  -> list[Request]                      (tasks/ + protocols)
    LanguageModel answers every request of every doc in one batch    (lm.py)
    Task.score(doc, results)   -> dict[str, float]  (one doc)       (tasks/ + protocols)
    Task.aggregate(docs, scores) -> dict[str, Metric]               (tasks/, default: mean)

The registry is `llamaforge.eval.tasks`: `TASKS: dict[str, type[Task]]` and
`get_task(name, **options) -> Task` (unknown names and options raise EvalError).
Generated code is run by `llamaforge.eval.sandbox` (`run_tests`, `check_candidates`,
`run_program`, `check_programs`).

A request is a frozen, hashable dataclass, so the engine can deduplicate identical
requests across docs (a shared context scored once) and cache results by value.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class EvalError(ValueError):
    """Bad evaluation input (missing file, wrong field, unknown task); names what and where."""


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Loglikelihood:
    """log P(continuation | context), summed over the continuation's tokens.

    Tokenisation follows lm-eval's causal-model rule (`LlamaforgeLM.encode_pair`): trailing
    whitespace of the context moves to the continuation, the whole string is encoded (with
    BOS) and the continuation's tokens are what it adds after the context's own tokens —
    encoding " Paris" alone with SentencePiece would give an extra "▁" token. Leading spaces
    belong to the continuation (" Paris").
    """

    context: str
    continuation: str


@dataclass(frozen=True)
class LoglikelihoodResult:
    logprob: float  # sum of log-probabilities of the continuation tokens (natural log)
    is_greedy: bool  # every continuation token is the argmax at its position
    num_tokens: int  # number of continuation tokens


@dataclass(frozen=True)
class Rolling:
    """log P(text) over the whole text (BOS prepended, windows of the model's context)."""

    text: str


@dataclass(frozen=True)
class Generate:
    """Sample `num_samples` continuations of `context`.

    temperature 0 is greedy (num_samples must then be 1). Each continuation is cut before
    the first occurrence of any string in `until` (the stop string is not included) and
    at EOS. `seed` makes sampling reproducible: the engine seeds request i's sample j
    from (seed, j) so results do not depend on batch composition.
    """

    context: str
    until: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 1234


Request = Loglikelihood | Rolling | Generate
# Result for a Loglikelihood: LoglikelihoodResult; for Rolling: float (sum logprob);
# for Generate: list[str] of length num_samples.
Result = LoglikelihoodResult | float | list[str]


class LanguageModel(Protocol):
    """What a task needs from a model. `llamaforge.eval.lm.LlamaforgeLM` implements it."""

    def loglikelihood(self, requests: Sequence[Loglikelihood]) -> list[LoglikelihoodResult]: ...

    def loglikelihood_rolling(self, requests: Sequence[Rolling]) -> list[float]: ...

    def generate(self, requests: Sequence[Generate]) -> list[list[str]]: ...


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    value: float  # in [0, 1] for accuracies (the report shows percentages)
    stderr: float | None  # standard error of the mean; None where it has no meaning
    n: int  # number of docs it is computed over


def mean_metric(values: Sequence[float]) -> Metric:
    """Mean with the sample standard error (ddof=1), as lm-eval reports it."""
    n = len(values)
    if n == 0:
        return Metric(float("nan"), None, 0)
    mu = sum(values) / n
    if n < 2:
        return Metric(mu, None, n)
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return Metric(mu, math.sqrt(var / n), n)


# ----------------------------------------------------------------------------- tasks

Doc = dict[str, Any]  # one example as the loader normalised it (must be JSON-serialisable)


@dataclass(frozen=True)
class TaskInfo:
    name: str  # registry key, e.g. "arc_easy"
    table: str  # paper table it belongs to, e.g. "3" (common sense), "4" (NQ), "9" (MMLU)
    main_metric: str  # the metric the paper's table shows, e.g. "acc_char"
    default_shots: int  # the paper's setting
    files: tuple[str, ...]  # paths under data_dir it reads by default, for hashing
    note: str = ""  # e.g. "sample of 1000 of 10042 items" / "2 of 3 choices: not SIQA"


@dataclass
class Task(ABC):
    """One benchmark. Subclasses set `info` and implement load/requests/score."""

    info: TaskInfo = field(init=False)
    options: dict[str, Any] = field(default_factory=dict)  # task-specific settings (k, T…)

    @abstractmethod
    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        """The evaluated docs in a fixed order (the first `limit` of them)."""

    def fewshot_docs(self, data_dir: Path) -> list[Doc]:
        """The pool few-shot examples are drawn from (a train/dev split, never the test docs)."""
        return []

    def choose_shots(self, doc: Doc, pool: Sequence[Doc], k: int, rng: random.Random) -> list[Doc]:
        """The k few-shot examples for `doc`. Default: a random sample of the pool (drawn from
        `rng`, which the runner seeds per doc) that excludes `doc` itself. MMLU overrides it
        (the first k dev examples of the same subject)."""
        candidates = [d for d in pool if d != doc]
        if k > len(candidates):
            raise EvalError(
                f"{self.info.name}: {k} shots asked for but the few-shot pool has "
                f"{len(candidates)} examples"
            )
        return rng.sample(candidates, k)

    @abstractmethod
    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        """Every request needed to score `doc` with these few-shot examples."""

    @abstractmethod
    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        """Per-doc metric values from the results of `requests(doc, ...)`, in order."""

    def aggregate(
        self, docs: Sequence[Doc], scores: Sequence[dict[str, float]]
    ) -> dict[str, Metric]:
        """Default: the mean of every per-doc metric, with its standard error."""
        keys = sorted({k for s in scores for k in s})
        return {k: mean_metric([s[k] for s in scores if k in s]) for k in keys}
