"""The study's results page: tables of mean ± std over seeds, plots, and a verdict on each
of the paper's claims, all computed from the cells' ``result.json`` files (``study``).

A difference counts when it is larger than twice its standard error (the seeds' standard
deviations combined, sqrt(s₁²/n₁ + s₂²/n₂)); smaller ones are *within noise*.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llamaforge.science.blocks import GPT2, LADDER
from llamaforge.science.study import (
    EXPERIMENTS,
    Size,
    StudyConfig,
    finite,
    load_results,
    seed_cells,
    sweep_cells,
    unigram_baseline,
)

# what each rung of the ladder is expected to do, and where the expectation comes from
RUNG_CLAIMS = {
    "+rmsnorm": ("lower loss", "RMSNorm: −0.02 log-ppl (Narang et al. 2021); GPT-3's pre-norm"),
    "+swiglu": ("lower loss", "SwiGLU at equal parameters: −0.05 log-ppl (Shazeer 2020, PaLM)"),
    "+rope": ("lower loss", "rotary positions (GPTNeo; the nanoGPT speedrun)"),
    "+no bias": ("no worse", "no biases (PaLM: more stable, no loss in quality)"),
    "+untied = llama": ("lower loss", "a separate output layer (LLaMA, against GPT-2's tying)"),
}


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}" if self.n > 1 else f"{self.mean:.4f}"


def difference(a: Stat, b: Stat) -> tuple[float, float]:
    """b − a and its standard error."""
    se = math.sqrt((a.std**2 / a.n if a.n else 0) + (b.std**2 / b.n if b.n else 0))
    return b.mean - a.mean, se


def verdict(delta: float, se: float, expect: str) -> str:
    """``expect`` lower loss: reproduced when delta < −2·se, not reproduced when the change
    is significantly worse, within noise otherwise; no worse: reproduced unless worse."""
    worse, better = delta > 2 * se, delta < -2 * se
    if expect == "no worse":
        return "not reproduced (worse)" if worse else "reproduced (no worse)"
    if better:
        return "reproduced"
    return "not reproduced (worse)" if worse else "within noise"


def rule(a: Stat, b: Stat, expect: str) -> str:
    """`verdict` on b against a, once both have at least two seeds (a spread to judge by)."""
    if min(a.n, b.n) < 2:
        return "pending (one seed)"
    return verdict(*difference(a, b), expect)


# -- the ladder --------------------------------------------------------------------------


def ladder_rows(sc: StudyConfig, results: dict[str, Any], corpus: str) -> list[dict[str, Any]]:
    """Per rung: the sweep's losses by lr, the best lr, the seeds' Stat, N and FLOPs."""
    rows = []
    for name, arch in LADDER:
        sweep = {
            lr: results.get(sc.cell(corpus, arch, sc.ladder_size, lr, 0).key())
            for lr in sc.ladder_lrs
        }
        scored = [(r["val_loss"], lr) for lr, r in sweep.items() if r and finite(r)]
        best = min(scored)[1] if scored else None
        seeds = (
            [
                results.get(sc.cell(corpus, arch, sc.ladder_size, best, s).key())
                for s in range(sc.seeds)
            ]
            if best is not None
            else []
        )
        done = [r for r in seeds if r and finite(r)]
        any_r = next((r for r in sweep.values() if r), None)
        rows.append(
            {
                "name": name,
                "sweep": sweep,
                "best_lr": best,
                "stat": Stat([r["val_loss"] for r in done]) if done else None,
                "params": any_r and any_r.get("params"),
                "flops": any_r and any_r.get("flops_per_token"),
            }
        )
    return rows


def ladder_table(sc: StudyConfig, rows: list[dict[str, Any]]) -> list[str]:
    lrs = " | ".join(f"lr {lr:g}" for lr in sc.ladder_lrs)
    out = [
        f"| rung | params | FLOPs/token | {lrs} | best lr | val loss ({sc.seeds} seeds) | "
        "Δ vs rung above | verdict |",
        "|---|---:|---:|" + "---:|" * len(sc.ladder_lrs) + "---:|---:|---:|---|",
    ]
    prev = None
    for row in rows:
        sweep = " | ".join(_loss(row["sweep"][lr]) for lr in sc.ladder_lrs)
        delta, ruling = "", ""
        if prev is not None and prev["stat"] and row["stat"]:
            d, se = difference(prev["stat"], row["stat"])
            delta = f"{d:+.4f} ± {se:.4f}"
            ruling = rule(prev["stat"], row["stat"], RUNG_CLAIMS[row["name"]][0])
        out.append(
            f"| {row['name']} | {_int(row['params'])} | {_int(row['flops'])} | {sweep} | "
            f"{_g(row['best_lr'])} | {row['stat'] or '—'} | {delta or '—'} | {ruling or '—'} |"
        )
        prev = row
    return out


def _loss(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if r.get("failed"):  # it trained, to no better than token frequencies
        return f"collapsed ({r['val_loss']:.4f})"
    return "diverged" if not finite(r) else f"{r['val_loss']:.4f}"


def _int(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "—"


def _g(v: float | None) -> str:
    return "—" if v is None else f"{v:g}"


# -- pre-norm against post-norm ------------------------------------------------------------


def norm_rows(sc: StudyConfig, results: dict[str, Any]) -> dict[str, dict[float, Any]]:
    return {
        pos: {
            lr: results.get(
                sc.cell(
                    sc.corpora[0], replace(GPT2, norm_position=pos), sc.ladder_size, lr, 0
                ).key()
            )
            for lr in sc.norm_lrs
        }
        for pos in ("pre", "post")
    }


def stable_up_to(by_lr: dict[float, Any]) -> float | None:
    """The largest learning rate below which every run trained (None: none did)."""
    top = None
    for lr in sorted(by_lr):
        r = by_lr[lr]
        if r is None or not finite(r):
            break
        top = lr
    return top


# -- scaling (Figure 1 in miniature, Chinchilla's method 1) --------------------------------


def scaling_runs(sc: StudyConfig, results: dict[str, Any]) -> list[tuple[Size, dict[str, Any]]]:
    """The finished scaling runs with a validation curve, by size."""
    runs = [(size, results.get(sc.scaling_cell(size).key())) for size in sc.scaling_sizes]
    return [(size, r) for size, r in runs if r is not None and r["curve"]]


def loss_at(curve: list[dict[str, float]], x: float, key: str, scale: float = 1.0) -> float | None:
    """The curve's loss at ``x`` (tokens, or FLOPs with ``scale`` = FLOPs per token),
    interpolated linearly in log x between evaluations; None outside the curve."""
    pts = [(p["tokens"] * scale, p["val_loss"]) for p in curve if math.isfinite(p["val_loss"])]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1 and x0 > 0:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def achievable(r: dict[str, Any], flops: float) -> tuple[float, bool] | None:
    """The loss run ``r`` reached within ``flops`` training FLOPs, and whether its run had
    already ended there (then its last loss: what the budget surely buys, a bound on what a
    longer run of that size would reach); None before its first evaluation."""
    fpt, curve = r["flops_per_token"], r["curve"]
    end = curve[-1]["tokens"] * fpt
    if flops > end * (1 + 1e-9):  # past its end (not at it, up to rounding)
        return curve[-1]["val_loss"], True
    if flops >= end:
        return curve[-1]["val_loss"], False
    loss = loss_at(curve, flops, "flops", fpt)
    return None if loss is None else (loss, False)


def compute_optimal(
    runs: list[tuple[Size, dict[str, Any]]], budgets: int = 8
) -> list[tuple[float, str, float, bool]]:
    """Chinchilla's method 1 on these runs: at each of ``budgets`` FLOP budgets (log-spaced
    from where every run has a point to the largest run's end), the size with the lowest
    `achievable` loss: (FLOPs, size, loss, whether that size's run had ended)."""
    if not runs:
        return []
    lo = max(r["curve"][0]["tokens"] * r["flops_per_token"] for _, r in runs)
    hi = max(r["curve"][-1]["tokens"] * r["flops_per_token"] for _, r in runs)
    out = []
    for i in range(budgets):
        c = lo * (hi / lo) ** (i / max(1, budgets - 1))
        reached = [(a, size.label) for size, r in runs if (a := achievable(r, c)) is not None]
        if reached:
            (loss, ended), label = min(reached)
            out.append((c, label, loss, ended))
    return out


# -- the page -----------------------------------------------------------------------------


# a run ending within this many nats of the unigram baseline learned (next to) nothing but
# token frequencies: it *collapsed*, the small-scale form of a diverged run
COLLAPSE_MARGIN = 0.1


def load(out: Path) -> tuple[StudyConfig, dict[str, Any], dict[str, float]]:
    """The study's config (study.json), its finished results and each prepared corpus's
    `unigram_baseline`; a result that diverged or ended within `COLLAPSE_MARGIN` of its
    corpus's baseline is marked failed (``finite`` is then False for it)."""
    raw = json.loads((out / "study.json").read_text())
    sizes = {"ladder_size": Size(**raw["ladder_size"])}
    sizes["scaling_sizes"] = tuple(Size(**s) for s in raw["scaling_sizes"])
    tuples = {k: tuple(v) for k, v in raw.items() if isinstance(v, list) and k != "scaling_sizes"}
    sc = StudyConfig(**{**raw, **tuples, **sizes})
    baselines = {
        corpus: unigram_baseline(sc, out / "data" / corpus)
        for corpus in sc.corpora
        if (out / "data" / corpus / "mixture.json").exists()
    }
    results = load_results(out)
    planned = sweep_cells(sc, EXPERIMENTS) + seed_cells(sc, results, EXPERIMENTS)
    keys = {cell.key() for _, _, cell in planned}  # cells of other budgets are not this study's
    results = {k: r for k, r in results.items() if k in keys}
    for r in results.values():
        base = baselines.get(r["cell"]["corpus"], math.inf)
        if finite(r) and r["val_loss"] >= base - COLLAPSE_MARGIN:
            r["diverged"], r["failed"] = True, "collapsed to the unigram level"
    return sc, results, baselines


def _plotted(r: dict[str, Any]) -> float:
    """A run's final loss; ln V (a uniform guess) when it was not finite."""
    v = r.get("val_loss")
    return v if v is not None and math.isfinite(v) else math.log(2048)


def plots(
    sc: StudyConfig, results: dict[str, Any], folder: Path, baselines: dict[str, float]
) -> list[str]:
    """ladder.png, norm.png and scaling.png in ``folder``; returns the names written."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, len(sc.corpora), figsize=(6 * len(sc.corpora), 4), squeeze=False)
    for ax, corpus in zip(axes[0], sc.corpora):
        rows = [r for r in ladder_rows(sc, results, corpus) if r["stat"]]
        ax.errorbar(
            range(len(rows)), [r["stat"].mean for r in rows], yerr=[r["stat"].std for r in rows],
            fmt="o-", capsize=4,
        )  # fmt: skip
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=20)
        ax.set_title(f"ablation ladder, {corpus} (mean ± std, {sc.seeds} seeds)")
        ax.set_ylabel("validation loss")
    fig.tight_layout()
    fig.savefig(folder / "ladder.png", dpi=110)
    written.append("ladder.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for pos, by_lr in norm_rows(sc, results).items():
        xs = [lr for lr, r in by_lr.items() if r]
        ys = [_plotted(r) for r in by_lr.values() if r]
        ax.plot(xs, ys, "o-", label=f"{pos}-norm")
    if sc.corpora[0] in baselines:
        ax.axhline(baselines[sc.corpora[0]], ls="--", c="grey", label="unigram baseline")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation loss")
    ax.set_title("GPT-2 block: pre- vs post-LayerNorm (non-finite: at ln V)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "norm.png", dpi=110)
    written.append("norm.png")
    plt.close(fig)

    runs = scaling_runs(sc, results)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for size, r in runs:
        toks = [p["tokens"] for p in r["curve"]]
        loss = [p["val_loss"] for p in r["curve"]]
        label = f"{size.label} ({r['params'] / 1e6:.2f}M params)"
        a1.plot(toks, loss, "o-", ms=3, label=label)
        a2.plot([t * r["flops_per_token"] for t in toks], loss, "o-", ms=3, label=label)
    for ax, xlabel in ((a1, "training tokens"), (a2, "training FLOPs")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.legend()
    a1.set_title("loss against tokens")
    a2.set_title("loss against compute")
    fig.tight_layout()
    fig.savefig(folder / "scaling.png", dpi=110)
    written.append("scaling.png")
    plt.close(fig)
    return written


def claims(sc: StudyConfig, results: dict[str, Any]) -> list[str]:
    """The summary table: each claim, what was measured, and the verdict."""
    out = ["| claim | source | measured | verdict |", "|---|---|---|---|"]
    for corpus in sc.corpora:
        rows = ladder_rows(sc, results, corpus)
        for prev, row in zip(rows, rows[1:]):
            expect, source = RUNG_CLAIMS[row["name"]]
            if prev["stat"] and row["stat"]:
                d, se = difference(prev["stat"], row["stat"])
                measured = f"{corpus}: Δ loss {d:+.4f} ± {se:.4f}"
                ruling = rule(prev["stat"], row["stat"], expect)
            else:
                measured, ruling = f"{corpus}: not run", "—"
            out.append(f"| {row['name']}: {expect} | {source} | {measured} | {ruling} |")
    out.append(norm_claim(sc, results))
    out += scaling_claims(sc, results)
    return out


def norm_claim(sc: StudyConfig, results: dict[str, Any]) -> str:
    rows = norm_rows(sc, results)
    pre, post = stable_up_to(rows["pre"]), stable_up_to(rows["post"])
    measured = f"no collapse up to lr {_g(pre)} (pre) and {_g(post)} (post)"
    best = {
        pos: min((r["val_loss"] for r in by_lr.values() if r and finite(r)), default=None)
        for pos, by_lr in rows.items()
    }
    if best["pre"] is not None and best["post"] is not None:
        measured += f"; best loss {best['pre']:.4f} (pre) and {best['post']:.4f} (post)"
    if any(r is None for by_lr in rows.values() for r in by_lr.values()):
        ruling = "pending (cells not run)"
    elif pre is None or post is None:
        ruling = "not reproduced" if pre is None and post is not None else "reproduced"
        if pre is None and post is None:
            ruling = "neither trains at the lowest lr"
    elif pre > post:
        ruling = "reproduced"
    elif pre == post:
        ruling = "within this lr grid's resolution (both train up to the same lr)"
    else:
        ruling = "not reproduced"
    claim = "| pre-norm is more stable than post-norm | GPT-3, Xiong et al. 2020"
    return f"{claim} | {measured} | {ruling} |"


def scaling_claims(sc: StudyConfig, results: dict[str, Any]) -> list[str]:
    runs = scaling_runs(sc, results)
    if not runs:
        return ["| a smaller model keeps improving past 20 tokens/param | Figure 1 | not run | — |"]
    size, small = min(runs, key=lambda sr: sr[1]["params"])
    n = small["params"]
    at20 = loss_at(small["curve"], 20 * n, "tokens")
    end = small["curve"][-1]
    tpp = end["tokens"] / n
    noise = _noise(sc, results)
    if at20 is None:
        line = f"{size.label} ends at {tpp:.0f} tokens/param, before 20"
        ruling = "not measured"
    else:
        gain = at20 - end["val_loss"]
        line = (
            f"{size.label} ({n:,} params): {at20:.4f} at 20 tokens/param, "
            f"{end['val_loss']:.4f} at {tpp:.0f} (−{gain:.4f}; seed noise ±{noise:.4f})"
        )
        ruling = "reproduced" if gain > 2 * noise else "within noise"
    rows = [
        f"| a smaller model keeps improving past 20 tokens/param | Figure 1 | {line} | {ruling} |"
    ]
    opt = compute_optimal(runs)
    if opt:
        sizes = " → ".join(dict.fromkeys(label for _, label, _, _ in opt))
        order = [s.label for s, _ in sorted(runs, key=lambda sr: sr[1]["params"])]
        labels = [label for _, label, _, _ in opt]
        grows = all(order.index(a) <= order.index(b) for a, b in zip(labels, labels[1:]))
        ruling = "reproduced" if grows and labels[0] != labels[-1] else "not reproduced"
        rows.append(
            "| the compute-optimal size grows with the budget | Chinchilla method 1 (Hoffmann "
            f"et al. 2022), the paper's §1 | optimal size from the smallest to the largest "
            f"budget: {sizes} | {ruling} |"
        )
    return rows


def _noise(sc: StudyConfig, results: dict[str, Any]) -> float:
    """The seed standard deviation of LLaMA's rung on the first corpus (0 if unmeasured)."""
    rows = ladder_rows(sc, results, sc.corpora[0])
    stat = rows[-1]["stat"]
    return stat.std if stat else 0.0


# -- the page -------------------------------------------------------------------------------

START, END = "<!-- results:start -->", "<!-- results:end -->"


def setup_section(sc: StudyConfig, results: dict[str, Any], out: Path) -> list[str]:
    """What ran: corpora, sizes, budgets, machine, wall time."""
    from llamaforge.device import cpu_model

    runs = list(results.values())
    wall = sum(r["wall_s"] for r in runs)
    log = out / "study.log"
    sessions = log.read_text().strip().splitlines() if log.exists() else []
    return [
        f"- **Cells**: {len(runs)} finished training runs, {wall / 3600:.2f} h of run time in "
        "all. Sessions of the runner (`run_study`, behind `llamaforge experiment run`): "
        + ("; ".join(sessions) if sessions else "none logged")
        + ".",
        f"- **Machine**: {cpu_model()}, {_cores()} cores, one thread per run, "
        f"{max(1, min(2, _cores()))} runs at a time.",
        f"- **Corpora**: {', '.join(sc.corpora)}; 2048-piece tokenizers; sequences of "
        f"{sc.seq_len} tokens, {sc.batch_tokens:,} tokens a step.",
        f"- **Ladder and norm runs**: {sc.ladder_size.label}, {sc.ladder_tokens:,} tokens "
        f"({sc.ladder_tokens // sc.batch_tokens} steps); lrs {', '.join(map(_g, sc.ladder_lrs))}"
        f" (seed 0), then seeds 1–{sc.seeds - 1} at the best; norm lrs "
        f"{', '.join(map(_g, sc.norm_lrs))}.",
        f"- **Scaling runs**: {', '.join(s.label for s in sc.scaling_sizes)}, "
        f"{sc.scaling_tokens:,} tokens each at lr {_g(sc.scaling_lr)}, {sc.scaling_evals} "
        "validation losses along each run.",
        "- **Recipe**: LLaMA's for every cell (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, "
        "10 % warmup, cosine to 10 %), fp32.",
    ]


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def results_section(
    sc: StudyConfig, results: dict[str, Any], out: Path, baselines: dict[str, float]
) -> str:
    """The generated part of the page (between the markers)."""
    base = ", ".join(f"{c} {v:.4f}" for c, v in baselines.items())
    lines = ["## Setup", "", *setup_section(sc, results, out)]
    lines += [
        f"- **Unigram baselines** (the loss of predicting token frequencies; a run ending "
        f"within {COLLAPSE_MARGIN} of it *collapsed*): {base}.",
        "",
    ]
    lines += ["## The claims", "", *claims(sc, results), ""]
    for corpus in sc.corpora:
        lines += [f"## The ablation ladder: {corpus}", ""]
        lines += [*ladder_table(sc, ladder_rows(sc, results, corpus)), ""]
    lines += ["![ablation ladder](science/ladder.png)", ""]
    lines += [
        "## Pre-norm against post-norm",
        "",
        "| lr | pre-norm | post-norm |",
        "|---:|---:|---:|",
    ]
    rows = norm_rows(sc, results)
    for lr in sc.norm_lrs:
        lines.append(f"| {lr:g} | {_loss(rows['pre'][lr])} | {_loss(rows['post'][lr])} |")
    lines += ["", "![pre- vs post-norm](science/norm.png)", ""]
    lines += ["## Figure 1 in miniature", "", *scaling_table(sc, results), ""]
    lines += ["![loss against tokens and FLOPs](science/scaling.png)", ""]
    return "\n".join(lines)


def scaling_table(sc: StudyConfig, results: dict[str, Any]) -> list[str]:
    runs = scaling_runs(sc, results)
    out = [
        "| size | params | FLOPs/token | tokens/param at the end | loss at 20 tokens/param "
        "| final loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size, r in runs:
        n, end = r["params"], r["curve"][-1]
        at20 = loss_at(r["curve"], 20 * n, "tokens")
        out.append(
            f"| {size.label} | {n:,} | {r['flops_per_token']:,} | {end['tokens'] / n:.1f} | "
            f"{'—' if at20 is None else f'{at20:.4f}'} | {end['val_loss']:.4f} |"
        )
    out += [
        "",
        "Compute-optimal size per budget (Chinchilla's method 1: the lowest curve at each "
        "FLOP budget):",
        "",
        "| training FLOPs | best size | its loss |",
        "|---:|---|---:|",
    ]
    out += [
        f"| {c:.2e} | {label}{' (its run ended below this budget: its last loss)' if ended else ''}"
        f" | {loss:.4f} |"
        for c, label, loss, ended in compute_optimal(runs)
    ]
    return out + ["", *reach_table(runs)]


def tokens_to_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """The training tokens at which the curve first gets down to ``target`` (interpolated
    in log tokens between evaluations); None if it never does."""
    pts = [(p["tokens"], p["val_loss"]) for p in curve if math.isfinite(p["val_loss"])]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 > target >= y1 and x0 > 0:
            t = (y0 - target) / (y0 - y1)
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return pts[0][0] if pts and pts[0][1] <= target else None


def reach_table(runs: list[tuple[Size, dict[str, Any]]]) -> list[str]:
    """The paper's trade: each smaller model's final loss as a target, and what every size
    spent to reach it — training FLOPs — against what it costs per generated token
    afterwards (forward FLOPs, a third of the training FLOPs per token)."""
    out = [
        "Reaching the same loss (the paper's argument: a smaller model trained longer is "
        "cheaper to serve):",
        "",
        "| target loss | size | tokens to reach it | training FLOPs | inference FLOPs/token |",
        "|---:|---|---:|---:|---:|",
    ]
    by_size = sorted(runs, key=lambda sr: sr[1]["params"])
    for _, target_run in by_size[:-1]:
        target = target_run["curve"][-1]["val_loss"]
        for size, r in by_size:
            tokens = tokens_to_reach(r["curve"], target)
            if tokens is None:
                out.append(f"| {target:.4f} | {size.label} | not reached | — | — |")
                continue
            fpt = r["flops_per_token"]
            out.append(
                f"| {target:.4f} | {size.label} | {tokens:,.0f} | {tokens * fpt:.2e} | "
                f"{fpt // 3:,} |"
            )
    return out


def write_page(out: Path, page: Path) -> Path:
    """Write the results into ``page`` between its markers (the text around them is kept;
    a new page gets a title and the markers) and the plots into ``page``'s science/
    folder; returns the page."""
    sc, results, baselines = load(out)
    if not results:
        raise ValueError(f"{out}: no finished cells (run `llamaforge experiment run` first)")
    plots(sc, results, page.parent / "science", baselines)
    body = f"{START}\n{results_section(sc, results, out, baselines)}\n{END}"
    text = (
        page.read_text() if page.exists() else f"# The paper's claims, measured\n\n{START}\n{END}\n"
    )
    if START not in text or END not in text:
        raise ValueError(f"{page}: no {START} … {END} markers to write the results between")
    head, rest = text.split(START, 1)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(head + body + rest.split(END, 1)[1])
    return page
