"""Shared machinery for the task loaders: options, file reading with clear errors, and the
generic multiple-choice task."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from llamaforge.config import ConfigError, from_dict, help_text, setting
from llamaforge.eval.base import (
    Doc,
    EvalError,
    LoglikelihoodResult,
    Request,
    Result,
    Task,
)
from llamaforge.eval.protocols import multiple_choice_requests, score_multiple_choice

LETTERS = "ABCDEFGHIJ"


@dataclass
class TaskOptions:
    """The options every task accepts (a task's `Options` class extends it)."""

    path: str | None = setting(
        None,
        "the evaluated file, absolute or relative to the data folder (default: the task's "
        "own file), e.g. a full public set in a standard format",
    )


@dataclass
class FewshotOptions(TaskOptions):
    fewshot_path: str | None = setting(
        None, "the file few-shot examples are drawn from (default: the task's own)"
    )


@dataclass
class LabelsOptions(TaskOptions):
    labels_path: str | None = setting(
        None,
        "labels of original-format rows, one per line (default: <name>-labels.lst beside "
        "the data file)",
    )


@dataclass(eq=False)
class BaseTask(Task):
    """A task with declared options.

    Subclasses set `info` (a `TaskInfo`) and `Options` (a dataclass extending `TaskOptions`,
    each field made with ``config.setting(default, doc)``) as class attributes. The given
    ``options`` are loaded into `Options` by ``config.from_dict`` (types coerced and checked;
    an unknown or mistyped option is an `EvalError` naming the task) and kept as `self.opt`.
    """

    Options: ClassVar[type[TaskOptions]] = TaskOptions
    opt: TaskOptions = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self.opt = from_dict(self.Options, dict(self.options), where=self.info.name)
        except ConfigError as e:
            raise EvalError(f"task {e}") from None
        self.check_options()

    def check_options(self) -> None:
        """Validate `self.opt` beyond its types (raise EvalError); default: nothing."""

    @classmethod
    def options_help(cls, common: bool = True) -> str:
        """The task's options with defaults and documentation (``--list-tasks``); without
        the ones every task has (`TaskOptions`) when ``common`` is false."""
        text = help_text(cls.Options, intro=f"{cls.info.name} options:")
        if common:
            return text
        skip = tuple(f"  {f.name} = " for f in dataclasses.fields(TaskOptions))
        return "\n".join(ln for ln in text.splitlines() if not ln.startswith(skip))

    # ---------------------------------------------------------------- files

    def data_path(self, data_dir: Path, option: str = "path", default: str | None = None) -> Path:
        """The file named by option `option`, else `default`, else info.files[0]."""
        rel = getattr(self.opt, option, None) or default or self.info.files[0]
        path = Path(rel)
        return path if path.is_absolute() else Path(data_dir) / path

    # ---------------------------------------------------------------- common helpers

    def take(self, docs: list[Doc], limit: int | None) -> list[Doc]:
        if limit is not None and limit < 0:
            raise EvalError(f"{self.info.name}: limit must be >= 0, got {limit}")
        return docs if limit is None else docs[:limit]


# ============================================================================ file reading


def _open_text(path: Path, fmt: str) -> str:
    if not path.is_file():
        raise EvalError(f"{path}: file not found (expected {fmt})")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise EvalError(f"{path}: cannot read ({e}); expected {fmt}") from e


def read_jsonl(path: Path, fmt: str) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped; .gz allowed)."""
    rows = []
    for i, line in enumerate(_open_text(path, fmt).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}: line {i} is not JSON ({e.msg}); expected {fmt}") from e
        if not isinstance(row, dict):
            raise EvalError(f"{path}: line {i} is not a JSON object; expected {fmt}")
        rows.append(row)
    return rows


def read_json(path: Path, fmt: str) -> Any:
    try:
        return json.loads(_open_text(path, fmt))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not JSON ({e.msg}); expected {fmt}") from e


def read_csv(path: Path, fmt: str, delimiter: str = ",", header: bool = True) -> list[Any]:
    """Rows as dicts (with a header) or lists (without)."""
    text = _open_text(path, fmt)
    try:
        if header:
            return list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
        return list(csv.reader(io.StringIO(text), delimiter=delimiter))
    except csv.Error as e:
        raise EvalError(f"{path}: bad CSV ({e}); expected {fmt}") from e


def read_records(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Records from .jsonl(.gz), .json (a list, or an object with a "data"/"Data" list),
    .csv or .tsv (with a header row)."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".jsonl"):
        return read_jsonl(path, fmt)
    if name.endswith(".json"):
        data = read_json(path, fmt)
        if isinstance(data, dict):
            for key in ("data", "Data", "examples", "rows"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise EvalError(f"{path}: expected a JSON list of objects ({fmt})")
        return data
    if name.endswith(".csv"):
        return read_csv(path, fmt)
    if name.endswith(".tsv"):
        return read_csv(path, fmt, delimiter="\t")
    # unknown suffix: try JSON lines
    return read_jsonl(path, fmt)


def field(row: dict[str, Any], key: str, path: Path, i: int, fmt: str) -> Any:
    """row[key], or an EvalError naming the file, the record and the expected format."""
    if key not in row or row[key] is None:
        raise EvalError(f"{path}: record {i} has no field {key!r}; expected {fmt}")
    return row[key]


def letter_index(label: Any, labels: Sequence[str] | None, path: Path, i: int) -> int:
    """The index of an answer key: "A".."J" or "1".."9" (1-based), or an int (0-based),
    or its position in `labels` when the choices come with labels."""
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, int):
        return label
    s = str(label).strip()
    if labels is not None and s in labels:
        return list(labels).index(s)
    if len(s) == 1 and s.upper() in LETTERS:
        return LETTERS.index(s.upper())
    if s.isdigit():
        return int(s) - 1
    raise EvalError(f"{path}: record {i}: cannot read answer key {label!r}")


def converted_mc(row: dict[str, Any], path: Path, i: int, fmt: str) -> tuple[str, list[str], int]:
    """query / choices / gold of the converted (MosaicML ICL) JSONL shape."""
    query = field(row, "query", path, i, fmt)
    choices = field(row, "choices", path, i, fmt)
    gold = int(field(row, "gold", path, i, fmt))
    if not isinstance(choices, list) or not choices or not 0 <= gold < len(choices):
        raise EvalError(f"{path}: record {i}: bad choices/gold; expected {fmt}")
    return str(query), [str(c) for c in choices], gold


# ============================================================================ multiple choice


class MultipleChoiceTask(BaseTask):
    """Docs are ``{"query": context, "choices": [continuation, ...], "gold": int, ...}`` with
    continuations carrying their leading space. Scored with `score_multiple_choice` (acc,
    acc_char, acc_token and, if `unconditional`, acc_uncond). Few-shot examples, if any, are
    the shot's query and its gold continuation, separated by a blank line."""

    unconditional: ClassVar[bool] = False
    fmt: ClassVar[str] = ""
    # original-format rows carry no label: it is in <name>-labels.lst (PIQA, SIQA)
    labels_file: ClassVar[bool] = False

    def load(self, data_dir: Path, limit: int | None) -> list[Doc]:
        path = self.data_path(data_dir)
        rows = read_records(path, self.fmt)
        if self.labels_file:
            rows = self.with_labels(data_dir, path, rows)
        docs = [self.parse(row, path, i) for i, row in enumerate(rows, 1)]
        if not docs:
            raise EvalError(f"{path}: no records; expected {self.fmt}")
        return self.take(docs, limit)

    def with_labels(
        self, data_dir: Path, path: Path, rows: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Original-format rows (no "label", not converted) get their labels, one per line,
        from ``<name>-labels.lst`` beside the data file or the file of option
        ``labels_path``."""
        if not rows or "query" in rows[0] or "label" in rows[0]:
            return rows
        lpath = (
            self.data_path(data_dir, "labels_path")
            if getattr(self.opt, "labels_path", None)
            else path.with_name(path.name.split(".")[0] + "-labels.lst")
        )
        if not lpath.is_file():
            raise EvalError(f"{lpath}: labels file not found; {self.fmt}")
        labels = [ln.strip() for ln in lpath.read_text().splitlines() if ln.strip()]
        if len(labels) != len(rows):
            raise EvalError(f"{lpath}: {len(labels)} labels for {len(rows)} items in {path}")
        return [{**r, "label": lab} for r, lab in zip(rows, labels)]

    def parse(self, row: dict[str, Any], path: Path, i: int) -> Doc:
        raise NotImplementedError

    def fewshot_prefix(self, shots: Sequence[Doc]) -> str:
        return "".join(s["query"] + s["choices"][s["gold"]] + "\n\n" for s in shots)

    def requests(self, doc: Doc, shots: Sequence[Doc]) -> list[Request]:
        context = self.fewshot_prefix(shots) + doc["query"]
        return list(multiple_choice_requests(context, doc["choices"], self.unconditional))

    def score(self, doc: Doc, results: Sequence[Result]) -> dict[str, float]:
        lls = [r for r in results if isinstance(r, LoglikelihoodResult)]
        if len(lls) != len(results):
            raise EvalError(f"{self.info.name}: expected loglikelihood results")
        return score_multiple_choice(lls, doc["choices"], doc["gold"], self.unconditional)
