"""Prefect flow: run several methods (and optionally tasks and seeds) on the same data and budget,
and write one comparison table (Markdown + CSV), a plot, and an MLflow run holding all three (its
description points to them). The flow run carries the report as a Prefect markdown artifact and one row per
run as a table artifact (keys ``lora-sieve-compare-<deployment>-summary`` / ``-runs``).

Every combination is one run of :func:`flows.pipeline.pipeline` (so one DVC experiment each);
only the method/task/seed keys differ, the rest comes from params.yaml plus ``overrides``. The
``prepare`` stage is shared by every method of a task, so all methods see exactly the same data.
Registration is off by default (a sweep should not flood the registry)::

    python -m flows.compare --methods lora lora_drop                   # reports/compare.{md,csv,png}
    python -m flows.compare --methods lora lora_drop --seeds 1 2 3 --tasks sst2 rte
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger

from flows.pipeline import EXIT_BAD_INPUT, ROOT, parse_override, pipeline, validate_overrides
from flows.report import fmt, fmt_int, log_report_run, publish_report
from stages.common.io import atomic_path
from stages.common.params import ConfigError
from stages.common.plots import pyplot, save_png
from stages.common.tracking import git_commit, short_commit

COLUMNS = ["task", "method", "seed", "metric", "score", "validation_score", "trivial_score", "trainable_params", "stored_params", "pct_of_lora",
           "train_seconds", "peak_rss_mb", "peak_cuda_mb", "latency_merged_ms", "experiment", "mlflow_run_id"]


def combinations(methods: list[str], tasks: list[str] | None, seeds: list[int] | None,
                 overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """One override dict per run, task-major so the shared ``prepare`` output is reused."""
    runs = []
    for task_name, seed, method in product(tasks or [None], seeds or [None], methods):
        o = dict(overrides)
        o["method.name"] = method
        if task_name is not None:
            o["task.name"] = task_name
        if seed is not None:
            o["seed"] = seed
        runs.append(o)
    return runs


def row(result: dict[str, Any], seed: int, task: str, method: str) -> dict[str, Any]:
    m, ft = result["metrics"], result.get("finetune", {})
    ratio = m.get("trainable_ratio_to_lora")
    return {
        "task": task, "method": method, "seed": seed, "metric": m.get("main_metric", "score"),
        "score": m.get("score"), "validation_score": m.get("best_validation"),
        "trivial_score": m.get("trivial_score"), "trainable_params": m.get("trainable_params"),
        "stored_params": m.get("stored_params"), "pct_of_lora": None if ratio is None else 100 * ratio,
        "train_seconds": m.get("train_seconds", ft.get("seconds")), "peak_rss_mb": ft.get("peak_rss_mb"),
        "peak_cuda_mb": ft.get("peak_cuda_mb"), "latency_merged_ms": m.get("latency_merged_ms"),
        "experiment": result.get("experiment"), "mlflow_run_id": result.get("mlflow_run_id"),
    }


def markdown(df: pd.DataFrame, header: str) -> str:
    """Mean (± std over seeds when there are several) per task and method."""
    lines = [header, "",
             "| task | method | metric | score (dev) | trivial | trainable params | stored params | % of LoRA | train time (s) "
             "| peak RSS (MB) | latency merged (ms/batch) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cuda = df["peak_cuda_mb"].notna().any()
    if cuda:
        lines[2] = lines[2].replace("| peak RSS (MB) |", "| peak RSS (MB) | peak GPU (MB) |")
        lines[3] += "---|"
    for (task, method), g in df.groupby(["task", "method"], sort=False):
        score = g["score"].astype(float)
        shown = f"{score.mean():.4f}"
        if len(g) > 1:
            shown += f" ± {score.std(ddof=1):.4f} (n={len(g)})"
        cells = [task, method, g["metric"].iloc[0], shown, fmt(g["trivial_score"].astype(float).mean(), 4),
                 fmt_int(g["trainable_params"].mean()),
                 fmt_int(g["stored_params"].mean()), fmt(g["pct_of_lora"].mean()),
                 fmt(g["train_seconds"].mean()), fmt(g["peak_rss_mb"].mean(), 0)]
        if cuda:
            cells.append(fmt(g["peak_cuda_mb"].mean(), 0))
        cells.append(fmt(g["latency_merged_ms"].mean(), 2))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(df: pd.DataFrame, path: Path) -> None:
    """Left: task metric per method (error bars over seeds). Right: metric against trainable params."""
    plt = pyplot()
    tasks = list(dict.fromkeys(df["task"]))
    methods = list(dict.fromkeys(df["method"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        sub = df[df["method"] == method].groupby("task", sort=False)["score"]
        mean, std = sub.mean().reindex(tasks), sub.std(ddof=1).reindex(tasks).fillna(0.0)
        ax1.bar([t + i * width for t in range(len(tasks))], mean, width, yerr=std, capsize=3, label=method)
        pts = df[df["method"] == method]
        ax2.scatter(pts["trainable_params"], pts["score"], label=method, s=40)
    ax1.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))],
                   [f"{t}\n({df[df['task'] == t]['metric'].iloc[0]})" for t in tasks])
    ax1.set_ylabel("task metric (dev)")
    lo = float(df["score"].min())
    ax1.set_ylim(max(0.0, lo - 0.1) if lo > 0 else lo - 0.1, None)
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    sizes = df["trainable_params"].astype(float)
    if sizes.min() > 0 and sizes.max() / sizes.min() > 10:  # log only pays off across orders of magnitude
        ax2.set_xscale("log")
    else:
        ax2.ticklabel_format(axis="x", style="plain")
    ax2.set_xlabel("trainable parameters")
    ax2.set_ylabel("task metric (dev)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


@flow(name="lora-sieve-compare", log_prints=True)
def compare(methods: list[str], tasks: list[str] | None = None, seeds: list[int] | None = None,
            overrides: dict[str, Any] | None = None, repo: str = str(ROOT), out_dir: str = "reports",
            register_models: bool = False, retries: int = 2) -> dict[str, Any]:
    """Run every (task, seed, method) and write ``<out_dir>/compare.{md,csv,png}``; returns the rows."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    base = dict(overrides or {})
    base["registry.enabled"] = bool(register_models)
    if not methods:
        raise ConfigError("compare needs at least one method")
    runs = combinations(methods, tasks, seeds, base)
    params = [validate_overrides(root, o) for o in runs]  # every combination is valid before the first runs
    logger.info("comparing %d runs: methods=%s tasks=%s seeds=%s", len(runs), methods, tasks or "params.yaml",
                seeds or "params.yaml")
    rows, results = [], []
    for o, p in zip(runs, params):
        name = f"cmp-{p.task.name}-{p.method.name}-s{p.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = pipeline(overrides=o, repo=str(root), experiment_name=name, retries=retries)
        rows.append(row(result, p.seed, p.task.name, p.method.name))
        results.append(result)
        logger.info("%s on %s (seed %d): %s = %s", p.method.name, p.task.name, p.seed, rows[-1]["metric"],
                    rows[-1]["score"])
    df = pd.DataFrame(rows, columns=COLUMNS)
    out = root / out_dir
    p0 = params[0]
    header = (f"Model `{p0.model.name}`, train size {p0.data.train_size}, {p0.train.epochs} epoch(s), "
              f"batch {p0.train.batch_size}, adapter rank {p0.adapter.rank} on `{p0.adapter.targets}`; "
              f"dev-set metric (the epoch chosen on the validation split carved from train); git {short_commit(git_commit(root))}, {time.strftime('%Y-%m-%d')}.")
    files = [out / "compare.md", out / "compare.csv", out / "compare.png"]
    with atomic_path(files[1]) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(files[0]) as tmp:
        tmp.write_text(markdown(df, header))
    plot(df, files[2])
    run_id = log_report_run(root, p0.tracking.experiment, files, df,
                         {"methods": ",".join(methods), "overrides": json.dumps(base, default=str)[:5000]})
    artifacts = publish_report(root, "compare", markdown(df, header), results, rows, run_id)
    print(markdown(df, header))
    return {"rows": rows, "files": [str(f) for f in files], "mlflow_run_id": run_id, "artifacts": artifacts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare methods on the same data and budget.")
    ap.add_argument("--methods", nargs="+", required=True)
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every run, repeatable")
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--out", default="reports")
    ap.add_argument("--register", action="store_true", help="also register each model in the MLflow registry")
    args = ap.parse_args(argv)
    root = Path(args.repo).resolve()
    try:
        overrides = dict(parse_override(s) for s in args.set)
        for o in combinations(args.methods, args.tasks, args.seeds, overrides):
            validate_overrides(root, o)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = compare(methods=args.methods, tasks=args.tasks, seeds=args.seeds, overrides=overrides,
                     repo=str(root), out_dir=args.out, register_models=args.register)
    print("\n".join(result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
