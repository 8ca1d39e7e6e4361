"""The study's table and its report: study.csv's columns, the per-row summary over seeds, the markdown report
(rows, lr sweep, peers, paired differences, the papers' targets, the LoRA-by-rank frontier, cost) and the Pareto
chart. Pure functions of the study's rows and per-example predictions; :mod:`flows.study` runs the study and
writes what these return."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from flows import cost, frontier, paired
from flows.paired import is_peer
from flows.report import fmt, fmt_int
from flows.variants import chart_label, figure_labels, parse_variant, training_label
from lora_ops.methods.base import reference_method
from lora_ops.stats import ScoreInterval
from stages.common.plots import pyplot, save_png
from stages.common.registry import higher_is_better

#: what every run has; a method's own figures (Method.figure_labels) are the other columns
RUN_COLUMNS = ["task", "method", "seed", "lr", "lr_factor", "selected", "metric", "score", "validation_score",
               "trivial_score", "trainable_params", "stored_params", "pct_of_lora", "train_seconds", "peak_rss_mb",
               "peak_cuda_mb", "trained", "experiment", "mlflow_run_id", "git", "params_hash", "stored_bytes",
               "pct_bytes_of_lora_fp32", "compress_components", "compress_bits", "run_seconds"]
#: study.csv's layout: the figure columns every earlier study.csv has, where they have always been (--append)
COLUMNS = RUN_COLUMNS[:13] + ["bops_ratio_adapter", "gates_closed"] + RUN_COLUMNS[13:]

def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """study.csv's columns for these rows: :data:`COLUMNS`, then any further figure a method reports."""
    extra = dict.fromkeys(k for r in rows for k in r if k not in COLUMNS)
    return COLUMNS + list(extra)


def no_better_than_trivial(score: pd.Series, trivial: pd.Series, metric: str) -> pd.Series:
    """Per run, whether its score is no better than the trivial predictor's (a constant answer; for a causal
    LM the unadapted base), in the metric's direction."""
    return score <= trivial if higher_is_better(metric) else score >= trivial


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the selected runs, per task and method (in study order)."""
    sel = df[df["selected"]]
    figures = [c for c in df.columns if c not in RUN_COLUMNS]
    rows = []
    for (task, method), g in sel.groupby(["task", "method"], sort=False):
        score = g["score"].astype(float)
        rows.append({
            "task": task, "method": method, "metric": g["metric"].iloc[0], "n": len(g), "lr": g["lr"].iloc[0],
            "score_mean": score.mean(), "score_std": score.std(ddof=1) if len(g) > 1 else 0.0,
            "validation_mean": g["validation_score"].astype(float).mean(),
            "trivial": g["trivial_score"].astype(float).mean(),
            # collapsed runs (e.g. the majority class after a loss spike) widen every paired interval they are in
            "at_trivial": int(no_better_than_trivial(score, g["trivial_score"].astype(float),
                                                     str(g["metric"].iloc[0])).sum()),
            "trainable_params": g["trainable_params"].astype(float).mean(),
            "stored_mean": g["stored_params"].astype(float).mean(),
            "stored_std": g["stored_params"].astype(float).std(ddof=1) if len(g) > 1 else 0.0,
            "pct_of_lora": g["pct_of_lora"].astype(float).mean(),
            "bytes_mean": g["stored_bytes"].astype(float).mean() if "stored_bytes" in g.columns else math.nan,
            **{c: g[c].astype(float).mean() for c in figures},
            "train_seconds": g["train_seconds"].astype(float).mean(),
            "peak_rss_mb": g["peak_rss_mb"].astype(float).mean(),
        })
    return pd.DataFrame(rows)


def peer_rows(s: pd.DataFrame) -> list[tuple[str, ...]]:
    """Each method against each peer present (same task): dev difference, stored-parameter difference and
    which of the two is better on both axes (the other cases are trade-offs, said as such)."""
    out: list[tuple[str, ...]] = []
    for task, g in s.groupby("task", sort=False):
        rows = {str(r["method"]): r for _, r in g.iterrows()}
        peers = [p for p in rows if is_peer(p)]
        for name, r in rows.items():
            if is_peer(name):
                continue
            for peer in peers:
                q = rows[peer]
                d_score = 100 * (r["score_mean"] - q["score_mean"])
                d_params = r["stored_mean"] - q["stored_mean"]
                if d_score >= 0 and d_params <= 0:
                    verdict = "beats the peer"
                elif d_score <= 0 and d_params >= 0:
                    verdict = "**peer better**"
                else:
                    verdict = "trade-off"
                out.append((task, name, peer, f"{d_score:+.2f}", f"{d_params:+,.0f}", verdict))
    return out


def fmt_figure(v: Any) -> str:
    """A method's figure in the report: counts as integers, ratios to three decimals."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return fmt_int(v) if float(v) == int(v) or abs(float(v)) >= 10 else fmt(v, 3)


def targets(s: pd.DataFrame, preds: pd.DataFrame | None = None, draws: int = paired.DRAWS
            ) -> list[paired.TargetCheck]:
    """The papers' trends, each declared by its method (Method.paper_targets) as a paired claim, with a verdict
    from the selected runs' per-example predictions (``preds``), Holm-corrected across the report."""
    return paired.check_targets(s, paired.empty() if preds is None else preds, draws=draws)


def _interval_text(ci: ScoreInterval | None) -> str:
    return "–" if ci is None else f"[{ci.low:.2f}, {ci.high:.2f}]"


def markdown(df: pd.DataFrame, header: str, command: str, preds: pd.DataFrame | None = None,
             draws: int = paired.DRAWS, intervals: dict[tuple[str, str], ScoreInterval] | None = None) -> str:
    """The report; ``preds``: the runs' per-example predictions (the paired sections need them); ``intervals``:
    :func:`flows.paired.intervals` when the caller has them already (else computed here)."""
    s = summary(df)
    chosen = paired.selected(df, paired.empty() if preds is None else preds)
    if intervals is None:
        intervals = paired.intervals(s, chosen, draws)
    figures = {c: h for c, h in figure_labels(s["method"]).items() if c in s.columns}
    head = ["task", "method", "metric", "dev (mean ± std)", "dev 95 % interval (pt)", "n", "≤ trivial", "lr", "validation", "stored params (mean ± std)",
            "stored % of LoRA", "stored bytes", "bytes % of LoRA fp32", "trainable % of LoRA", *figures.values(),
            "train s", "peak RSS MB"]
    lines = [header, "", f"Command: `{command}`", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    reference = s[s["method"] == reference_method()]
    lora_stored = {t: float(g["stored_mean"].iloc[0]) for t, g in reference.groupby("task")}
    lora_bytes = {t: float(g["bytes_mean"].iloc[0]) for t, g in reference.groupby("task")
                  if not math.isnan(float(g["bytes_mean"].iloc[0]))}
    for _, r in s.iterrows():
        stored = fmt_int(r["stored_mean"]) + (f" ± {fmt_int(r['stored_std'])}" if r["stored_std"] else "")
        lines.append("| " + " | ".join([
            r["task"], r["method"], r["metric"], f"{r['score_mean']:.4f} ± {r['score_std']:.4f}",
            _interval_text(intervals.get((str(r["task"]), str(r["method"])))), str(r["n"]), str(r["at_trivial"]),
            f"{r['lr']:.1e}", fmt(r["validation_mean"], 4), stored,
            fmt(100 * r["stored_mean"] / lora_stored[r["task"]] if r["task"] in lora_stored else None),
            fmt_int(r["bytes_mean"]),
            fmt(100 * r["bytes_mean"] / lora_bytes[r["task"]] if r["task"] in lora_bytes else None, 2),
            fmt(r["pct_of_lora"]),
            *(fmt_figure(r[c]) for c in figures), fmt(r["train_seconds"]),
            fmt(r["peak_rss_mb"], 0)]) + " |")
    lines += ["", "`≤ trivial`: the row's runs whose dev score is no better than the trivial predictor's (one "
              "constant answer: the training majority class, or mean; for a causal LM the unadapted base): "
              "collapsed runs, each of which widens every paired interval it is in."]
    lines += ["", "Learning-rate sweep (the seeds that ran every factor; the factor with the best mean validation "
              "score is chosen, dev shown for reference):", "",
              "| task | method | seed | lr factor | lr | validation | dev | chosen |", "|---|---|---|---|---|---|---|---|"]
    factors_run = df.groupby(["task", "method", "seed"], sort=False)["lr_factor"].transform("nunique")
    first = df.groupby(["task", "method"], sort=False)["seed"].transform("first")
    swept = df.groupby(["task", "method"], sort=False)["lr_factor"].transform("nunique") > 1
    for _, r in df[(swept & (factors_run > 1)) | (~swept & (df["seed"] == first))].iterrows():
        lines.append(f"| {r['task']} | {r['method']} | {int(r['seed'])} | {r['lr_factor']:g} | {r['lr']:.1e} | "
                     f"{fmt(r['validation_score'], 4)} | {fmt(r['score'], 4)} | {'yes' if r['selected'] else ''} |")
    peers = peer_rows(s)
    if peers:
        lines += ["", "Against PEFT's own alternatives (`eva`: EVA initialisation and rank redistribution; "
                  "`svd_trim`: LoRA trimmed after training by SVD energy, PEFT `convert_to_lora`): dev points and "
                  "stored parameters of each method minus the peer's (a method beats a peer when it is at least as "
                  "good with fewer parameters):", "",
                  "| task | method | peer | dev Δ (pt) | stored params Δ | verdict |", "|---|---|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} | {e} | {f} |" for a, b, c, d, e, f in peers]
    lines += paired.section(paired.comparisons(s, chosen, draws), draws)
    lines += paired.targets_section(targets(s, chosen, draws))
    lines += frontier.capacity_section(frontier.capacity(s, chosen, parse_variant, reference_method(), draws))
    lines += frontier.section(frontier.place(s, chosen, parse_variant, reference_method(), draws))
    lines += frontier.targets_section(frontier.compress_targets(s, chosen, parse_variant, reference_method(), draws))
    lines += cost.section(df, training_label)
    return "\n".join(lines) + "\n"


def _yerr(ci: ScoreInterval | None, label: str, score: float, g: pd.DataFrame) -> Any:
    """Error bar of one chart point: its 95 % interval where predictions exist, else ± the seeds' std."""
    if ci is not None:
        return [[max(score - ci.low, 0.0)], [max(ci.high - score, 0.0)]]
    std = float(g[g["method"] == label]["score_std"].iloc[0]) * 100
    return std or None


def _place_labels(ax: Any, points: list[tuple[float, float, str]], step_pt: float = 7.0) -> None:
    """Number labels beside their points, each moved up (then down) in steps of ``step_pt`` points until it
    overlaps no label already placed: dense clusters stay readable."""
    ax.figure.canvas.draw()  # final limits and scales, so data -> display is what will be drawn
    to_px = ax.transData.transform
    px_per_pt = ax.figure.dpi / 72
    placed: list[tuple[float, float, float]] = []  # (x, y, width) in display pixels
    for x, y, text in sorted(points, key=lambda p: (to_px((p[0], p[1]))[0], -p[1])):
        px, py = to_px((x, y))
        width = (len(text) * 4.2 + 2) * px_per_pt
        offsets = [0.0] + [k * sign for k in range(1, 12) for sign in (1, -1)]
        for k in offsets:
            lx, ly = px + 3 * px_per_pt, py + (2 + k * step_pt) * px_per_pt
            if all(abs(ly - qy) >= step_pt * px_per_pt or lx > qx + qw or lx + width < qx for qx, qy, qw in placed):
                break
        placed.append((lx, ly, width))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, 2 + k * step_pt), fontsize=6,
                    va="center", arrowprops={"arrowstyle": "-", "lw": 0.4, "alpha": 0.5} if k else None)


def pareto_chart(df: pd.DataFrame, path: Path, preds: pd.DataFrame | None = None, draws: int = paired.DRAWS,
                 intervals: dict[tuple[str, str], ScoreInterval] | None = None) -> None:
    """Dev metric against what is stored, one panel per task, one point per study row (error bars: std over
    seeds; with ``preds``, the selected runs' per-example predictions, the 95 % hierarchical-bootstrap interval
    of the mean instead). With stored bytes in the rows (the compress stage's), two rows of panels: dev against
    bytes, then against stored parameters, each on a log scale with the LoRA-by-rank frontier
    (:mod:`flows.frontier`) drawn as a step line through its upper envelope; rows of an older study.csv without
    bytes fall back to one row of panels on stored parameters with the Pareto frontier of the rows."""
    plt = pyplot()
    s = summary(df)
    chosen = paired.selected(df, preds) if preds is not None else paired.empty()
    if intervals is None:
        intervals = paired.intervals(s, chosen, draws)
    tasks = list(dict.fromkeys(s["task"]))
    any_bytes = bool(s["bytes_mean"].notna().any())
    rows = 2 if any_bytes else 1
    fig, axes = plt.subplots(rows, len(tasks), figsize=(10 * len(tasks), 5.6 * rows), squeeze=False)
    by_size = (  # (x of a point, the panel's frontier points, its x label, its legend)
        (lambda p: p.stored_bytes, frontier.chart_points, "stored adapter bytes (codes + scales + head), log scale",
         "LoRA-by-rank frontier (fp32 / int8 / int4)"),
        (lambda p: p.stored_params, frontier.chart_points_by_params, "stored adapter parameters, log scale",
         "LoRA-by-rank frontier (fp32)"))
    for column, task in enumerate(tasks):
        ax = axes[0][column]
        g = s[s["task"] == task]
        has_bytes = bool(g["bytes_mean"].notna().any())
        number = {label: i + 1 for i, label in enumerate(dict.fromkeys(g["method"]))}  # one key per task
        if has_bytes:
            for row, (x, points_of, xlabel, legend) in enumerate(by_size):
                ax = axes[row][column]
                front, envelope, others = points_of(s, str(task), parse_variant, reference_method())
                numbered = []
                for pts, style, colour in ((front, "s", "grey"), (others, "o", None)):
                    for p in pts:
                        ax.errorbar(x(p), p.score, yerr=_yerr(intervals.get((str(task), p.label)), p.label,
                                                              p.score, g),
                                    fmt=style, capsize=3, color=colour, alpha=0.8)
                        numbered.append((x(p), p.score, str(number[p.label])))
                if len(envelope) > 1:
                    ax.step([x(p) for p in envelope], [p.score for p in envelope], where="post",
                            color="grey", linestyle="--", label=legend)
                ax.set_xscale("log")
                ax.set_xlabel(xlabel)
                _place_labels(ax, numbered)
                ax.text(1.02, 1.0, "\n".join(f"{n:>2}  {chart_label(label)}" for label, n in number.items()),
                        transform=ax.transAxes, va="top", ha="left", fontsize=6, family="monospace")
        else:
            g = g.sort_values("stored_mean")
            frontier_xy, best = [], -math.inf
            for _, r in g.iterrows():  # ascending parameters: on the frontier if it beats all smaller ones
                ax.errorbar(r["stored_mean"], 100 * r["score_mean"], xerr=r["stored_std"] or None,
                            yerr=100 * r["score_std"], fmt="o", capsize=3)
                ax.annotate(r["method"], (r["stored_mean"], 100 * r["score_mean"]), textcoords="offset points",
                            xytext=(5, 4), fontsize=7)
                if r["score_mean"] > best:
                    frontier_xy.append((r["stored_mean"], 100 * r["score_mean"]))
                    best = r["score_mean"]
            if len(frontier_xy) > 1:
                ax.step(*zip(*frontier_xy), where="post", color="grey", alpha=0.5, linestyle="--",
                        label="Pareto frontier")
            ax.set_xlabel("stored adapter parameters")
            if rows == 2:
                axes[1][column].axis("off")  # another task has bytes; this one's rows do not
        for ax in axes[:, column] if has_bytes else [axes[0][column]]:
            ax.set_ylabel(f"dev {g['metric'].iloc[0]} × 100 (mean; "
                          + ("95 % interval)" if not chosen.empty else "± std over seeds)"))
            ax.set_title(str(task))
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_png(fig, path)

