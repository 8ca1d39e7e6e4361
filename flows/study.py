"""The method study: methods x tasks x seeds, each method with its own recipe and a small learning-rate
sweep chosen on the validation split, all at the same budget in training examples.

For every (task, method): the sweep runs the first seed at ``lr_factors`` x the method's recipe
learning rate (its ``recipe.lr``, or ``train.lr`` where the recipe says null); the factor with the
best *validation* score is kept (ties: the one nearest the recipe's own value) and the remaining
seeds run at it. The dev split is only reported. Every run is one :func:`flows.pipeline.pipeline`
run, saved as a DVC experiment, so a rerun of the study (same params, same code) is restored from
DVC's run cache instead of trained again. Outputs::

    reports/study.csv          every run, sweep included (column ``selected``), with its git commit and params hash
    reports/predictions.parquet  every run's per-example dev predictions (flows.paired)
    reports/study.md           mean ± std over seeds per task and method, the sweep, the paired differences
                               (hierarchical bootstrap by seed, then dev example) and the papers' targets
                               (met / not met / inconclusive, Holm-corrected)
    reports/study_pareto.png   dev metric against stored adapter parameters, one point per method

    python -m flows.study --methods lora lora_drop bone bat dora_dr adalora blora --seeds 1 2 3 \\
        -S data.train_size=2000 -S train.epochs=3

Sequential protocol: ``--extend-inconclusive reports/study.csv`` runs only the new seeds (five more, up to
10) of the (task, method) pairs behind its inconclusive verdicts (the papers' and the compress targets, a
row against the LoRA-by-rank frontier point at its size; both sides of each), at the lr factor each pair's
sweep chose; every earlier row and prediction is kept (as ``--append``), so nothing earlier is rerun.
Before it starts, the study prints its estimated CPU time (:func:`estimate_seconds`).

The MLflow report run holds the files (its description points to them); the flow run carries the report as a
Prefect markdown artifact and every run as a row of a table artifact (``lora-sieve-study-<deployment>-summary``
/ ``-runs``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger

from flows import cost, frontier, paired
from flows.paired import is_peer
from flows.pipeline import EXIT_BAD_INPUT, ROOT, parse_override, pipeline, validate_overrides
from flows.report import fmt, fmt_int, log_report_run, publish_report
from lora_ops.methods import get_method
from lora_ops.methods.base import method_class, reference_method
from lora_ops.stats import ScoreInterval
from stages.common.io import atomic_path
from stages.common.params import ConfigError, Params
from stages.common.paths import Paths
from stages.common.plots import pyplot, save_png
from stages.common.tracking import git_commit

#: what every run has; a method's own figures (Method.figure_labels) are the other columns
RUN_COLUMNS = ["task", "method", "seed", "lr", "lr_factor", "selected", "metric", "score", "validation_score",
               "trivial_score", "trainable_params", "stored_params", "pct_of_lora", "train_seconds", "peak_rss_mb",
               "peak_cuda_mb", "trained", "experiment", "mlflow_run_id", "git", "params_hash", "stored_bytes",
               "pct_bytes_of_lora_fp32", "compress_components", "compress_bits", "run_seconds"]
#: study.csv's layout: the figure columns every earlier study.csv has, where they have always been (--append)
COLUMNS = RUN_COLUMNS[:13] + ["bops_ratio_adapter", "gates_closed"] + RUN_COLUMNS[13:]


#: the rough cost of a run where no earlier study measured one: seconds per optimizer step (MiniLM, batch 32,
#: 2 CPU cores: 58 s for 189 steps in the December study) and the other stages of one run (a default run spends
#: 112 s outside its training loop, 22 s of it in the compress search: benchmarks/bench_run_overhead.py)
ROUGH_STEP_SECONDS = 0.3
STAGE_OVERHEAD_SECONDS = 90.0


def params_hash(params: Params) -> str:
    """A run's full validated params, hashed: two rows with the same hash ran the same configuration."""
    text = json.dumps(params.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def recipe_lr(params: Params) -> float:
    """The adapter learning rate the selected method trains at: its recipe's, else ``train.lr``."""
    recipe = params.method_params().recipe
    return recipe.lr if recipe.lr is not None else params.train.lr


#: a study row without ``+compress`` is the adapter as trained: the compress stage passes it through
UNCOMPRESSED = {"compress.rank": "none", "compress.bits": "none"}
COMPRESS_SUFFIX = "+compress"


def _settings(spec: str, section: str, body: str) -> dict[str, Any]:
    """``key=value,...`` of one bracket: a bare key belongs to ``section``, a dotted one is a full params key."""
    import yaml

    settings: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"method variant {spec!r}: {item!r} is not key=value")
        settings[key if "." in key else f"{section}.{key}"] = yaml.safe_load(value)
    return settings


def _bracketed(spec: str, part: str) -> tuple[str, str]:
    """``name[body]`` -> (name, body); ``name`` -> (name, "")."""
    if "[" not in part:
        return part.strip(), ""
    if not part.endswith("]"):
        raise ConfigError(f"method variant {spec!r}: write it as method[key=value,...]{COMPRESS_SUFFIX}[key=value,...]")
    name, body = part[:-1].split("[", 1)
    return name.strip(), body


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """A study row: ``method[key=value,...]`` optionally followed by ``+compress[key=value,...]``.

    * ``lora_drop[threshold=0.6]`` -> (label, "lora_drop", {"lora_drop.threshold": 0.6, compress off});
      a dotted key is a full params key: ``lora[adapter.rank=16]`` trains LoRA at rank 16.
    * ``+compress`` runs the compress stage with the params' ``compress`` section, and its own bracket
      changes it: ``lora+compress[rank=svd,bits=8]``. Without it the row is the adapter as trained, so
      every method can be set against its compressed self.
    """
    spec = spec.strip()
    head, plus, tail = spec.partition(COMPRESS_SUFFIX)
    if plus and tail and not tail.startswith("["):
        raise ConfigError(f"method variant {spec!r}: {COMPRESS_SUFFIX} takes its settings in brackets")
    method, body = _bracketed(spec, head)
    if not method:
        raise ConfigError(f"method variant {spec!r}: no method named")
    settings = _settings(spec, method, body)
    if plus:
        settings.update(_settings(spec, "compress", _bracketed(spec, "compress" + tail)[1]))
    else:
        settings = {**UNCOMPRESSED, **settings}
    return spec, method, settings


def training_label(spec: str) -> str:
    """The row whose training a study row uses: a ``+compress`` row trains what the row before it trains (the
    compress stage comes after finetune, so its settings never change the training)."""
    return spec.strip().partition(COMPRESS_SUFFIX)[0]


def scaled(lr: float, factor: float) -> float:
    """``lr * factor`` to three significant digits (a readable value in params and experiment names)."""
    return float(f"{lr * factor:.3g}")


def figure_labels(methods: Iterable[str]) -> dict[str, str]:
    """column -> report header of the figures the given methods (study labels) declare, in their order."""
    out: dict[str, str] = {}
    for label in methods:
        cls = method_class(str(label))
        for column, header in (cls.figure_labels if cls is not None else {}).items():
            out.setdefault(column, header)
    return out


def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """study.csv's columns for these rows: :data:`COLUMNS`, then any further figure a method reports."""
    extra = dict.fromkeys(k for r in rows for k in r if k not in COLUMNS)
    return COLUMNS + list(extra)


def study_row(result: dict[str, Any], params: Params, lr: float, factor: float, label: str | None = None
              ) -> dict[str, Any]:
    m, ft = result["metrics"], result.get("finetune") or {}
    ratio = m.get("trainable_ratio_to_lora")
    method = get_method(params.method.name)
    own = method.report_figures(ft.get("controller"), params.method_params())
    figures = {k: own[k] if k in own else m.get(k) for k in method.figure_labels}
    return {
        "task": params.task.name, "method": label or params.method.name, "seed": params.seed, "lr": lr, "lr_factor": factor,
        "selected": False, "metric": m.get("main_metric", "score"), "score": m.get("score"),
        "validation_score": m.get("best_validation"), "trivial_score": m.get("trivial_score"),
        "trainable_params": m.get("trainable_params"), "stored_params": m.get("stored_params"),
        "pct_of_lora": None if ratio is None else 100 * ratio, **figures,
        "train_seconds": m.get("train_seconds", ft.get("seconds")), "peak_rss_mb": ft.get("peak_rss_mb"),
        "peak_cuda_mb": ft.get("peak_cuda_mb"), "trained": result.get("stages", {}).get("finetune") == "ran",
        "experiment": result.get("experiment"),
        "mlflow_run_id": result.get("mlflow_run_id"), "params_hash": params_hash(params),
        # what the compress stage stored (codes + scales + head): the axis the LoRA-by-rank frontier is drawn on
        "stored_bytes": m.get("stored_bytes"),
        "pct_bytes_of_lora_fp32": None if m.get("stored_bytes_ratio_to_lora_fp32") is None
        else 100 * m["stored_bytes_ratio_to_lora_fp32"],
        "compress_components": m.get("compress_components"), "compress_bits": m.get("compress_bits"),
        # a structurally pruned base (LoRAPrune): merged parameters over the dense model's; a column only where
        # some row has it (columns_of), so earlier study.csv layouts stay as they were
        **({"params_ratio_to_dense": m["params_ratio_to_dense"]} if "params_ratio_to_dense" in m else {}),
    }


def with_earlier_rows(df: pd.DataFrame, earlier: pd.DataFrame,
                      extended: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()) -> pd.DataFrame:
    """``earlier`` rows first (without the (task, method) pairs ``df`` has run again), then ``df``'s. A pair in
    ``extended`` (the sequential protocol's new seeds) keeps its earlier rows, less any run ``df`` has again."""
    for column in ("git", "params_hash"):
        if column not in earlier.columns:
            earlier = earlier.assign(**{column: None})
    keep = earlier[paired.not_rerun(earlier, df, extended)]
    columns = list(dict.fromkeys([*COLUMNS, *earlier.columns, *df.columns]))
    out = pd.concat([keep.reindex(columns=columns), df.reindex(columns=columns)], ignore_index=True)
    out["selected"] = out["selected"].astype(str).str.lower().isin(["true", "1"])
    return out


def exp_name(task: str, label: str, seed: int, lr: float, stamp: str) -> str:
    """A DVC experiment name (letters, digits, - and _ only) for one study run."""

    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"study-{task}-{label}-s{seed}-lr{lr:g}-{stamp}").strip("-")


def sweep_order(seeds: list[int], factors: list[float], sweep_seeds: int) -> tuple[list[tuple[int, float]], list[int]]:
    """One (task, method)'s runs: the sweep (each factor on each of the first ``sweep_seeds`` seeds, factor by
    factor) and the seeds left to run at the chosen factor."""
    return [(s, f) for f in factors for s in seeds[:sweep_seeds]], seeds[sweep_seeds:]


def choose_factor(sweep: list[dict[str, Any]]) -> float:
    """The factor with the best mean validation score over the sweep's seeds; ties go to the factor nearest 1
    (the recipe)."""
    by_factor: dict[float, list[float]] = {}
    for r in sweep:
        by_factor.setdefault(float(r["lr_factor"]), []).append(float(r["validation_score"]))
    return max(by_factor, key=lambda f: (sum(by_factor[f]) / len(by_factor[f]), -abs(math.log(f))))


# ----------------------------------------------------------------------------- report
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
            "at_trivial": int((score <= g["trivial_score"].astype(float)).sum()),
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
    lines += ["", "`≤ trivial`: the row's runs whose dev score is no better than the trivial predictor's (the "
              "majority class; Matthews 0): collapsed runs, each of which widens every paired interval it is in."]
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


def chart_label(spec: str) -> str:
    """A study label short enough for a chart key: ``lora[adapter.rank=2]+compress[rank=none,bits=4]`` ->
    ``lora r2 +compress int4``; ``+compress[rank=svd,budget=energy,energy=0.9,bits=none]`` -> ``+compress svd
    budget=energy energy=0.9``. Settings that restate "off" (``none``) are dropped, a bits width reads ``int<b>``, the
    adapter's rank ``r<n>``, any other setting ``key=value`` without its section."""
    head, plus, tail = spec.partition(COMPRESS_SUFFIX)
    method, body = _bracketed(spec, head)

    def words(body: str) -> list[str]:
        out = []
        for item in filter(None, (x.strip() for x in body.split(","))):
            key, _, value = item.partition("=")
            key = key.strip().rsplit(".", 1)[-1]
            value = value.strip()
            if value.lower() in ("none", "null") and key in ("rank", "bits"):
                continue
            out.append(f"int{value}" if key == "bits" else f"r{value}" if key == "rank" and value.isdigit()
                       else value if key == "rank" else f"{key}={value}")
        return out

    parts = [method, *words(body)]
    if plus:
        parts += [COMPRESS_SUFFIX, *words(_bracketed(spec, "compress" + tail)[1])]
    return " ".join(parts)


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


# ----------------------------------------------------------------------------- flow
def estimate_seconds(runs: list[tuple[str, str, int, Params]], earlier: pd.DataFrame | None) -> tuple[float, str]:
    """CPU seconds the study's runs (task, label, seed, params) should take at most, and how that was estimated:
    each run's training time is the mean ``train_seconds`` an earlier study.csv measured for its (task, label),
    else for its task, else ``ROUGH_STEP_SECONDS`` per optimizer step; plus the other stages: the mean of
    ``run_seconds - train_seconds`` over the earlier rows that trained (a run served from DVC's cache says
    nothing about cost), else ``STAGE_OVERHEAD_SECONDS``. Runs DVC's run cache already has cost next to
    nothing: the estimate is an upper bound."""
    measured: dict[tuple[str, str], float] = {}
    by_task: dict[str, float] = {}
    overhead = STAGE_OVERHEAD_SECONDS
    overhead_measured = False
    if earlier is not None and "train_seconds" in earlier.columns and len(earlier):
        secs = earlier.assign(train_seconds=pd.to_numeric(earlier["train_seconds"], errors="coerce"))
        secs = secs.dropna(subset=["train_seconds"])
        measured = {(str(t), str(m)): float(v) for (t, m), v in secs.groupby(["task", "method"])["train_seconds"]
                    .mean().items()}
        by_task = {str(t): float(v) for t, v in secs.groupby("task")["train_seconds"].mean().items()}
        if "run_seconds" in secs.columns:
            ran = secs[secs["trained"].astype(str) == "True"] if "trained" in secs.columns else secs
            rest = (pd.to_numeric(ran["run_seconds"], errors="coerce") - ran["train_seconds"]).dropna()
            if len(rest):
                overhead, overhead_measured = float(rest.mean()), True
    total, counts = 0.0, {"measured": 0, "rough": 0}
    for task, label, _, p in runs:
        seconds = measured.get((task, label), by_task.get(task))
        if seconds is None:
            steps = p.train.epochs * math.ceil(p.data.train_size / p.train.batch_size)
            seconds = ROUGH_STEP_SECONDS * steps
            counts["rough"] += 1
        else:
            counts["measured"] += 1
        total += seconds + overhead
    how = (f"{counts['measured']} runs from the training times an earlier study.csv measured, {counts['rough']} at "
           f"~{ROUGH_STEP_SECONDS} s per optimizer step; plus ~{overhead:.0f} s per run for the other stages"
           f"{' (as earlier runs measured)' if overhead_measured else ''}; runs in DVC's run cache cost next to nothing")
    return total, how


def shown_path(path: str | Path, root: Path) -> str:
    """A path as a report may print it (no machine paths): relative to the repository; in another checkout of
    this project (a folder with ``.git`` and ``flows/study.py``), ``<checkout>/`` and the path inside it; else
    the file's name."""
    resolved, root = Path(path).resolve(), Path(root).resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        pass
    for parent in resolved.parents:
        if (parent / ".git").exists() and (parent / "flows" / "study.py").is_file():
            return f"<checkout>/{resolved.relative_to(parent).as_posix()}"
    return resolved.name


def shown_command(argv: list[str], root: Path) -> str:
    """The study's command line as a report prints it: absolute paths (an argument, or the value after its
    ``=``) as :func:`shown_path` shows them, each argument quoted where the shell needs it. It runs as printed
    from the repository root when every path in it is inside the repository."""
    def shown(arg: str) -> str:
        key, eq, value = arg.rpartition("=")
        if eq and Path(value).is_absolute():
            return f"{key}={shown_path(value, root)}"
        return shown_path(arg, root) if Path(arg).is_absolute() else arg
    return shlex.join(["python", "-m", "flows.study", *(shown(a) for a in argv)])


def earlier_predictions(csv: str | Path) -> pd.DataFrame:
    """The predictions file beside an earlier study.csv (empty when that study kept none)."""
    return paired.read(Path(csv).with_name("predictions.parquet"))


def write_report(out: Path, df: pd.DataFrame, preds: pd.DataFrame, header: str, command: str,
                 draws: int = paired.DRAWS) -> tuple[list[Path], str]:
    """``out``/study.{md,csv}, the chart and the predictions of a study; the files and the markdown. Each row's
    interval is bootstrapped once, for the table and the chart."""
    files = [out / "study.md", out / "study.csv", out / "study_pareto.png", out / "predictions.parquet"]
    intervals = paired.intervals(summary(df), paired.selected(df, preds), draws)
    report = markdown(df, header, command, preds, draws, intervals)
    with atomic_path(files[1]) as tmp:
        df.to_csv(tmp, index=False)
    paired.write(files[3], preds)
    with atomic_path(files[0]) as tmp:
        tmp.write_text(report)
    pareto_chart(df, files[2], preds, draws, intervals)
    return files, report


@flow(name="lora-sieve-study", log_prints=True)
def study(methods: list[str], seeds: list[int], tasks: list[str] | None = None,
          lr_factors: list[float] | None = None, overrides: dict[str, Any] | None = None, repo: str = str(ROOT),
          out_dir: str = "reports", retries: int = 2, command: str = "", append: str | None = None,
          pairs: list[dict[str, Any]] | None = None, sweep_seeds: int = 1) -> dict[str, Any]:
    """Sweep, then seeds, for every (task, method); write ``<out_dir>/study.{md,csv}``, the runs' per-example
    predictions (``predictions.parquet``) and the Pareto chart.

    ``append``: an earlier ``study.csv`` whose rows (and predictions, from the ``predictions.parquet`` beside it)
    are kept, except those of the (task, method) pairs run now; every row carries the git commit it ran at and
    its params hash, so the report says which code and configuration made it. ``pairs``: instead of
    ``tasks`` x ``methods`` x ``seeds``, the pairs to run, each ``{"task", "method", "seeds", "lr_factors"}``
    (the sequential protocol's extension). ``sweep_seeds``: how many of the first seeds run every lr factor; the
    factor with the best mean validation score over them is chosen (ties: nearest the recipe)."""
    logger = get_run_logger()
    if sweep_seeds < 1:
        raise ConfigError(f"sweep_seeds must be >= 1, got {sweep_seeds}")
    root = Path(repo).resolve()
    base = {**(overrides or {}), "registry.enabled": False}  # a study must not move the champion
    if pairs is None:
        if not methods or not seeds:
            raise ConfigError("a study needs at least one method and one seed")
        factors = sorted(set(lr_factors or [1.0]))
        plan = [(t, m, list(seeds), factors) for t in (tasks or [None]) for m in methods]
    else:
        plan = [(p.get("task"), str(p["method"]), [int(x) for x in p["seeds"]],
                 sorted({float(f) for f in p.get("lr_factors") or [1.0]})) for p in pairs]
        methods = list(dict.fromkeys(m for _, m, _, _ in plan))
        seeds = sorted({x for _, _, ss, _ in plan for x in ss})
        factors = sorted({f for *_, fs in plan for f in fs})
    if not plan or any(not ss for _, _, ss, _ in plan):
        raise ConfigError("a study needs at least one method and one seed")
    if any(f <= 0 for *_, fs in plan for f in fs):
        raise ConfigError(f"lr factors must be > 0, got {factors}")
    variants = {spec: parse_variant(spec) for _, spec, _, _ in plan}

    def overrides_for(task: str | None, spec: str, seed: int, factor: float = 1.0,
                      base_lr: float = 0.0) -> dict[str, Any]:
        _, method, settings = variants[spec]
        o = {**base, **settings, "method.name": method, "seed": seed}
        if task is not None:
            o["task.name"] = task
        if factor != 1.0:  # factor 1 is the recipe as written: same params, so DVC's cache serves earlier runs
            o[f"{method}.recipe.lr"] = scaled(base_lr, factor)
        return o

    checked = {(t, m): validate_overrides(root, overrides_for(t, m, ss[0])) for t, m, ss, _ in plan}  # fail early
    earlier_csv = Path(append) if append else root / out_dir / "study.csv"
    earlier = pd.read_csv(earlier_csv) if earlier_csv.is_file() else None
    planned = [(checked[(t, m)].task.name, variants[m][0], seed, checked[(t, m)])
               for t, m, ss, fs in plan for runs, rest in [sweep_order(ss, fs, sweep_seeds)]
               for seed in [s for s, _ in runs] + rest]
    seconds, how = estimate_seconds(planned, earlier)
    print(f"study: {len(planned)} runs, estimated CPU time at most {seconds / 3600:.2f} h ({how})")
    rows: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []  # the pipeline results of rows, in order (the Prefect artifacts)
    frames: list[pd.DataFrame | None] = []  # each run's per-example predictions
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def run(task: str | None, spec: str, seed: int, factor: float, base_lr: float) -> dict[str, Any]:
        label = variants[spec][0]
        lr = scaled(base_lr, factor)
        o = overrides_for(task, spec, seed, factor, base_lr)
        p = validate_overrides(root, o)
        name = exp_name(p.task.name, label, seed, lr, stamp)
        started = time.perf_counter()
        results.append(pipeline(overrides=o, repo=str(root), experiment_name=name, retries=retries))
        row = study_row(results[-1], p, lr, factor, label)
        row["run_seconds"] = time.perf_counter() - started  # what the CPU estimate of a later study reads
        frames.append(paired.run_predictions(root / Paths.predictions, row))  # before the next run replaces it
        return row

    for task, spec, pair_seeds, pair_factors in plan:
        p0 = checked[(task, spec)]
        label = variants[spec][0]
        base_lr = recipe_lr(p0)
        sweep_runs, rest = sweep_order(pair_seeds, pair_factors, sweep_seeds)
        sweep = []
        for seed, f in sweep_runs:
            sweep.append(run(task, spec, seed, f, base_lr))
            logger.info("%s %s seed %d lr %.2e: validation %.4f, dev %.4f", p0.task.name, label, seed,
                        sweep[-1]["lr"], sweep[-1]["validation_score"], sweep[-1]["score"])
        chosen = choose_factor(sweep) if len(pair_factors) > 1 else pair_factors[0]
        for r in sweep:
            r["selected"] = r["lr_factor"] == chosen
        rows += sweep
        for seed in rest:
            r = run(task, spec, seed, chosen, base_lr)
            r["selected"] = True
            rows.append(r)
        logger.info("%s %s: lr factor %g chosen on validation", p0.task.name, label, chosen)
    commit = git_commit(root)[:12]
    for r in rows:
        r["git"] = commit
    df = pd.DataFrame(rows, columns=columns_of(rows))
    preds = paired.combine(frames)
    ran = set(zip(df["task"], df["method"]))
    extended = {(checked[(p.get("task"), str(p["method"]))].task.name, variants[str(p["method"])][0])
                for p in pairs or [] if p.get("extends")}  # the sequential protocol's pairs: earlier seeds kept
    if append:
        df = with_earlier_rows(df, pd.read_csv(append), extended)
        preds = paired.with_earlier(preds, earlier_predictions(append), extended)
    out = root / out_dir
    p0 = next(iter(checked.values()))
    header = study_header(base_params(root, base, plan[0][0]), seeds, factors,
                          list(dict.fromkeys(str(c) for c in df["git"].dropna())), sweep_seeds)
    if append:
        kept = sorted(set(df["method"]) - {m for _, m in ran - extended})
        header += (f" Rows of {', '.join(kept)} kept from `{shown_path(append, root)}` (columns `git` and "
                   f"`params_hash` of study.csv: the commit and configuration each row ran at); ")
        header += (f"the rows of {', '.join(methods)} ran now." if not extended else
                   "the sequential protocol's new seeds ran now: " + "; ".join(
                       f"{m} seeds {', '.join(map(str, ss))}" for _, m, ss, _ in plan) + ".")
    files, report = write_report(out, df, preds, header, command or "python -m flows.study ...")
    run_id = log_report_run(root, p0.tracking.experiment, files, df[df["selected"]], kind="study", tags={
                         "study": "true", "methods": ",".join(methods), "seeds": ",".join(map(str, seeds)),
                          "overrides": json.dumps(base, default=str)[:5000]})
    artifacts = publish_report(root, "study", report, results, rows, run_id)
    print(report)
    return {"rows": rows, "files": [str(f) for f in files], "mlflow_run_id": run_id, "artifacts": artifacts}


def base_params(root: Path, overrides: dict[str, Any], task: str | None) -> Params:
    """The configuration every row of a study shares: params.yaml with the study-wide overrides, without any
    row's own method settings (a row's label says those)."""
    return validate_overrides(root, {**overrides, **({"task.name": task} if task else {})})


def study_header(p: Params, seeds: list[int], factors: list[float], commits: list[str], sweep_seeds: int = 1) -> str:
    """The report's first paragraph: the shared configuration, seeds, lr factors and the commits rows ran at."""
    shown = ", ".join(c[:12] for c in commits) or "unknown"
    return (f"# Method study\n\nModel `{p.model.name}`, {p.data.train_size} training examples "
            f"(validation {p.data.validation_size} carved from train), {p.train.epochs} epochs, batch "
            f"{p.train.batch_size}, train precision {p.train.precision}; unless a row's label says otherwise, "
            f"adapter rank {p.adapter.rank} on `{p.adapter.targets}`; seeds {seeds}; lr factors {factors} of each method's recipe lr, chosen on "
            f"validation with {'the first seed' if sweep_seeds == 1 else f'the mean of the first {sweep_seeds} seeds'}. Dev metric = the full dev split, never used for a choice. "
            f"Rows ran at git {shown}; drawn {time.strftime('%Y-%m-%d')}.")


def unknown_label(only: list[str] | None, df: pd.DataFrame, what: str) -> None:
    """A ConfigError naming the first ``--methods`` label that is no row of ``df`` (``what`` says where)."""
    missing = sorted(set(only or []) - set(df["method"]))
    if missing:
        raise ConfigError(f"--methods {missing[0]!r} {what}")


def extension_pairs(csv: str | Path, max_seeds: int = paired.MAX_SEEDS,
                    only: list[str] | None = None) -> list[dict[str, Any]]:
    """The sequential protocol's next step for an earlier study: the (task, method) pairs behind its
    inconclusive verdicts (the papers' and the compress targets, and a row against the LoRA-by-rank frontier
    point at its size; :func:`flows.paired.extension`), each with only its *new* seeds, at the lr factor its
    sweep chose (the choice rests on the sweep seeds, which stay as they are), so the earlier runs are neither
    rerun nor needed in DVC's cache. Each pair is marked ``extends``: its earlier rows and predictions are kept
    beside the new ones. Raises ConfigError when a pair to extend lacks the per-example predictions of a
    selected run (its difference could not be paired on those seeds). With ``only`` (row labels), just those
    rows: checkouts side by side each take a share of one step, merged afterwards by ``--report``."""
    df = pd.read_csv(csv)
    df["selected"] = df["selected"].astype(str).str.lower().isin(["true", "1"])
    unknown_label(only, df, f"is not a row of {csv}")
    preds = paired.selected(df, earlier_predictions(csv))
    s = summary(df)
    checks: list[paired.TargetCheck | paired.Undecided] = [
        *targets(s, preds), *frontier.compress_targets(s, preds, parse_variant, reference_method())]
    # "above the frontier" is a verdict too: the row against the frontier point at its size
    checks += [paired.Undecided(p.task, p.label, p.at_size.label)
               for p in frontier.place(s, preds, parse_variant, reference_method())
               if p.at_size is not None and p.verdict == paired.INCONCLUSIVE]
    plan = paired.extension(df, checks, max_seeds)
    have = set(zip(preds["task"], preds["method"], preds["seed"].astype(int))) if not preds.empty else set()
    out = []
    for (task, label), seeds in plan.items():
        if only is not None and label not in only:  # another checkout's share
            continue
        factor, earlier = chosen_runs(df[(df["task"] == task) & (df["method"] == label)], task, label)
        lacking = [x for x in earlier if (task, label, x) not in have]
        if lacking:
            raise ConfigError(f"{task} {label}: no per-example predictions for seed {lacking[0]} beside {csv}; "
                              f"make them first with --restore-predictions {csv} --out {Path(csv).parent}")
        new_seeds = [x for x in seeds if x not in earlier]
        if new_seeds:
            out.append({"task": task, "method": label, "seeds": new_seeds, "lr_factors": [factor], "extends": True})
    return out


def chosen_runs(g: pd.DataFrame, task: str, label: str) -> tuple[float, list[int]]:
    """The lr factor and the seeds of one (task, method)'s selected runs (``g``: its rows with ``selected``
    already boolean); a ConfigError when they ran at more than one factor."""
    chosen = g[g["selected"]]
    factors = sorted({float(f) for f in chosen["lr_factor"]})
    if len(factors) != 1:
        raise ConfigError(f"{task} {label}: its selected runs have lr factors {factors}, not one")
    return factors[0], sorted({int(x) for x in chosen["seed"]})


class NotReproduced(RuntimeError):
    """A rerun for ``--restore-predictions`` did not give the scores its earlier row records."""


def restore_pairs(old: pd.DataFrame, done: pd.DataFrame | None = None,
                  only: list[str] | None = None) -> list[dict[str, Any]]:
    """The (task, method) pairs of an earlier study whose per-example predictions are to be made again: its
    selected runs only (each seed at the lr factor chosen then; the sweep's other runs need none), skipping
    pairs ``done`` (the predictions already at the restore's output) holds and, with ``only``, other labels."""
    old = old.assign(selected=old["selected"].astype(str).str.lower().isin(["true", "1"]))
    unknown_label(only, old, "is not a row of the study.csv to restore")
    finished = set() if done is None else set(zip(done["task"], done["method"]))
    pairs = []
    for (task, label), g in old[old["selected"]].groupby(["task", "method"], sort=False):
        if (task, label) in finished or (only is not None and label not in only):
            continue
        factor, seeds = chosen_runs(g, task, label)
        pairs.append({"task": task, "method": label, "seeds": seeds, "lr_factors": [factor]})
    return pairs


def check_reproduced(old: pd.DataFrame, new: pd.DataFrame) -> None:
    """Every rerun's dev and validation scores equal, to the last digit, those of its earlier row (same task,
    method, seed and lr factor): only then are its predictions those of the earlier run."""
    keys = ["task", "method", "seed", "lr_factor"]
    merged = new.merge(old, on=keys, how="left", suffixes=("", "_earlier"), indicator=True)
    for _, r in merged.iterrows():
        if r["_merge"] != "both":
            raise NotReproduced(f"{r['task']} {r['method']} seed {r['seed']}: no earlier row to compare with")
        for column in ("score", "validation_score"):
            if float(r[column]) != float(r[f"{column}_earlier"]):
                raise NotReproduced(
                    f"{r['task']} {r['method']} seed {int(r['seed'])} lr factor {r['lr_factor']:g}: {column} "
                    f"{float(r[column])!r} now, {float(r[f'{column}_earlier'])!r} in the earlier study: this "
                    f"machine or code does not reproduce that run; run the row again instead")


def restore(old_csv: str, root: Path, out_dir: str, command: str, overrides: dict[str, Any] | None = None,
            only: list[str] | None = None, retries: int = 2) -> list[Path]:
    """Per-example predictions for an earlier study whose ``predictions.parquet`` is gone (it stays on the
    machine that ran it): each selected run is run again, one (task, method) pair at a time, and kept only if
    it reproduces its row's scores exactly (:func:`check_reproduced`). ``<out_dir>/study.csv`` gets the
    earlier rows of every restored pair, sweep included and unchanged (their ``git`` is the commit that made
    the numbers), and ``predictions.parquet`` the reruns' predictions; ``out_dir`` may be the study's own
    folder (its study.csv is then left as it is). A pair counts as done once its predictions are there, so a
    killed restore resumes at the next pair. Then the report is drawn (:func:`rebuild`)."""
    import shutil

    old = pd.read_csv(old_csv)
    out = root / out_dir
    out_csv = out / "study.csv"
    in_place = out_csv.resolve() == Path(old_csv).resolve()  # the study's own folder: its rows stay as they are
    pairs = restore_pairs(old, paired.read(out / "predictions.parquet"), only)
    scratch = f"{out_dir}/.restore"
    for pair in pairs:
        print(f"restore: {pair['task']} {pair['method']}: seeds {pair['seeds']} at lr factor {pair['lr_factors'][0]:g}")
        shutil.rmtree(root / scratch, ignore_errors=True)
        study(methods=[], seeds=[], pairs=[pair], overrides=overrides, repo=str(root), out_dir=scratch,
              command=command, retries=retries)
        new = pd.read_csv(root / scratch / "study.csv")
        check_reproduced(old, new)
        out.mkdir(parents=True, exist_ok=True)
        if not in_place:  # the pair's earlier rows, sweep included, beside any rows the output already holds
            rows = old[(old["task"] == pair["task"]) & (old["method"] == pair["method"])]
            with atomic_path(out_csv) as tmp:
                (with_earlier_rows(rows, pd.read_csv(out_csv)) if out_csv.is_file() else rows).to_csv(tmp, index=False)
        preds = paired.read(root / scratch / "predictions.parquet")  # written last: they mark the pair done
        paired.write(out / "predictions.parquet", paired.with_earlier(preds, paired.read(out / "predictions.parquet")))
    shutil.rmtree(root / scratch, ignore_errors=True)
    if not out_csv.is_file():
        raise ConfigError(f"--restore-predictions {old_csv}: no selected rows to restore")
    commit = git_commit(root)[:12]
    note = (f"The rows restored by `--restore-predictions` (at git {commit}) have per-example predictions from "
            f"reruns of their selected runs, each of which reproduced its row's dev and validation scores exactly.")
    return rebuild([str(out_csv)], root, out_dir, command, overrides=overrides, note=note)


def rebuild(csvs: list[str], root: Path, out_dir: str, command: str, draws: int = paired.DRAWS,
            overrides: dict[str, Any] | None = None, only: list[str] | None = None, note: str = "") -> list[Path]:
    """The report of one or more earlier study.csv files (and the predictions beside each), without running
    anything: e.g. studies run in separate checkouts (one per task) merged into one report, or an older study
    redrawn by newer report code. ``overrides``: the -S settings every row ran with (they are in the header).
    ``only``: the study labels to keep (e.g. the rank sweep out of a larger study); every other row is left out.
    ``note``: a sentence for the header where the rows differ from its shared configuration (e.g. per task)."""
    frames = [pd.read_csv(c) for c in csvs]
    df = pd.concat(frames, ignore_index=True)
    # a run in two files is one run when its rows agree in every column (a study and its extension, or two
    # extensions of one study run side by side, all hold the study's rows): kept once. Rows that differ are
    # two runs under one name (e.g. the same row run again in another checkout): refused, never averaged.
    df = df.drop_duplicates(ignore_index=True)
    twice = df[df.duplicated(paired.KEYS, keep=False)]
    if len(twice):
        r = twice.iloc[0]

        def rows_of(f: pd.DataFrame) -> int:  # the rows of ``f`` that are this run
            return int((f[paired.KEYS] == r[paired.KEYS]).all(axis=1).sum())

        where = [shown_path(c, root) for c, f in zip(csvs, frames) if rows_of(f)]
        raise ConfigError(f"--report: the run {r['task']} {r['method']} seed {int(r['seed'])} lr factor "
                          f"{float(r['lr_factor']):g} has {rows_of(df)} different rows (in {', '.join(where)}); "
                          "give each run once, or drop the rows that ran again")
    if only is not None:
        unknown_label(only, df, "is in none of the study.csv files given to --report")
        df = df[df["method"].isin(only)].reset_index(drop=True)
    df = df.reindex(columns=list(dict.fromkeys([*COLUMNS, *df.columns])))
    df["selected"] = df["selected"].astype(str).str.lower().isin(["true", "1"])
    preds = paired.combine([earlier_predictions(c) for c in csvs]).drop_duplicates(ignore_index=True)
    conflicting = preds[preds.duplicated([*paired.KEYS, "example"])]
    if len(conflicting):
        r = conflicting.iloc[0]
        raise ConfigError(f"--report: the run {r['task']} {r['method']} seed {int(r['seed'])} lr factor "
                          f"{float(r['lr_factor']):g} has different per-example predictions in two of the files given")
    if only is not None and not preds.empty:
        preds = preds[preds["method"].isin(only)].reset_index(drop=True)
    # the header is made again from the configuration every row shares (params.yaml with ``overrides``, the
    # -S settings the studies ran with) and the rows themselves, never copied from an earlier study.md
    commits = list(dict.fromkeys(str(c) for c in df["git"].dropna()))
    factors = sorted({float(f) for f in df["lr_factor"].dropna()})
    factors_per_seed = df.groupby(["task", "method", "seed"])["lr_factor"].nunique()
    swept = factors_per_seed[factors_per_seed > 1].groupby(level=["task", "method"]).size()
    header = study_header(base_params(root, {**(overrides or {}), "registry.enabled": False}, df["task"].iloc[0]),
                          sorted({int(s) for s in df["seed"].dropna()}), factors, commits,
                          int(swept.max()) if len(swept) else 1)
    header += (" The configuration above is params.yaml at the time of drawing with the -S settings given to "
               "`--report`; each row's own is its `params_hash`.")
    if len(csvs) > 1:
        header += (" Merged from " + ", ".join(f"`{shown_path(c, root)}`" for c in csvs) + " (columns `git` and "
                   "`params_hash` of study.csv: the commit and configuration each row ran at).")
    if note:
        header += " " + note.strip()
    return write_report(root / out_dir, df, preds, header, command, draws)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Seeded method study with a per-method lr sweep on validation.")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--lr-factors", nargs="+", type=float, default=[0.5, 1.0, 2.0],
                    help="multiples of each method's recipe lr tried on the first --sweep-seeds seeds")
    ap.add_argument("--sweep-seeds", type=int, default=1,
                    help="how many of the first seeds run every lr factor: the factor with the best mean validation "
                         "score over them is chosen (the study protocol uses 2)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run, repeatable")
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--out", default="reports")
    ap.add_argument("--append", metavar="STUDY_CSV",
                    help="keep the rows of an earlier study.csv (except the methods run now) in the report")
    ap.add_argument("--extend-inconclusive", metavar="STUDY_CSV",
                    help=f"run only the new seeds (5 more, up to {paired.MAX_SEEDS}) of the (task, method) pairs "
                         "behind this study's inconclusive verdicts (targets, places against the frontier), at the lr "
                         "factor each pair's sweep chose, keeping every earlier row and prediction; pass the same -S "
                         "settings as the study it extends; with --methods, only those rows (a share for one of "
                         "several checkouts: merge their outputs with --report)")
    ap.add_argument("--report", nargs="+", metavar="STUDY_CSV",
                    help="run nothing: write the report of these study.csv files (merged, with the predictions "
                         "beside each) to --out; with --methods, of those rows only")
    ap.add_argument("--restore-predictions", metavar="STUDY_CSV",
                    help="run an earlier study's selected runs again to make the per-example predictions it lost "
                         "(another machine ran it); each rerun must reproduce its row's scores exactly; the rows "
                         "and predictions go to --out (resumable), then the report is drawn there")
    ap.add_argument("--note", default="", help="with --report: a sentence added to the report's header, where "
                                              "rows differ from the shared configuration (e.g. per task)")
    args = ap.parse_args(argv)
    root = Path(args.repo).resolve()
    command = shown_command(argv if argv is not None else sys.argv[1:], root)
    if args.report:
        missing = [c for c in args.report if not Path(c).is_file()]
        if missing:
            print(f"error: --report {missing[0]}: no such study.csv", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            overrides = dict(parse_override(s) for s in args.set)
            files = rebuild(args.report, root, args.out, command, overrides=overrides, only=args.methods,
                            note=args.note)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print("\n".join(str(f) for f in files))
        return 0
    if args.restore_predictions:
        if not Path(args.restore_predictions).is_file():
            print(f"error: --restore-predictions {args.restore_predictions}: no such study.csv", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            overrides = dict(parse_override(s) for s in args.set)
            files = restore(args.restore_predictions, root, args.out, command, overrides=overrides,
                            only=args.methods)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except NotReproduced as exc:
            print(f"error: restore: {exc}", file=sys.stderr)
            return 1
        print("\n".join(str(f) for f in files))
        return 0
    pairs = None
    if args.extend_inconclusive:
        if not Path(args.extend_inconclusive).is_file():
            print(f"error: --extend-inconclusive {args.extend_inconclusive}: no such study.csv", file=sys.stderr)
            return EXIT_BAD_INPUT
        try:
            pairs = extension_pairs(args.extend_inconclusive, only=args.methods)
        except ConfigError as exc:
            print(f"error: --extend-inconclusive: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if not pairs:
            among = f" among --methods {' '.join(args.methods)}" if args.methods else ""
            print(f"study: no inconclusive target left to extend{among} (or every one is at "
                  f"{paired.MAX_SEEDS} seeds)")
            return 0
        args.append = args.extend_inconclusive
    elif not args.methods:
        print("error: --methods is required (or --extend-inconclusive STUDY_CSV)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.sweep_seeds < 1:
        print(f"error: --sweep-seeds must be >= 1, got {args.sweep_seeds}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.append and not Path(args.append).is_file():
        print(f"error: --append {args.append}: no such study.csv", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        overrides = dict(parse_override(s) for s in args.set)
        specs = [(p["task"], p["method"]) for p in pairs] if pairs is not None else \
            [(t, m) for t in args.tasks or [None] for m in args.methods]
        for t, spec in specs:
            _, m, settings = parse_variant(spec)
            o = {**overrides, **settings, "method.name": m} | ({"task.name": t} if t else {})
            validate_overrides(root, o)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = study(methods=args.methods or [], seeds=args.seeds, tasks=args.tasks, lr_factors=args.lr_factors,
                   overrides=overrides, repo=str(root), out_dir=args.out, command=command,
                   append=args.append, pairs=pairs, sweep_seeds=args.sweep_seeds)
    print("\n".join(result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
