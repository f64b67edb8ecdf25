"""An instruction set generated from the Python standard library's own sources (no download).

Every example asks one question about one line of stdlib code and has one short answer that
can be checked exactly, and that follows from the line by a *rule* — so a model finetuned on
some functions can answer for functions it was never finetuned on:

* ``function_name`` — "What is the name of the function defined here?" + a ``def`` line →
  the function's name;
* ``first_parameter`` — "What is the first parameter of this function?" + a ``def`` line
  (not a method's ``self``/``cls``) → the first parameter's name;
* ``parameter_count`` — "How many parameters does this function take?" + a ``def`` line →
  the number of names in its parameter list (``*args`` and ``**kwargs`` included);
* ``imported_module`` — "Which module does this statement import?" + ``import a.b [as c]``
  or ``from a.b import c`` → ``a.b``.

``def`` lines are the parsed signature written back by :func:`ast.unparse` (one line,
defaults and annotations as written), so the answer is checked against what ``ast`` says.
Each function name (and each imported module) is used by at most one example, so an
example that the finetuning split holds out (by the hash of its messages,
:func:`~llamaforge.finetune.data.example_is_val`) is about a function or module that no
training example mentions as its subject. The set depends only on the interpreter's stdlib
and the seed.
"""

from __future__ import annotations

import ast
import json
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaforge.data.stdlib import python_files, stdlib_dir
from llamaforge.finetune.data import example_is_val

__all__ = [
    "QUESTIONS",
    "TASKS",
    "StdlibTask",
    "def_line",
    "generate_tasks",
    "parameter_names",
    "split_tasks",
    "write_jsonl",
]

QUESTIONS: dict[str, str] = {
    "function_name": "What is the name of the function defined here?",
    "first_parameter": "What is the first parameter of this function?",
    "parameter_count": "How many parameters does this function take?",
    "imported_module": "Which module does this statement import?",
}
TASKS: tuple[str, ...] = tuple(QUESTIONS)
_METHOD_FIRST = {"self", "cls", "mcs", "mcls", "metacls"}


@dataclass(frozen=True)
class StdlibTask:
    """One instruction: ``task`` (a key of :data:`QUESTIONS`), the ``code`` line it asks
    about, the ``answer``, the ``subject`` (function or module name: used once in the whole
    set) and the stdlib ``module`` the line comes from."""

    task: str
    code: str
    answer: str
    subject: str
    module: str

    @property
    def instruction(self) -> str:
        return f"{QUESTIONS[self.task]}\n{self.code}"

    def messages(self) -> list[dict[str, str]]:
        """The conversation (OpenAI messages) finetuning reads."""
        return [
            {"role": "user", "content": self.instruction},
            {"role": "assistant", "content": self.answer},
        ]

    def record(self) -> dict[str, Any]:
        """A JSON line: OpenAI ``messages`` plus the task fields (ignored by the reader)."""
        return {"messages": self.messages(), "task": self.task, "subject": self.subject,
                "module": self.module}  # fmt: skip


def parameter_names(args: ast.arguments) -> list[str]:
    """Every name of a parameter list in order: positional-only, positional, ``*args``,
    keyword-only, ``**kwargs``."""
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    if args.vararg is not None:
        names.append(args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg is not None:
        names.append(args.kwarg.arg)
    return names


def def_line(node: ast.FunctionDef) -> str:
    """``def name(params):`` — the signature as :func:`ast.unparse` writes it, on one line
    (return annotation dropped)."""
    return f"def {node.name}({ast.unparse(node.args)}):"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parsed_modules() -> Iterator[tuple[str, ast.Module]]:
    root = stdlib_dir()
    for path in python_files(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        yield _module_name(path, root), tree


def _imported(node: ast.AST) -> str | None:
    """The module an ``import a.b [as c]`` (one name) or ``from a.b import …`` (absolute)
    statement imports; None for anything else."""
    if isinstance(node, ast.Import) and len(node.names) == 1:
        return node.names[0].name
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return node.module
    return None


def generate_tasks(seed: int = 0, per_task: int = 1500, max_chars: int = 72) -> list[StdlibTask]:
    """The instruction set: up to ``per_task`` examples of each task (fewer where the stdlib
    has fewer distinct subjects), lines of at most ``max_chars`` characters, in a seeded
    order. Deterministic for a given interpreter, seed and settings."""
    defs: dict[str, list[tuple[str, ast.FunctionDef]]] = {}
    imports: dict[str, list[tuple[str, str]]] = {}
    for module, tree in _parsed_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                line = def_line(node)
                if len(line) <= max_chars and "\n" not in line and node.name.isidentifier():
                    defs.setdefault(node.name, []).append((module, node))
            else:
                target = _imported(node)
                if target is not None:
                    text = ast.unparse(node)
                    if len(text) <= max_chars and "\n" not in text:
                        imports.setdefault(target, []).append((module, text))
    rng = random.Random(seed)
    # each function name is the subject of one example: a seeded choice of its definitions,
    # then of the tasks it is eligible for, keeping the tasks balanced
    counts = dict.fromkeys(TASKS, 0)
    out: list[StdlibTask] = []
    names = sorted(defs)
    rng.shuffle(names)
    for name in names:
        module, node = rng.choice(defs[name])
        params = parameter_names(node.args)
        line = def_line(node)
        eligible = ["function_name", "parameter_count"]
        positional = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
        if positional and positional[0] not in _METHOD_FIRST:
            eligible.append("first_parameter")
        eligible = [t for t in eligible if counts[t] < per_task]
        if not eligible:
            continue
        least = min(counts[t] for t in eligible)
        task = rng.choice([t for t in eligible if counts[t] == least])
        answer = {
            "function_name": name,
            "first_parameter": params[0] if params else "",
            "parameter_count": str(len(params)),
        }[task]
        out.append(StdlibTask(task, line, answer, name, module))
        counts[task] += 1
    modules = sorted(imports)
    rng.shuffle(modules)
    for target in modules[:per_task]:
        module, text = rng.choice(sorted(set(imports[target])))
        out.append(StdlibTask("imported_module", text, target, target, module))
    rng.shuffle(out)
    return out


def split_tasks(
    tasks: list[StdlibTask], val_fraction: float
) -> tuple[list[StdlibTask], list[StdlibTask]]:
    """(train, held out) exactly as finetuning will split the examples (by content hash)."""
    train: list[StdlibTask] = []
    val: list[StdlibTask] = []
    for t in tasks:
        (val if example_is_val(t.messages(), val_fraction) else train).append(t)
    return train, val


def write_jsonl(tasks: list[StdlibTask], path: str | Path) -> Path:
    """One JSON line per example (OpenAI messages; ``task``/``subject``/``module`` extra)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t.record(), ensure_ascii=False) + "\n")
    return path
