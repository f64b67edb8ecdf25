"""The data config of ``llamaforge data prepare``: its ``[[sources]]``, tokenizer, splits,
shards and ``[executor]``, their checks, a source's files and its fingerprint.

Shared by the in-process path (prepare.py) and the datatrove one (pipeline.py), and
imports neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from llamaforge.config import ConfigError, load_config
from llamaforge.data.base import DECODE_ERRORS, expand_paths
from llamaforge.data.sources import KINDS


@dataclass
class SourceConfig:
    name: str = ""
    kind: str = ""
    paths: list[str] = field(default_factory=list)
    weight: float = 1.0  # sampling proportion (normalised over the sources)
    options: dict[str, Any] = field(default_factory=dict)
    # invalid UTF-8 in a text file: "strict" skips the file (reported), "replace" keeps it
    # with U+FFFD for each bad sequence (the bytes counted: clean stats' replaced_bytes)
    errors: str = "strict"


@dataclass
class ExecutorConfig:
    """``[executor]`` of a data config: where and in how many tasks sources are prepared."""

    type: Literal["local", "slurm", "ray"] = "local"
    # 0: the in-process path (prepare.py, no datatrove); N >= 1: N datatrove tasks a source
    tasks: int = 0
    workers: int = 1  # tasks run at once (local: processes; slurm: array limit; ray)
    logging_dir: str = ""  # datatrove logs and completion marks (default: OUTPUT/_datatrove)
    # slurm
    partition: str = ""
    time: str = "24:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0
    env_command: str = ""  # e.g. "source /path/to/venv/bin/activate"
    sbatch_args: dict[str, Any] = field(default_factory=dict)
    submit: bool = True  # slurm: false writes the job scripts without calling sbatch
    # ray
    address: str = ""  # an existing cluster ("auto", "ray://host:10001"); "" starts one here
    # web JSON-lines and line-split text files above this size are read as byte ranges
    # (whole lines) by several tasks; 0: one task a file
    split_bytes: int = 64 << 20


@dataclass
class DataConfig:
    tokenizer: str = ""  # SentencePiece model (relative paths: to the working directory)
    # when the tokenizer file does not exist: train one of this size on the cleaned sources
    tokenizer_vocab_size: int = 0
    output: str = "data/prepared"
    sources: list[SourceConfig] = field(default_factory=list)
    bos: bool = True
    eos: bool = True
    val_fraction: float = 0.005  # share of documents held out for validation
    shard_tokens: int = 100_000_000  # tokens per shard file
    workers: int = 0  # processes (0: one per source, at most the CPU count)
    # [executor]: tasks = 0 is the in-process path above; tasks >= 1 runs every source as
    # datatrove stages of that many tasks on a local, slurm or ray executor (data/pipeline.py)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


def load_data_config(path: str | os.PathLike, overrides: list[str] | None = None) -> DataConfig:
    cfg = load_config(DataConfig, path, overrides)
    check_config(cfg)
    return cfg


def check_config(cfg: DataConfig) -> None:
    if not cfg.sources:
        raise ConfigError("data config: no [[sources]]")
    names = set()
    for i, s in enumerate(cfg.sources):
        where = f"sources[{i}] ({s.name or 'unnamed'})"
        if not s.name or not s.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{where}: name must be a non-empty [A-Za-z0-9_-] string")
        if s.name in names:
            raise ConfigError(f"{where}: duplicate source name {s.name!r}")
        names.add(s.name)
        if s.kind not in KINDS:
            raise ConfigError(f"{where}: unknown kind {s.kind!r}; expected one of {sorted(KINDS)}")
        if s.weight < 0:
            raise ConfigError(f"{where}: weight must be >= 0, got {s.weight}")
        if s.errors not in DECODE_ERRORS:
            raise ConfigError(
                f"{where}: errors={s.errors!r}; expected one of {', '.join(DECODE_ERRORS)}"
            )
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    check_executor(cfg.executor)


def check_executor(ex: ExecutorConfig) -> None:
    if ex.tasks < 0:
        raise ConfigError(f"executor.tasks must be >= 0, got {ex.tasks}")
    if ex.split_bytes < 0:
        raise ConfigError(f"executor.split_bytes must be >= 0, got {ex.split_bytes}")
    if ex.workers < 1:
        raise ConfigError(f"executor.workers must be >= 1, got {ex.workers}")
    if ex.type != "local" and ex.tasks == 0:
        raise ConfigError(f"executor.type = {ex.type!r} needs executor.tasks >= 1")
    if ex.type == "slurm" and not ex.partition:
        raise ConfigError("executor.type = 'slurm' needs executor.partition")


def source_paths(cfg: DataConfig, src: SourceConfig) -> list[Path]:
    """The files of a source. ``@stdlib`` is the running Python's standard library sources
    (without site-packages, tests and demos); for kind ``stdlib_docs`` (whose paths default
    to it) the pydoc topics module first, and only ``.py`` files of folders and globs."""
    from llamaforge.data.stdlib import docs_files, python_files, stdlib_dir

    docs = src.kind == "stdlib_docs"
    files: list[Path] = []
    patterns = [p for p in src.paths if p != "@stdlib"]
    if "@stdlib" in src.paths or (docs and not src.paths):
        files += docs_files() if docs else list(python_files(stdlib_dir()))
    if patterns:
        files += expand_paths(patterns, suffixes={".py"} if docs else None)
    return list(dict.fromkeys(files))


def _source_key(src: SourceConfig) -> dict[str, Any]:
    """The source's settings (``errors`` only where not the default, so older folders'
    fingerprints still match)."""
    key = asdict(src)
    if key["errors"] == "strict":
        del key["errors"]
    return key


def source_fingerprint(cfg: DataConfig, src: SourceConfig, tok_sha: str) -> str:
    """A hash of everything a source's prepared output depends on (its settings, the
    splits, the shard size and the tokenizer's sha256): meta.json's ``fingerprint``."""
    key = {
        "source": _source_key(src),
        "bos": cfg.bos,
        "eos": cfg.eos,
        "val": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "tokenizer": tok_sha,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
