"""`evaluate`: tasks in, a JSON-ready results dict out, with a results cache.

For each task the runner loads the docs, draws each doc's few-shot examples (a
``random.Random`` seeded from (seed, task name, doc index), so a doc's prompt does not depend
on ``limit`` or on the other docs), builds every request of every doc, groups them by type,
deduplicates them and hands each type to the model in one call, then scores and aggregates.

Results are cached per (checkpoint sha256, task, task options, shots, limit, seed, sha256 of
the task's data files) as one JSON file under ``cache_dir`` (default
``$LLAMAFORGE_CACHE/eval``, else ``~/.cache/llamaforge/eval``), written atomically, so
rerunning an evaluation is instant and any change of model, data or setting misses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llamaforge.eval.base import (
    EvalError,
    Generate,
    LanguageModel,
    Loglikelihood,
    LoglikelihoodResult,
    Metric,
    Request,
    Result,
    Rolling,
    Task,
)
from llamaforge.files import atomic_write, sha256_file

CACHE_FORMAT = 1
_HASH_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    root = os.environ.get("LLAMAFORGE_CACHE")
    if root:
        return Path(root) / "eval"
    return Path.home() / ".cache" / "llamaforge" / "eval"


# ----------------------------------------------------------------------------- hashing

_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, memo_file: Path | None = None) -> str:
    """sha256 of a file's bytes, remembered by (path, size, mtime) in memory and, when
    ``memo_file`` is given, in that JSON file across processes."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    disk: dict[str, str] = {}
    skey = json.dumps(key)
    if memo_file is not None and memo_file.is_file():
        try:
            disk = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            disk = {}
        if isinstance(disk, dict) and isinstance(disk.get(skey), str):
            _memo[key] = disk[skey]
            return disk[skey]
    digest = sha256_file(path, _HASH_CHUNK)
    _memo[key] = digest
    if memo_file is not None:
        disk = disk if isinstance(disk, dict) else {}
        disk[skey] = digest
        try:
            atomic_write(memo_file, json.dumps(disk, indent=0))
        except OSError:
            pass
    return digest


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def checkpoint_sha256(ckpt_dir: str | os.PathLike, memo_file: Path | None = None) -> str:
    """sha256 over params.json, the weight files and tokenizer.model (names and hashes)."""
    ckpt = Path(ckpt_dir)
    names = ["params.json", "tokenizer.model", "model.safetensors.index.json"]
    names += sorted(p.name for p in ckpt.glob("*.safetensors"))
    h = hashlib.sha256()
    found = False
    for name in names:
        p = ckpt / name
        if p.is_file():
            found = True
            h.update(f"{name}\0{file_sha256(p, memo_file)}\n".encode())
    if not found:
        raise EvalError(f"{ckpt}: no checkpoint files to hash (params.json, *.safetensors)")
    return h.hexdigest()


def data_sha256(data_dir: Path, files: Sequence[str], memo_file: Path | None = None) -> str:
    """sha256 over the task's data files (relative name and content hash); missing files count
    as missing, so adding them later changes the hash."""
    h = hashlib.sha256()
    for rel in sorted(files):
        p = data_dir / rel
        if not p.exists():
            h.update(f"{rel}\0missing\n".encode())
            continue
        for f in _files_under(p):
            name = f.relative_to(data_dir).as_posix()
            h.update(f"{name}\0{file_sha256(f, memo_file)}\n".encode())
    return h.hexdigest()


def _jsonable(x: Any) -> Any:
    """Options and results as JSON (tuples → lists, NaN → None, unknown → str)."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, LoglikelihoodResult):
        return {"logprob": _jsonable(x.logprob), "is_greedy": x.is_greedy, "n": x.num_tokens}
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


# ----------------------------------------------------------------------------- running


def _run_requests(lm: LanguageModel, requests: Sequence[Request]) -> dict[Request, Result]:
    """Every distinct request answered, one model call per request type."""
    unique = list(dict.fromkeys(requests))
    out: dict[Request, Result] = {}
    ll = [r for r in unique if isinstance(r, Loglikelihood)]
    roll = [r for r in unique if isinstance(r, Rolling)]
    gen = [r for r in unique if isinstance(r, Generate)]
    other = [r for r in unique if not isinstance(r, (Loglikelihood, Rolling, Generate))]
    if other:
        raise EvalError(f"unknown request type {type(other[0]).__name__}")
    if ll:
        out.update(zip(ll, lm.loglikelihood(ll)))
    if roll:
        out.update(zip(roll, lm.loglikelihood_rolling(roll)))
    if gen:
        out.update(zip(gen, lm.generate(gen)))
    return out


def _metrics_json(metrics: Mapping[str, Metric]) -> dict[str, dict[str, Any]]:
    return {
        k: {"value": _jsonable(float(m.value)), "stderr": _jsonable(m.stderr), "n": m.n}
        for k, m in metrics.items()
    }


def run_task(
    lm: LanguageModel,
    task: Task,
    data_dir: Path,
    shots: int | None,
    limit: int | None,
    seed: int = 1234,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate one task (no cache): the per-task entry of ``evaluate``'s output."""
    t0 = time.perf_counter()
    name = task.info.name
    k = task.info.default_shots if shots is None else shots
    if k < 0:
        raise EvalError(f"{name}: shots must be >= 0, got {k}")
    docs = task.load(data_dir, limit)
    pool = task.fewshot_docs(data_dir) if k > 0 else []
    per_doc: list[list[Request]] = []
    for i, doc in enumerate(docs):
        rng = random.Random(f"{seed}/{name}/{i}")
        chosen = task.choose_shots(doc, pool, k, rng) if k > 0 else []
        per_doc.append(task.requests(doc, chosen))
    answers = _run_requests(lm, [r for reqs in per_doc for r in reqs])
    scores = []
    samples = []
    for i, (doc, reqs) in enumerate(zip(docs, per_doc)):
        results = [answers[r] for r in reqs]
        s = task.score(doc, results)
        scores.append(s)
        if log_samples:
            samples.append({"doc_index": i, "scores": s, "results": results})
    metrics = task.aggregate(docs, scores)
    main = task.info.main_metric
    entry: dict[str, Any] = {
        "metrics": _metrics_json(metrics),
        "main_metric": main,
        "table": task.info.table,
        "shots": k,
        "limit": limit,
        "n_docs": len(docs),
        "n_requests": sum(len(r) for r in per_doc),
        "n_unique_requests": len(answers),
        "options": _jsonable(task.options),
        "note": task.info.note,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if log_samples:
        entry["samples"] = _jsonable(samples)
    return entry


def _as_tasks(
    tasks: Sequence[Task | str] | str, task_options: Mapping[str, Mapping[str, Any]] | None
) -> list[Task]:
    """Task objects as given, names (or a comma-separated string) built by the registry
    with their ``task_options``; none, or one twice, is an error."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    names = [t for t in tasks if isinstance(t, str)]
    built: list[Task] = []
    if names or task_options:
        from llamaforge.eval.tasks import get_tasks  # the registry, only when names are given

        built = get_tasks(names, task_options)
    made = iter(built)
    out = [t if isinstance(t, Task) else next(made) for t in tasks]
    if not out:
        raise EvalError("no tasks to evaluate")
    evaluated = [t.info.name for t in out]
    if len(set(evaluated)) != len(evaluated):
        raise EvalError(f"task given twice: {evaluated}")
    return out


def cache_key(
    ckpt_hash: str,
    task: Task,
    shots: int,
    limit: int | None,
    seed: int,
    data_hash: str,
    lm_settings: Mapping[str, Any] | None = None,
) -> str:
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "checkpoint": ckpt_hash,
            "task": task.info.name,
            "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
            "options": _jsonable(task.options),
            "shots": shots,
            "limit": limit,
            "seed": seed,
            "data": data_hash,
            "lm": _jsonable(dict(lm_settings or {})),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def evaluate(
    lm: LanguageModel,
    tasks: Sequence[Task | str] | str,
    data_dir: str | os.PathLike,
    shots: int | None = None,
    limit: int | None = None,
    seed: int = 1234,
    cache_dir: str | os.PathLike | None = None,
    ckpt_hash: str | None = None,
    progress: bool = True,
    *,
    use_cache: bool = True,
    task_options: Mapping[str, Mapping[str, Any]] | None = None,
    log_samples: bool = False,
    on_task: Callable[[str, dict[str, Any]], None] | None = None,
    task_data: Mapping[str, tuple[Path, Sequence[str], Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Evaluate ``lm`` on ``tasks`` (Task objects or registry names); see the module doc.

    ``shots=None`` uses each task's paper setting. The cache is used when the checkpoint is
    known: ``ckpt_hash`` or, for a ``LlamaforgeLM`` loaded from a directory, its files' hash.
    Cache keys also hold the model's evaluation settings that can change results
    (``lm.describe()``: dtype, device, context length), not its batch size.

    ``task_data`` gives a task its own data: ``name -> (folder, files, source)``, e.g. a
    Hugging Face dataset written by `hub.fetch_task_data`; the files are hashed for the cache
    and ``source`` (dataset id, config, split, revision, fingerprint) is recorded as the
    task's ``data_source``. Other tasks read ``data_dir`` (``data_source``: local).
    """
    from llamaforge import __version__

    data = Path(data_dir)
    task_data = dict(task_data or {})
    if not data.is_dir() and not task_data:
        raise EvalError(f"{data}: no such data directory (pass --data-dir)")
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be at least 1, got {limit}")
    task_list = _as_tasks(tasks, task_options)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    memo_file = cache / "file_hashes.json" if use_cache else None
    ckpt_dir = getattr(lm, "ckpt_dir", None)
    if ckpt_hash is None and ckpt_dir is not None and use_cache:
        ckpt_hash = checkpoint_sha256(ckpt_dir, memo_file)
    settings = _lm_settings(lm)
    key_settings = _key_settings(settings)
    results = cache / "results" if use_cache and ckpt_hash else None
    out: dict[str, Any] = {
        "llamaforge_version": __version__,
        "checkpoint": {"path": str(ckpt_dir) if ckpt_dir else None, "sha256": ckpt_hash},
        "settings": {
            "shots": shots,
            "limit": limit,
            "seed": seed,
            "data_dir": str(data),
            "cache": str(cache) if results is not None else None,
            **settings,
        },
        "tasks": {},
    }
    if log_samples:
        out["samples"] = {}
    if hasattr(lm, "progress"):
        lm.progress = progress  # type: ignore[attr-defined]
    for task in task_list:
        name = task.info.name
        tdir, dhash, source = _task_data(task, data, task_data, memo_file)
        path = None
        if results is not None and ckpt_hash:
            k = task.info.default_shots if shots is None else shots
            key = cache_key(ckpt_hash, task, k, limit, seed, dhash, key_settings)
            path = results / f"{name}-{key[:32]}.json"
        entry, samples = _task_entry(lm, task, tdir, dhash, path, shots, limit, seed, log_samples)
        if samples is not None:
            out["samples"][name] = samples
        entry["data_source"] = source
        out["tasks"][name] = entry
        if on_task is not None:
            on_task(name, entry)
    return out


def _lm_settings(lm: LanguageModel) -> dict[str, Any]:
    """The model's evaluation settings (``lm.describe()``), recorded with the results."""
    describe = getattr(lm, "describe", None)
    return dict(describe()) if callable(describe) else {}


def _key_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that can change results (not the batch size), the device by its type."""
    key = {k: settings[k] for k in ("dtype", "device", "max_length") if k in settings}
    if isinstance(key.get("device"), str):
        key["device"] = key["device"].split(":")[0]
    return key


def _task_data(
    task: Task,
    data: Path,
    task_data: Mapping[str, tuple[Path, Sequence[str], Mapping[str, Any]]],
    memo_file: Path | None,
) -> tuple[Path, str, dict[str, Any]]:
    """The task's data folder, the hash of its data (its files; for a dataset not read
    locally, also the dataset's identity) and its ``data_source``."""
    tdir, tfiles, source = task_data.get(task.info.name, (data, task.info.files, {}))
    tdir = Path(tdir)
    if not tdir.is_dir():
        raise EvalError(f"{tdir}: no such data directory (pass --data-dir)")
    dhash = data_sha256(tdir, list(tfiles), memo_file)
    source = dict(source) or {"kind": "local", "data_dir": str(tdir)}
    if source.get("kind") != "local":  # the dataset's identity, not just its files
        ident = json.dumps({k: v for k, v in source.items() if k != "data_dir"}, sort_keys=True)
        dhash = hashlib.sha256(f"{dhash}\0{ident}".encode()).hexdigest()
    return tdir, dhash, source


def _task_entry(
    lm: LanguageModel,
    task: Task,
    data_dir: Path,
    data_hash: str,
    path: Path | None,
    shots: int | None,
    limit: int | None,
    seed: int,
    log_samples: bool,
) -> tuple[dict[str, Any], Any]:
    """The task's entry and its per-doc samples (None unless run with ``log_samples``): the
    one cached at ``path`` when there is one (never with ``log_samples``), else a fresh run,
    cached there."""
    entry = _cached(path) if path is not None and not log_samples else None
    if entry is not None:
        return entry, None
    entry = run_task(lm, task, data_dir, shots, limit, seed, log_samples)
    entry["data_sha256"] = data_hash
    entry["cached"] = False
    samples = entry.pop("samples", None)
    if path is not None:
        atomic_write(path, json.dumps(entry, indent=1, sort_keys=True) + "\n")
    return entry, samples


def _cached(path: Path) -> dict[str, Any] | None:
    """The cached entry at ``path`` (marked cached), or None when there is none to read."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry["cached"] = True
    return entry
