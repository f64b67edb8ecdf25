"""``llamaforge data prepare CONFIG.toml``: raw sources → cleaned text → token shards.

For each ``[[sources]]`` entry, in its own process:

1. **clean**: the kind's reader/cleaner yields documents, written to
   ``OUT/<name>/clean.jsonl`` (one ``{"text": …}`` a line) with the filter counts;
2. **tokenize**: documents are encoded (``bos``/``eos`` as configured) and a held-out
   fraction of them, chosen by a hash of the text, goes to the validation split; tokens are
   appended to ``train-NNNNN.bin`` / ``val-NNNNN.bin`` (uint16 when the vocabulary fits,
   else uint32), memory-mappable flat arrays (the format: data/shards.py);
3. ``OUT/<name>/meta.json`` is written last, and names the tokenizer (sha256), dtype,
   shards, token and document counts, bytes in and out and the filter counts.

Every file is written under a temporary name and renamed when complete, so an
interrupted run never leaves a file that looks finished. A re-run skips sources whose
``meta.json`` matches the current config and tokenizer, and re-uses a finished
``clean.jsonl``.

With ``[executor] tasks >= 1`` each source runs instead as datatrove stages of that many
tasks (local processes, Slurm or Ray; data/pipeline.py), with the same output.

A folder already prepared with another tokenizer (its ``mixture.json``, a source's
``meta.json`` or its ``tokenizer.model`` name other hashes) is refused unless ``force``;
with ``force`` its ``mixture.json`` is removed first, the sources are re-tokenized, a
``tokenizer.model`` in the folder is replaced by the tokenizer used, and ``mixture.json`` is
written last, so the folder's parts never name different tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from llamaforge.data.base import DataError, FilterStats, decoding
from llamaforge.data.config import DataConfig, SourceConfig, source_fingerprint, source_paths

# the config lived here: its names stay importable from here (the CLI, quickstart, tests)
from llamaforge.data.config import ExecutorConfig as ExecutorConfig
from llamaforge.data.config import check_config as check_config
from llamaforge.data.config import check_executor as check_executor
from llamaforge.data.config import load_data_config as load_data_config
from llamaforge.data.pipeline import prepare_source_pipeline
from llamaforge.data.shards import (
    FORMAT_VERSION,
    META_FILE,
    MIXTURE_FILE,
    SHARD_GLOB,
    SPLITS,
    ShardWriter,
    is_val,
    read_meta,
    token_dtype,
)
from llamaforge.data.sources import source_fn
from llamaforge.files import atomic_open, atomic_write
from llamaforge.tokenizer import Tokenizer

# and so do the old private names of what moved to shards.py, base.py and config.py
_ShardWriter = ShardWriter
_decoding = decoding
_fingerprint = source_fingerprint
_is_val = is_val

CLEAN_FILE = "clean.jsonl"


def resolve(cfg: DataConfig, path: str) -> Path:
    return Path(path).expanduser()


def _atomic_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def _clean(cfg: DataConfig, src: SourceConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Stage 1: cleaned documents to clean.jsonl (skipped when it exists)."""
    stats_path = out / "clean_stats.json"
    if (out / CLEAN_FILE).is_file() and stats_path.is_file():
        done = json.loads(stats_path.read_text())
        if done.get("errors_mode", "strict") == src.errors:
            return done
    with decoding(src.errors):
        return _clean_now(cfg, src, out, progress, stats_path)


def _clean_now(
    cfg: DataConfig, src: SourceConfig, out: Path, progress: bool, stats_path: Path
) -> dict[str, Any]:
    stats = FilterStats()
    paths = source_paths(cfg, src)
    docs = source_fn(src.kind, f"source {src.name}")(paths, dict(src.options), stats)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"{src.name}: clean", unit="doc", position=None, leave=False)
    t0 = time.time()
    with atomic_open(out / CLEAN_FILE, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            if bar is not None:
                bar.update()
                mb = stats.bytes_in / 1e6 / max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"{mb:.1f} MB/s in", refresh=False)
    if bar is not None:
        bar.close()
    result = stats.to_dict()
    result["files"] = len(paths)
    if src.errors != "strict":
        result["errors_mode"] = src.errors
    _atomic_json(stats_path, result)
    return result


def prepare_source(
    cfg: DataConfig, src: SourceConfig, tokenizer_path: str, progress: bool = True
) -> dict[str, Any]:
    """Clean and tokenize one source into ``OUT/<name>/``; returns its meta."""
    tok = Tokenizer(tokenizer_path)
    out = resolve(cfg, cfg.output) / src.name
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = source_fingerprint(cfg, src, tok.sha256())
    meta = read_meta(out)
    if meta and meta.get("fingerprint") == fingerprint and meta.get("complete"):
        meta["skipped"] = True
        return meta
    (out / META_FILE).unlink(missing_ok=True)  # the old shards no longer describe the config
    t0 = time.time()
    clean = _clean(cfg, src, out, progress)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, cfg.shard_tokens) for s in SPLITS}
    docs = {"train": 0, "val": 0}
    batch: list[str] = []

    def flush() -> None:
        for text, ids in zip(batch, tok.encode_batch(batch, bos=cfg.bos, eos=cfg.eos)):
            split = "val" if is_val(text, cfg.val_fraction) else "train"
            writers[split].write(np.asarray(ids, dtype=np.int64))
            docs[split] += 1
        batch.clear()

    for old in out.glob(SHARD_GLOB):
        old.unlink()
    with open(out / CLEAN_FILE, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) >= 512:
                flush()
    flush()
    if not docs["train"] + docs["val"]:
        skipped = "; ".join(clean.get("errors", [])[:3])
        raise DataError(
            f"source {src.name}: no documents left of {clean.get('files', 0)} file(s)"
            + (f" (skipped: {skipped})" if skipped else "")
            + (
                '; errors = "replace" keeps files with invalid UTF-8'
                if src.errors == "strict" and "invalid UTF-8" in skipped
                else ""
            )
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "name": src.name,
        "kind": src.kind,
        "weight": src.weight,
        "fingerprint": fingerprint,
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": tok.sha256(),
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "bos": cfg.bos,
        "eos": cfg.eos,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "splits": {
            s: {"tokens": w.tokens, "documents": docs[s], "shards": w.finish()}
            for s, w in writers.items()
        },
        "clean": clean,
        "seconds": round(time.time() - t0, 2),
        "complete": True,
    }
    _atomic_json(out / META_FILE, meta)
    return meta


def _prepare_one(args: tuple) -> dict[str, Any]:
    cfg, src, tok, progress = args
    try:
        return prepare_source(cfg, src, tok, progress)
    except (DataError, ValueError, OSError) as e:
        return {"name": src.name, "error": str(e), "complete": False}


def _clean_one(args: tuple) -> tuple[str, str | None]:
    cfg, src, progress = args
    out = resolve(cfg, cfg.output) / src.name
    out.mkdir(parents=True, exist_ok=True)
    try:
        _clean(cfg, src, out, progress)
        return src.name, None
    except (DataError, ValueError, OSError) as e:
        return src.name, str(e)


def _run(fn, jobs: list, workers: int) -> list:
    if workers <= 1:
        return [fn(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs))


def _clean_documents(cfg: DataConfig, names: list[str]):
    for name in names:
        with open(resolve(cfg, cfg.output) / name / CLEAN_FILE, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def train_data_tokenizer(
    cfg: DataConfig, tok_path: Path, workers: int, progress: bool, log=print
) -> None:
    """Clean every source, then train the tokenizer on the cleaned text of all of them."""
    from llamaforge.tokenizer import train_tokenizer

    log(f"training a {cfg.tokenizer_vocab_size}-piece tokenizer on the cleaned sources")
    results = _run(_clean_one, [(cfg, s, progress) for s in cfg.sources], workers)
    failed = [f"{n}: {e}" for n, e in results if e]
    if failed:
        raise DataError("cannot train the tokenizer, sources failed to clean: " + "; ".join(failed))
    train_tokenizer(
        _clean_documents(cfg, [s.name for s in cfg.sources]),
        tok_path,
        vocab_size=cfg.tokenizer_vocab_size,
    )
    log(f"wrote {tok_path}")


FOLDER_TOKENIZER = "tokenizer.model"


def _folder_tokenizers(out: Path) -> dict[str, str]:
    """The tokenizer hashes the prepared folder ``out`` names: part -> sha256."""
    found: dict[str, str] = {}
    mixture = out / MIXTURE_FILE
    if mixture.is_file():
        try:
            sha = json.loads(mixture.read_text(encoding="utf-8")).get("tokenizer_sha256")
        except (ValueError, AttributeError):
            sha = None
        if isinstance(sha, str):
            found[str(mixture)] = sha
    for meta_path in sorted(out.glob(f"*/{META_FILE}")):
        try:
            sha = json.loads(meta_path.read_text(encoding="utf-8")).get("tokenizer_sha256")
        except (ValueError, AttributeError):
            continue
        if isinstance(sha, str):
            found[str(meta_path)] = sha
    model = out / FOLDER_TOKENIZER
    if model.is_file():
        found[str(model)] = hashlib.sha256(model.read_bytes()).hexdigest()
    return found


def _check_folder(
    out: Path, tok: Tokenizer, tok_file: Path, names: list[str], force: bool, log
) -> None:
    """Refuse (unless ``force``) a folder prepared with another tokenizer than ``tok``."""
    new = tok.sha256()
    other = {part: sha for part, sha in _folder_tokenizers(out).items() if sha != new}
    if not other:
        return
    olds = sorted(set(other.values()))
    if not force:
        raise DataError(
            f"{out}: prepared with another tokenizer (sha256 {', '.join(olds)}; "
            f"{next(iter(other))}) than {tok_file} (sha256 {new}); pass --force to "
            "re-tokenize it, or choose another output folder"
        )
    log(f"{out}: re-tokenizing with {tok_file} (sha256 {new[:12]}, was {olds[0][:12]}): --force")
    (out / MIXTURE_FILE).unlink(missing_ok=True)  # written last, once everything agrees
    for name in names:  # a source that fails now must not keep a meta.json of the old one
        if str(out / name / META_FILE) in other:
            (out / name / META_FILE).unlink()


def prepare(
    cfg: DataConfig, progress: bool = True, log=print, *, force: bool = False
) -> list[dict[str, Any]]:
    """Prepare every source (in parallel processes); a failing source is reported and
    does not stop the others. Writes ``OUT/mixture.json`` with the sources and weights.

    A folder prepared with another tokenizer is a DataError unless ``force`` (module
    docstring)."""
    out = resolve(cfg, cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or min(len(cfg.sources), os.cpu_count() or 1)
    tok_file = resolve(cfg, cfg.tokenizer)
    if not tok_file.is_file() and cfg.tokenizer_vocab_size > 0:
        train_data_tokenizer(cfg, tok_file, workers, progress, log)
    elif not tok_file.is_file():
        raise DataError(
            f"{tok_file}: tokenizer not found; give an existing SentencePiece model "
            "or set tokenizer_vocab_size to train one on the cleaned sources"
        )
    tok_path = str(tok_file)
    tok = Tokenizer(tok_path)  # fail early, naming the file
    _check_folder(out, tok, tok_file, [s.name for s in cfg.sources], force, log)
    jobs = [(cfg, s, tok_path, progress) for s in cfg.sources]
    results: dict[str, dict[str, Any]] = {}
    if cfg.executor.tasks >= 1:
        for s in cfg.sources:
            results[s.name] = prepare_source_pipeline(cfg, s, tok_path, log, progress)
            _report(results[s.name], log)
        if any(r.get("submitted") is not None for r in results.values()):
            return [results[s.name] for s in cfg.sources]  # slurm: mixture.json on a rerun
    elif workers <= 1:
        for job in jobs:
            results[job[1].name] = _prepare_one(job)
            _report(results[job[1].name], log)
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_prepare_one, job): job[1].name for job in jobs}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                _report(results[futures[fut]], log)
    ordered = [results[s.name] for s in cfg.sources]
    good = [m for m in ordered if m.get("complete")]
    folder_model = out / FOLDER_TOKENIZER
    if folder_model.is_file() and folder_model.resolve() != tok_file.resolve():
        if hashlib.sha256(folder_model.read_bytes()).hexdigest() != tok.sha256():
            tok.save(folder_model)  # only reached with force (_check_folder)
    _atomic_json(
        out / MIXTURE_FILE,
        {
            "sources": [{"name": m["name"], "weight": m["weight"]} for m in good],
            "tokenizer_sha256": good[0]["tokenizer_sha256"] if good else None,
        },
    )
    return ordered


def _report(meta: dict[str, Any], log) -> None:
    if "submitted" in meta:
        what = "submitted to Slurm" if meta["submitted"] else "Slurm job scripts written"
        log(f"  {meta['name']}: {what} ({meta['logs']}); run again once the jobs finished")
        return
    if not meta.get("complete"):
        log(f"  {meta['name']}: FAILED: {meta.get('error')}")
        return
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    clean = meta["clean"]
    removed = ", ".join(f"{k} {v}" for k, v in clean["removed"].items()) or "none"
    note = " (up to date, skipped)" if meta.get("skipped") else f" in {meta['seconds']} s"
    log(
        f"  {meta['name']}: {tr['documents']:,} train / {va['documents']:,} val documents, "
        f"{tr['tokens']:,} / {va['tokens']:,} tokens{note}; removed: {removed}"
    )
    if clean.get("peak_rss_mb"):
        log(f"    {meta.get('tasks', 1)} task(s), peak memory per worker {clean['peak_rss_mb']} MB")
    if clean.get("replaced_bytes"):
        log(f"    replaced {clean['replaced_bytes']:,} invalid UTF-8 byte(s) with U+FFFD")
    for err in clean.get("errors", [])[:5]:
        log(f"    skipped {err}")
