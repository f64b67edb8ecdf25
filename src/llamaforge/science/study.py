"""The study of the paper's claims at small scale: its cells, its plan and its runner.

A *cell* is one pretraining run — an architecture (``blocks.Architecture``), a size, a
learning rate, a seed, a token budget, a corpus — trained by ``run_pretrain`` (the same
``Trainer``, data loader and AdamW recipe as every LLaMA run) into ``OUT/cells/KEY``,
where KEY is a hash of everything that defines the run. A finished cell leaves
``result.json`` there and is never run again; an interrupted one resumes from its last
checkpoint. Experiments that ask for the same run (the GPT-2 block's learning-rate sweep
is also the pre-norm side of the norm experiment) share its cell.

Three experiments (`plan`):

1. ``ladder``: GPT-2's block to LLaMA's one change at a time (``blocks.LADDER``), each
   rung's learning rate picked by a sweep (seed 0), then more seeds at the best one.
2. ``norm``: the GPT-2 block with pre- and post-norm over a wide range of learning rates.
3. ``scaling``: LLaMA blocks of three sizes on the same token stream, validation loss
   every few steps (Figure 1 in miniature; Chinchilla's method 1 in ``report``).

The corpora are prepared once into ``OUT/data``: ``stdlib`` (the quickstart's: the
Python standard library's code and docs) and ``shared`` (configs/data/shared.toml's seven
sources, the paper's mixture on ../shared's samples), each with its own 2048-piece
tokenizer so that the output layer does not dwarf a tiny model.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from llamaforge.files import atomic_write
from llamaforge.science.blocks import GPT2, LADDER, LLAMA, Architecture

VOCAB = 2048  # the corpora's tokenizers
MULTIPLE_OF = 2  # SwiGLU's 2/3·4d hidden size within 1 % of the GELU MLP's weights


@dataclass(frozen=True)
class Size:
    dim: int
    n_layers: int
    n_heads: int

    @property
    def label(self) -> str:
        return f"d{self.dim}·L{self.n_layers}"


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    corpus: str
    arch: Architecture
    size: Size
    lr: float
    seed: int
    tokens: int  # training tokens (steps = tokens // batch_tokens)
    batch_tokens: int
    seq_len: int
    evals: int = 1  # validation losses along the run (the last at its end)
    eval_batches: int = 16

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_tokens)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        a = self.arch
        return (
            f"{self.corpus} {a.norm}/{a.norm_position}/{a.mlp}/{a.positions}/"
            f"{'bias' if a.bias else 'nobias'}/{'tied' if a.tied else 'untied'} "
            f"{self.size.label} lr={self.lr:g} seed={self.seed} {self.tokens:,} tokens"
        )


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and budgets of the study; `FULL` is the published one, `SHORT` checks the
    machinery in seconds (the test suite's)."""

    seq_len: int = 128
    batch_tokens: int = 4096
    ladder_size: Size = Size(64, 4, 4)
    ladder_tokens: int = 2_000_000
    ladder_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    seeds: int = 3
    norm_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    scaling_sizes: tuple[Size, ...] = (Size(32, 2, 2), Size(64, 4, 4), Size(128, 4, 4))
    scaling_tokens: int = 8_000_000
    scaling_lr: float = 3e-3
    scaling_evals: int = 24
    eval_batches: int = 16
    corpora: tuple[str, ...] = ("stdlib", "shared")

    def cell(self, corpus: str, arch: Architecture, size: Size, lr: float, seed: int) -> Cell:
        return Cell(
            corpus=corpus,
            arch=arch,
            size=size,
            lr=lr,
            seed=seed,
            tokens=self.ladder_tokens,
            batch_tokens=self.batch_tokens,
            seq_len=self.seq_len,
            eval_batches=self.eval_batches,
        )

    def scaling_cell(self, size: Size) -> Cell:
        """LLaMA's block at ``size`` on the first corpus, validated along the run."""
        return Cell(
            corpus=self.corpora[0],
            arch=LLAMA,
            size=size,
            lr=self.scaling_lr,
            seed=0,
            tokens=self.scaling_tokens,
            batch_tokens=self.batch_tokens,
            seq_len=self.seq_len,
            evals=self.scaling_evals,
            eval_batches=self.eval_batches,
        )


FULL = StudyConfig()
SHORT = StudyConfig(
    seq_len=32,
    batch_tokens=256,
    ladder_size=Size(16, 1, 2),
    ladder_tokens=256 * 6,
    ladder_lrs=(3e-3, 1e-2),
    seeds=2,
    norm_lrs=(1e-2, 1.0),
    scaling_sizes=(Size(8, 1, 2), Size(16, 1, 2)),
    scaling_tokens=256 * 8,
    scaling_evals=2,
    eval_batches=2,
    corpora=("stdlib",),
)
EXPERIMENTS = ("ladder", "norm", "scaling")


# -- the plan -------------------------------------------------------------------------------


def sweep_cells(sc: StudyConfig, experiments: Iterable[str]) -> list[tuple[str, str, Cell]]:
    """The cells that need no other cell's result, as (experiment, label, cell)."""
    out: list[tuple[str, str, Cell]] = []
    if "ladder" in experiments:
        for corpus in sc.corpora:
            for name, arch in LADDER:
                for lr in sc.ladder_lrs:
                    out.append(("ladder", name, sc.cell(corpus, arch, sc.ladder_size, lr, 0)))
    if "norm" in experiments:
        for position in ("pre", "post"):
            arch = replace(GPT2, norm_position=position)
            for lr in sc.norm_lrs:
                out.append(("norm", position, sc.cell(sc.corpora[0], arch, sc.ladder_size, lr, 0)))
    if "scaling" in experiments:
        out += [("scaling", size.label, sc.scaling_cell(size)) for size in sc.scaling_sizes]
    return out


def seed_cells(
    sc: StudyConfig, results: dict[str, dict[str, Any]], experiments: Iterable[str]
) -> list[tuple[str, str, Cell]]:
    """The ladder's extra seeds, at each rung's best learning rate among the finished sweep
    cells (``results`` by cell key); a rung whose sweep is unfinished gets none yet."""
    if "ladder" not in experiments:
        return []
    out = []
    for corpus in sc.corpora:
        for name, arch in LADDER:
            sweep = [sc.cell(corpus, arch, sc.ladder_size, lr, 0) for lr in sc.ladder_lrs]
            if any(c.key() not in results for c in sweep):
                continue
            best = best_lr(sweep, results)
            if best is None:
                continue
            for seed in range(1, sc.seeds):
                out.append(("ladder", name, sc.cell(corpus, arch, sc.ladder_size, best, seed)))
    return out


def best_lr(sweep: list[Cell], results: dict[str, dict[str, Any]]) -> float | None:
    """The learning rate of the sweep cell with the lowest final validation loss (None when
    every one diverged)."""
    scored = [(results[c.key()]["val_loss"], c.lr) for c in sweep if finite(results[c.key()])]
    return min(scored)[1] if scored else None


def finite(result: dict[str, Any]) -> bool:
    v = result.get("val_loss")
    return not result.get("diverged") and v is not None and math.isfinite(v)


# -- data ------------------------------------------------------------------------------------


def shared_root() -> Path:
    """../shared/data beside the repository, or $LLAMAFORGE_SHARED_DATA."""
    env = os.environ.get("LLAMAFORGE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def shared_data_config() -> Path:
    """configs/data/shared.toml of this checkout (the shared corpus is defined there)."""
    return Path(__file__).resolve().parents[3] / "configs" / "data" / "shared.toml"


def prepare_corpus(name: str, out: Path, log: Callable[[str], None] = print) -> Path:
    """``OUT/data/NAME`` prepared (skipped when its mixture.json is there); returns it."""
    from llamaforge.data.prepare import prepare

    target = out / "data" / name
    if (target / "mixture.json").exists():
        return target
    tokenizer = str(target / "tokenizer.model")
    if name == "stdlib":
        from llamaforge.demos.quickstart import data_config, quickstart_config

        qs = quickstart_config([f"data.dir={target}", f"data.tokenizer={tokenizer}"])
        dcfg = data_config(qs)
    elif name == "shared":
        dcfg = _shared_config(target, tokenizer)
    else:
        raise ValueError(f"corpus {name!r}: expected stdlib or shared")
    dcfg.tokenizer_vocab_size = VOCAB
    log(f"preparing the {name} corpus in {target}")
    prepare(dcfg, progress=False, log=lambda _: None)
    if name == "shared":
        _weigh_by_size(target)
    return target


def _weigh_by_size(target: Path) -> None:
    """Sample the shared sources in proportion to their training tokens (one pass over
    each) instead of Table 1's weights: at 67 % the 73k-token web sample would be seen
    nine times in a 1M-token run while the 2.6M tokens of books were barely touched."""
    from llamaforge.data.shards import MIXTURE_FILE

    mixture = json.loads((target / MIXTURE_FILE).read_text())
    for entry in mixture["sources"]:
        meta = json.loads((target / entry["name"] / "meta.json").read_text())
        entry["weight"] = meta["splits"]["train"]["tokens"]
    atomic_write(target / MIXTURE_FILE, json.dumps(mixture, indent=2) + "\n")


def _shared_config(target: Path, tokenizer: str) -> Any:
    """configs/data/shared.toml with its ../shared/data paths under `shared_root`."""
    from llamaforge.config import ConfigError
    from llamaforge.data.config import load_data_config

    path, root = shared_data_config(), shared_root()
    if not path.exists():
        raise ConfigError(f"the shared corpus is defined in {path}, which this install lacks")
    if not (root / "pretrain").is_dir():
        raise ConfigError(
            f"{root / 'pretrain'}: the shared pretraining samples are not there (set "
            "LLAMAFORGE_SHARED_DATA to ../shared/data, or leave the shared corpus out)"
        )
    cfg = load_data_config(path, [f"tokenizer={tokenizer}", f"output={target}"])
    for source in cfg.sources:
        source.paths = [_reroot(p, root) for p in source.paths]
        refs = source.options.get("reference_paths")
        if refs:
            source.options["reference_paths"] = [_reroot(p, root) for p in refs]
    return cfg


def _reroot(p: str, root: Path) -> str:
    prefix = "../shared/data/"
    return str(root / p[len(prefix) :]) if p.startswith(prefix) else p


def unigram_baseline(sc: StudyConfig, data_dir: Path) -> float:
    """The loss on the study's validation batches of a model that knows only the training
    tokens' frequencies: a run that ends no better has learned nothing (it *failed*)."""
    import numpy as np

    from llamaforge.data.mixture import open_sources, validation_batches
    from llamaforge.demos.quickstart import unigram_cross_entropy

    sources, _ = open_sources(data_dir, "train")
    train = np.concatenate([a for s in sources for a in s.arrays])
    batch = sc.batch_tokens // sc.seq_len
    val = validation_batches(data_dir, sc.seq_len, batch, sc.eval_batches)
    targets = np.concatenate([y.numpy().ravel() for _, y in val])
    return unigram_cross_entropy(train, targets, VOCAB)


# -- one cell ----------------------------------------------------------------------------------


class CellInterrupted(RuntimeError):
    """A cell stopped before its last step (SIGTERM, SIGINT): it keeps its checkpoint and
    writes no result, so the next ``run_study`` resumes it."""


def run_cell(cell: Cell, out: Path, data_dir: Path) -> dict[str, Any]:
    """Train ``cell`` into OUT/cells/KEY (resuming a checkpoint there) and write its
    ``result.json``: the final validation loss, the validation curve (step, tokens, FLOPs,
    loss), parameter and FLOP counts, wall time, and whether it diverged."""
    from llamaforge.config import load_config
    from llamaforge.science.blocks import VariantTransformer
    from llamaforge.training.pretrain import PretrainConfig, run_pretrain
    from llamaforge.training.trainer import TrainingError

    run_dir = out / "cells" / cell.key()
    run_dir.mkdir(parents=True, exist_ok=True)
    steps, size = cell.steps, cell.size
    overrides = {
        "model.preset": "1M",  # its fields all replaced below
        "model.dim": size.dim,
        "model.n_layers": size.n_layers,
        "model.n_heads": size.n_heads,
        "model.vocab_size": VOCAB,
        "model.multiple_of": MULTIPLE_OF,
        "model.max_seq_len": cell.seq_len,
        "data.dir": str(data_dir),
        "data.tokenizer": str(data_dir / "tokenizer.model"),
        "data.seq_len": cell.seq_len,
        "data.seed": cell.seed,
        "seed": cell.seed,
        "batch_tokens": cell.batch_tokens,
        "micro_batch": cell.batch_tokens // cell.seq_len,
        "steps": steps,
        "optim.lr": cell.lr,
        "optim.warmup_steps": max(1, steps // 10),
        "eval_every": max(1, steps // cell.evals) if cell.evals > 1 else 0,
        "eval_batches": cell.eval_batches,
        "checkpoint.every": max(1, steps // 4),
        "checkpoint.keep": 1,
        "out": str(run_dir),
        "resume": "auto",
        "log_every": max(1, min(10, steps // 10)),
        "save_model": "false",
        "plot": "false",
        "progress": "false",
        "tensorboard": "false",
    }
    cfg = load_config(PretrainConfig, None, [f"{k}={v}" for k, v in overrides.items()])
    start = time.perf_counter()
    diverged, summary = False, {}
    try:
        summary = run_pretrain(cfg, model_fn=lambda args: VariantTransformer(args, cell.arch))
    except TrainingError:  # the loss stayed non-finite: the trainer stopped the run
        diverged = True
    if not diverged and summary.get("step", 0) < steps:  # stopped by a signal: resume later
        raise CellInterrupted(f"{cell.describe()}: stopped at step {summary.get('step')}")
    curve = _val_curve(run_dir / "metrics.jsonl")
    val = summary.get("val_loss")
    if val is None and curve and curve[-1]["step"] == summary.get("step"):
        val = curve[-1]["val_loss"]  # a finished run resumed (its result lost): its last loss
    if val is not None and (not curve or curve[-1]["step"] != summary["step"]):
        curve.append({"step": summary["step"], "tokens": summary["tokens"], "val_loss": val})
    # diverged: stopped on non-finite losses, or ended no better than a uniform guess
    failed = val is None or not math.isfinite(val) or val >= math.log(VOCAB)
    result = {
        "cell": asdict(cell),
        "key": cell.key(),
        "val_loss": val,
        "diverged": diverged or failed,
        "curve": curve,
        "params": summary.get("params"),
        "flops_per_token": summary.get("flops_per_token"),
        "wall_s": time.perf_counter() - start,
    }
    atomic_write(run_dir / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def _val_curve(metrics: Path) -> list[dict[str, float]]:
    """(step, tokens, val_loss) of every metrics row that has a validation loss."""
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [
        {"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]}
        for r in rows
        if r.get("val_loss") is not None
    ]


# -- the runner ----------------------------------------------------------------------------------


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell's result.json under OUT/cells, by key."""
    results = {}
    for path in sorted((out / "cells").glob("*/result.json")):
        r = json.loads(path.read_text())
        results[r["key"]] = r
    return results


@dataclass
class Progress:
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def _worker_init(threads: int, worker: bool = True) -> None:
    """``threads`` torch threads; a pool worker also ends with the study's process (a
    killed study leaves no orphan writing into its cells)."""
    import torch

    from llamaforge.parallel.process import die_with_parent

    torch.set_num_threads(threads)
    if worker:
        die_with_parent(signal.SIGKILL)


def run_study(
    sc: StudyConfig,
    out: Path,
    experiments: Iterable[str] = EXPERIMENTS,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> Progress:
    """Prepare the corpora and run every unfinished cell of ``experiments``, ``jobs`` at a
    time (separate processes of cpu_count // jobs threads each), the sweeps first and
    then the ladder's extra seeds; cells finished earlier are skipped."""
    experiments = [e for e in experiments]
    unknown = sorted(set(experiments) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"experiments {unknown}: expected some of {', '.join(EXPERIMENTS)}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "study.json", json.dumps(asdict(sc), indent=1) + "\n")
    data = {name: prepare_corpus(name, out, log) for name in sc.corpora}
    progress = Progress()
    phases: list[Callable[[], list[tuple[str, str, Cell]]]] = [
        lambda: sweep_cells(sc, experiments),
        lambda: seed_cells(sc, load_results(out), experiments),
    ]
    start = time.perf_counter()
    for phase in phases:
        _run_cells(phase(), out, data, jobs, progress, log)
    line = (
        f"{time.strftime('%Y-%m-%d %H:%M')}: {progress.done} cells run, {progress.skipped} "
        f"already done, {len(progress.failed)} failed, in {time.perf_counter() - start:.0f} s "
        f"with {jobs} at a time"
    )
    with open(out / "study.log", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return progress


def _run_cells(
    planned: list[tuple[str, str, Cell]],
    out: Path,
    data: dict[str, Path],
    jobs: int,
    progress: Progress,
    log: Callable[[str], None],
) -> None:
    finished = load_results(out)
    distinct = {cell.key(): cell for _, _, cell in planned}  # experiments share cells
    cells = {k: c for k, c in distinct.items() if k not in finished}
    progress.skipped += len(distinct) - len(cells)
    # the longest first, so that the last ones to finish are short
    order = sorted(cells.values(), key=lambda c: -c.tokens * c.size.dim**2 * c.size.n_layers)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    if jobs <= 1:
        _worker_init(threads, worker=False)
        for cell in order:
            _record(cell, lambda c=cell: run_cell(c, out, data[c.corpus]), progress, log)
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(run_cell, c, out, data[c.corpus]): c for c in order}
        for fut in cf.as_completed(futures):
            _record(futures[fut], fut.result, progress, log)


def _record(
    cell: Cell,
    result: Callable[[], dict[str, Any]],
    progress: Progress,
    log: Callable[[str], None],
) -> None:
    try:
        r = result()
    except Exception as e:  # one broken cell does not stop the study; it is reported
        progress.failed.append(f"{cell.describe()}: {type(e).__name__}: {e}")
        log(f"FAILED {cell.describe()}: {type(e).__name__}: {e}")
        return
    progress.done += 1
    loss = "diverged" if r["diverged"] else f"val {r['val_loss']:.4f}"
    log(f"done {cell.describe()}: {loss} in {r['wall_s']:.0f} s")
