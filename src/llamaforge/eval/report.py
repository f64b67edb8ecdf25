"""A markdown report of `evaluate` results, laid out like the paper's tables.

Tasks are grouped by ``TaskInfo.table`` (kept in each task's result as "table"). Each table
has a layout: one column per benchmark (Table 3, 6), benchmark × shots (Tables 4–5), or one
row per benchmark with its metrics as columns (the others). Values are percentages ± the
standard error; toxicity and TruthfulQA scores stay fractions, as in the paper. Tasks that
were not run are left out; tables with no task are not printed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# TaskInfo.table -> (title, layout)
TABLES: dict[str, tuple[str, str]] = {
    "3": ("Table 3: common sense reasoning (zero-shot)", "columns"),
    "4": ("Table 4: NaturalQuestions (exact match)", "shots"),
    "5": ("Table 5: TriviaQA (exact match, filtered dev)", "shots"),
    "6": ("Table 6: reading comprehension (RACE, zero-shot)", "columns"),
    "7": ("Table 7: quantitative reasoning", "metrics"),
    "8": ("Table 8: code generation (pass@k)", "metrics"),
    "9": ("Table 9: MMLU (5-shot)", "mmlu"),
    "11": ("Table 11: RealToxicityPrompts (mean toxicity)", "metrics"),
    "12": ("Table 12: CrowS-Pairs", "metrics"),
    "13": ("Table 13: WinoGender", "metrics"),
    "14": ("Table 14: TruthfulQA", "metrics"),
}
FRACTION_TABLES = {"11", "14"}  # the paper prints these as fractions, not percentages

HEADERS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "siqa": "SIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_e": "ARC-e",
    "arc_challenge": "ARC-c",
    "arc_c": "ARC-c",
    "openbookqa": "OBQA",
    "obqa": "OBQA",
    "naturalquestions": "NaturalQuestions",
    "nq": "NaturalQuestions",
    "nq_open": "NaturalQuestions",
    "triviaqa": "TriviaQA",
    "race": "RACE",
    "race_middle": "RACE-middle",
    "race_high": "RACE-high",
    "gsm8k": "GSM8k",
    "math": "MATH",
    "humaneval": "HumanEval",
    "mbpp": "MBPP",
    "mmlu": "MMLU",
    "realtoxicityprompts": "RealToxicityPrompts",
    "crows_pairs": "CrowS-Pairs",
    "winogender": "WinoGender",
    "truthfulqa": "TruthfulQA",
    "truthfulqa_mc": "TruthfulQA (MC)",
    "lambada": "LAMBADA",
}
ORDER = list(dict.fromkeys(HEADERS.values()))
PAPER_SHOTS = (0, 1, 5, 64)
MMLU_GROUPS = (  # metric acc_<key> of the MMLU task, else the first metric naming the key
    ("humanities", "Humanities"),
    ("stem", "STEM"),
    ("social_sciences", "Social Sciences"),
    ("other", "Other"),
)


def header(name: str) -> str:
    return HEADERS.get(name.lower(), name)


def fmt(metric: Mapping[str, Any] | None, fraction: bool = False) -> str:
    """ "62.3 ± 1.1" (percent) or "0.106 ± 0.004" (fraction); "–" when missing."""
    if not metric or metric.get("value") is None:
        return "–"
    v = float(metric["value"])
    if math.isnan(v):
        return "–"
    se = metric.get("stderr")
    scale, digits = (1.0, 3) if fraction else (100.0, 1)
    text = f"{v * scale:.{digits}f}"
    if se is not None and not math.isnan(float(se)):
        text += f" ± {float(se) * scale:.{digits}f}"
    return text


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)]


def _entries(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[tuple[str, dict]]:
    """(task name, task result) from one or several `evaluate` outputs, in order."""
    runs = [results] if isinstance(results, Mapping) else list(results)
    return [(name, entry) for run in runs for name, entry in run.get("tasks", {}).items()]


def _ordered(names: Sequence[str]) -> list[str]:
    rank = {h: i for i, h in enumerate(ORDER)}
    return sorted(dict.fromkeys(names), key=lambda n: (rank.get(header(n), len(ORDER)), n))


def _columns_layout(entries: list[tuple[str, dict]], fraction: bool) -> list[str]:
    latest = dict(entries)
    names = _ordered(list(latest))
    head = ["", *(header(n) for n in names)]
    metric_row = ["metric", *(latest[n]["main_metric"] for n in names)]
    value_row = [
        "value",
        *(fmt(latest[n]["metrics"].get(latest[n]["main_metric"]), fraction) for n in names),
    ]
    return _table(head, [value_row, metric_row])


def _shots_layout(entries: list[tuple[str, dict]], fraction: bool) -> list[str]:
    by_task: dict[str, dict[int, dict]] = {}
    for name, e in entries:
        by_task.setdefault(name, {})[int(e["shots"])] = e
    shots = sorted({s for d in by_task.values() for s in d} | set(PAPER_SHOTS))
    shots = [s for s in shots if any(s in d for d in by_task.values())]
    head = ["", *(f"{s}-shot" for s in shots)]
    rows = []
    for name in _ordered(list(by_task)):
        d = by_task[name]
        cells = [header(name)]
        for s in shots:
            e = d.get(s)
            cells.append(fmt(e["metrics"].get(e["main_metric"]), fraction) if e else "–")
        rows.append(cells)
    return _table(head, rows)


def _metrics_layout(entries: list[tuple[str, dict]], fraction: bool) -> list[str]:
    latest = dict(entries)
    names = _ordered(list(latest))
    metrics: list[str] = []
    for n in names:
        main = latest[n]["main_metric"]
        metrics += [main] + sorted(m for m in latest[n]["metrics"] if m != main)
    metrics = list(dict.fromkeys(metrics))
    head = ["", "shots", *metrics]
    rows = []
    for n in names:
        e = latest[n]
        rows.append(
            [header(n), str(e["shots"]), *(fmt(e["metrics"].get(m), fraction) for m in metrics)]
        )
    return _table(head, rows)


def _mmlu_layout(entries: list[tuple[str, dict]], fraction: bool) -> list[str]:
    latest = dict(entries)
    head = ["", "shots", *(h for _, h in MMLU_GROUPS), "Average"]
    rows = []
    for n in _ordered(list(latest)):
        e = latest[n]
        ms = e["metrics"]
        cells = [header(n), str(e["shots"])]
        for key, _ in MMLU_GROUPS:
            found = f"acc_{key}" if f"acc_{key}" in ms else None
            found = found or next((m for m in sorted(ms) if key in m.lower()), None)
            cells.append(fmt(ms.get(found) if found else None, fraction))
        cells.append(fmt(ms.get(e["main_metric"]), fraction))
        rows.append(cells)
    return _table(head, rows)


_LAYOUTS = {
    "columns": _columns_layout,
    "shots": _shots_layout,
    "metrics": _metrics_layout,
    "mmlu": _mmlu_layout,
}


def _table_rank(t: str) -> tuple[int, str]:
    return (int(t), "") if t.isdigit() else (10**6, t)


def render(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]], title: str | None = None
) -> str:
    """Markdown tables for one `evaluate` output or several (e.g. NQ at 0, 1, 5, 64 shots)."""
    entries = _entries(results)
    runs = [results] if isinstance(results, Mapping) else list(results)
    lines: list[str] = []
    if title:
        lines += [f"# {title}", ""]
    ckpts = {(r.get("checkpoint") or {}).get("path") or "(model)" for r in runs if r.get("tasks")}
    if ckpts:
        lines += [f"Checkpoint: {', '.join(sorted(map(str, ckpts)))}", ""]
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, e in entries:
        groups.setdefault(str(e.get("table", "")), []).append((name, e))
    notes: list[str] = []
    for table in sorted(groups, key=_table_rank):
        title_, layout = TABLES.get(
            table,
            (
                f"Table {table}" if table not in ("", "-") else "Not in the paper's tables",
                "metrics",
            ),
        )
        fraction = table in FRACTION_TABLES
        lines += [f"## {title_}", ""]
        lines += _LAYOUTS[layout](groups[table], fraction)
        lines.append("")
        for name, e in groups[table]:
            extra = []
            if e.get("limit") is not None:
                extra.append(f"first {e['n_docs']} docs (--limit {e['limit']})")
            if e.get("note"):
                extra.append(str(e["note"]))
            if extra:
                notes.append(f"- {header(name)}: {'; '.join(extra)}")
    if notes:
        lines += ["Notes:", *dict.fromkeys(notes), ""]
    if not entries:
        lines.append("(no results)")
    return "\n".join(lines).rstrip() + "\n"
