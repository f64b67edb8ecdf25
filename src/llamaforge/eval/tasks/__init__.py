"""The task registry: `TASKS` (name -> Task subclass), `get_task(name, **options)` and
`get_tasks(names, options)`.

Tasks read their files from a data folder laid out like ``shared/data/eval`` (``boolq/``,
``arc/``, ``mmlu/test`` ...); every task also takes ``path=`` to point at another file in a
standard public format (see each class's ``fmt``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llamaforge.eval.base import EvalError, Task
from llamaforge.eval.tasks.bias import CrowSPairs, RealToxicityPrompts, TruthfulQAMC, WinoGender
from llamaforge.eval.tasks.code import MBPP, HumanEval
from llamaforge.eval.tasks.mathematics import GSM8K, MATH
from llamaforge.eval.tasks.mmlu import MMLU
from llamaforge.eval.tasks.multiple_choice import (
    PIQA,
    RACE,
    SIQA,
    ARCChallenge,
    ARCEasy,
    BoolQ,
    HellaSwag,
    OpenBookQA,
    WinoGrande,
)
from llamaforge.eval.tasks.qa import Lambada, NaturalQuestions, TriviaQA

_CLASSES: tuple[type[Task], ...] = (
    BoolQ,
    PIQA,
    SIQA,
    HellaSwag,
    WinoGrande,
    ARCEasy,
    ARCChallenge,
    OpenBookQA,
    RACE,
    NaturalQuestions,
    TriviaQA,
    Lambada,
    GSM8K,
    MATH,
    HumanEval,
    MBPP,
    MMLU,
    CrowSPairs,
    WinoGender,
    TruthfulQAMC,
    RealToxicityPrompts,
)

TASKS: dict[str, type[Task]] = {cls.info.name: cls for cls in _CLASSES}


def get_task(name: str, **options: Any) -> Task:
    """A configured task; unknown names or options raise EvalError."""
    if name not in TASKS:
        raise EvalError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[name](options=dict(options))


def get_tasks(
    names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Task]:
    """The tasks ``names``, each configured with ``options[name]``: the one route by which
    task options reach tasks (the command line's ``--task-option``, `runner.evaluate`'s
    ``task_options``). Unknown names and options, and options for a task not named, raise
    EvalError."""
    given = dict(options or {})
    tasks = [get_task(name, **dict(given.get(name, {}))) for name in names]
    unused = sorted(set(given) - set(names))
    if unused:
        raise EvalError(
            f"options for task(s) not evaluated: {unused} (the tasks are "
            f"{', '.join(names) or 'none'})"
        )
    return tasks


__all__ = ["TASKS", "get_task", "get_tasks"]
