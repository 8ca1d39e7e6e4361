"""What the compare and study reports share: number formatting, the MLflow run that holds a report (its
description points to the report and chart among its artifacts) and the flow run's Prefect artifacts."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd

from stages.common.tracking import experiment_id, tracking_uri


def fmt_int(v: Any) -> str:
    """A count with thousands separators; "–" for a missing value."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{int(round(v)):,}"


def fmt(v: Any, digits: int = 1) -> str:
    """A number to ``digits`` decimals; "–" for a missing value."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report_note(kind: str, files: list[Path], df: pd.DataFrame) -> str:
    """The report run's description (one paragraph): what was compared, the best per task, where the report
    (``.md``), its chart (``.png``) and the per-run table (``.csv``) are among the run's artifacts."""
    named = {f.suffix: f"`{kind}/{f.name}`" for f in files}
    seeds = sorted({int(s) for s in df["seed"].dropna()}) if "seed" in df else []
    best = []
    for task, g in df.groupby("task", sort=False):
        means = g.groupby("method", sort=False)["score"].mean()
        if means.notna().any():
            method = means.idxmax()
            trivial = g["trivial_score"].astype(float).mean() if "trivial_score" in g else math.nan
            best.append(f"{task}: {method} {means[method]:.4f} {g['metric'].iloc[0]}"
                        + (f" (trivial predictor {trivial:.4f})" if not math.isnan(trivial) else ""))
    methods = ", ".join(dict.fromkeys(str(m) for m in df["method"]))
    return (f"{kind.capitalize()} of {methods} on {', '.join(dict.fromkeys(str(t) for t in df['task']))}"
            + (f", seeds {', '.join(map(str, seeds))}" if seeds else "") + f" ({len(df)} runs)."
            + (f" Best mean dev score per task: {'; '.join(best)}." if best else "")
            + f" The report is the artifact {named.get('.md', '–')}, its chart {named.get('.png', '–')} and one row "
            f"per run {named.get('.csv', '–')} (this run's Artifacts tab); each row's `mlflow_run_id` is that run's "
            "own pipeline run, with its model and metrics.")


def log_report_run(root: Path, experiment: str, files: list[Path], df: pd.DataFrame, tags: dict[str, str],
                   kind: str = "compare") -> str:
    """One MLflow run holding the report files (under ``<kind>/``), the mean metrics per task and method, and
    a description (:func:`report_note`) pointing to the report and chart."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(root))
    exp_id = experiment_id(client, experiment, root)
    run_id = client.create_run(exp_id, tags={"mlflow.runName": f"{kind} {time.strftime('%Y-%m-%d %H:%M')}",
                                             kind: "true", "mlflow.note.content": report_note(kind, files, df),
                                             **tags}).info.run_id
    ts = int(time.time() * 1000)
    items = []
    for (task, method), g in df.groupby(["task", "method"], sort=False):
        for col in ("score", "trainable_params", "stored_params", "bops_ratio_adapter", "train_seconds",
                    "peak_rss_mb", "latency_merged_ms"):
            if col not in g:
                continue
            value = g[col].astype(float).mean()
            if not math.isnan(value):
                # MLflow metric names allow letters, digits, _ - . space : / (a variant's [k=v] does not pass)
                key = re.sub(r"[^A-Za-z0-9_\-. :/]+", "_", f"{task}.{method}.{col}")
                items.append(Metric(key, float(value), ts, 0))
    client.log_batch(run_id, metrics=items)
    for f in files:
        client.log_artifact(run_id, str(f), kind)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def publish_report(root: Path, kind: str, report_markdown: str, results: list[dict[str, Any]],
                   rows: list[dict[str, Any]], report_run_id: str) -> dict[str, str]:
    """The compare/study flow run's Prefect artifacts: a markdown (the report, each run's story in one line,
    the MLflow links) and a table (``rows``, one per method and seed, with each run's bytes, decision and MLflow
    link). ``results``: the pipeline results the rows were made from, in the same order. Returns kind -> key;
    nothing outside a flow run (there is no run to attach them to)."""
    from prefect.context import FlowRunContext

    from flows.artifacts import RUNS_TABLE, SUMMARY, publish_markdown, publish_table
    from flows.summary import RunStory, run_url

    if FlowRunContext.get() is None:
        return {}
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    experiment = MlflowClient(uri).get_run(report_run_id).info.experiment_id
    link = run_url(uri, experiment, report_run_id)
    stories = [RunStory.from_result(r) for r in results]
    lines = [report_markdown.rstrip(), "", "## Runs", ""]
    for story, row in zip(stories, rows):
        seed = f" seed {row['seed']}" if "seed" in row else ""
        lr = f" lr {row['lr']:.1e}" if isinstance(row.get("lr"), float) else ""
        lines.append(f"- **{story.method}** on {story.task}{seed}{lr}: {story.score_text()}; {story.storage_text()}; "
                     f"{story.decision_text()}; [MLflow run]({story.run_link})")
    lines += ["", f"MLflow report run: [{report_run_id}]({link}) (the report, its chart and the table as artifacts "
              f"under `{kind}/`)"]
    table = [{**row, **story.table_fields()} for story, row in zip(stories, rows)]
    what = f"{kind}: {len(rows)} runs of {', '.join(dict.fromkeys(str(r['method']) for r in rows))}"
    return {SUMMARY: publish_markdown("\n".join(lines) + "\n", what, SUMMARY),
            RUNS_TABLE: publish_table(table, f"{what}, one row per run", RUNS_TABLE)}
