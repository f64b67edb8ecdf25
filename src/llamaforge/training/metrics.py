"""Training metrics: one JSON line per step in RUN/metrics.jsonl (always), mirrored to
TensorBoard when it is installed and to Weights & Biases when a project is configured;
and the loss-curve plot (``llamaforge plot RUN_DIR``)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from llamaforge.files import atomic_path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SUMMARY_FILE = "summary.json"
# summary.json keys that are reference losses, drawn as horizontal lines by plot_run
BASELINES = {"unigram_loss": "unigram baseline"}

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends rows to ``metrics.jsonl``; ``tensorboard`` is ``auto`` (when the package is
    installed), ``true`` (an error if it is not) or ``false``; ``wandb_project`` non-empty
    logs to W&B (an error if wandb is not installed)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: str = "auto",
        wandb_project: str = "",
        wandb_run: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._tb: Any = None
        self._wandb: Any = None
        if tensorboard not in ("auto", "true", "false"):
            raise ValueError(f"tensorboard={tensorboard!r}: expected auto, true or false")
        if tensorboard != "false":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # torch's writer needs the tensorboard package
                if tensorboard == "true":
                    raise ValueError(
                        "tensorboard=true but the tensorboard package is not installed "
                        "(pip install tensorboard)"
                    ) from e
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError(
                    f"wandb_project={wandb_project!r} but wandb is not installed (pip install "
                    "wandb), or leave wandb_project empty"
                ) from e
            self._wandb = wandb.init(
                project=wandb_project, name=wandb_run or None, config=config, resume="allow"
            )
        _repair_torn_tail(self.path)
        self._file = self.path.open("a")  # last: a failed integration leaves nothing open

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = int(row["step"])
        scalars = {
            k: v
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _repair_torn_tail(path: Path) -> None:
    """Before appending to ``path``: a last line without its newline (a kill mid-write) is
    either a whole row (the newline is added) or a fragment (cut off, with a warning; the
    step it belonged to is replayed by the resumed run), so the next row starts a line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # the start of the last line: search backwards in blocks
        start, pos = 0, size
        while pos > 0:
            step = min(pos, 1 << 16)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                start = pos + nl + 1
                break
        f.seek(start)
        tail = f.read()
        if isinstance(_row(tail), dict):
            f.seek(size)
            f.write(b"\n")
        else:
            log.warning(
                "%s: cut a torn last line (%d bytes, a write interrupted mid-row)",
                path,
                len(tail),
            )
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def _row(line: str | bytes) -> Any:
    """The JSON object on ``line`` with a ``step``, or None."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and "step" in row else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl; a step logged twice (replayed after a resume)
    keeps its last row. A torn line (a crash mid-write) is skipped with a warning; where a
    row was appended onto a torn fragment (a resume by an older version) the row is kept."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a training run dir?)")
    by_step: dict[int, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = _row(line)
        if row is None:  # a fragment, perhaps with a whole row appended onto it
            row = next(
                (r for k in range(1, len(line)) if line[k] == "{" and (r := _row(line[k:]))),
                None,
            )
            log.warning(
                "%s:%d: skipped a torn line%s",
                path,
                i + 1,
                " (kept the row appended onto it)" if row is not None else "",
            )
            if row is None:
                continue
        try:
            by_step[int(row["step"])] = row
        except (TypeError, ValueError):
            log.warning("%s:%d: skipped a row whose step is not a number", path, i + 1)
    return [by_step[s] for s in sorted(by_step)]


def run_baselines(run_dir: str | Path) -> dict[str, float]:
    """Reference losses the run knows (label -> nats/token): the ``BASELINES`` keys of
    RUN_DIR/summary.json, e.g. the quickstart's unigram loss; empty when there are none."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(summary, dict):
        return {}
    return {label: float(summary[k]) for k, label in BASELINES.items() if _finite(summary.get(k))}


def plot_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    baselines: dict[str, float] | None = None,
) -> Path:
    """Train loss (raw and smoothed) and validation loss against tokens seen, as a PNG
    (default RUN_DIR/loss.png), with each reference loss (``baselines``, default
    `run_baselines`: the unigram loss where the run recorded it) as a dashed horizontal
    line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["tokens"], r["loss"]) for r in rows if _finite(r.get("loss"))]
    val = [(r["tokens"], r["val_loss"]) for r in rows if _finite(r.get("val_loss"))]
    if not train:
        raise ValueError(f"{Path(run_dir) / METRICS_FILE}: no finite training loss to plot")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    xs, ys = zip(*train)
    ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
    ax.plot(xs, _ema(list(ys)), color="tab:blue", linewidth=1.6, label="train (smoothed)")
    if val:
        vx, vy = zip(*val)
        ax.plot(vx, vy, "o-", color="tab:orange", linewidth=1.6, label="validation")
    refs = run_baselines(run_dir) if baselines is None else baselines
    for label, value in refs.items():
        ax.axhline(
            value, color="gray", linestyle="--", linewidth=1.2, label=f"{label} ({value:.3f})"
        )
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{Path(run_dir).resolve().name}: {len(rows)} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    target = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    try:
        with atomic_path(target) as tmp:  # the format from the target's suffix, not tmp's
            fig.savefig(tmp, format=target.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    return target


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out
