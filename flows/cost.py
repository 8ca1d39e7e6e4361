"""What a study cost: CPU hours of its runs, per stage of the sequential protocol and per trained row.

Each study row carries ``train_seconds`` (its training, also when DVC served that training from its run cache)
and ``run_seconds``, the wall time of its pipeline run in this study (every stage DVC did not serve from its
cache). The studies run one thread per run, so wall time is CPU time plus any wait for a core. Two figures follow:

* *measured*: ``run_seconds`` summed, what the clock saw. A run whose training came from DVC's cache (a
  compress variant beside the row it reuses, or a study resumed after an interruption) costs little here.
* *fresh*: what the same runs cost on a machine with an empty cache: every distinct training (task, training
  row, seed, lr; a ``+compress`` row trains what the row before its ``+compress`` trains) once, at its
  median ``train_seconds``, plus the median time outside training that the timed runs measured, per run.

Rows from before ``run_seconds`` existed count in *fresh* only; the report says how many there are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

HOUR = 3600.0


@dataclass(frozen=True)
class Overhead:
    """Median measured seconds outside training: of a run that trained, and of one that reused a training."""

    trained: float
    reused: float


@dataclass(frozen=True)
class Cost:
    """Runs and CPU hours of a set of study rows."""

    runs: int
    trainings: int  # distinct trainings among the runs
    measured_h: float  # sum of run_seconds over the runs that have it
    untimed: int  # runs without run_seconds
    fresh_h: float  # the estimate for an empty cache


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series(math.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce")


def _trained(df: pd.DataFrame) -> pd.Series:
    """Whether each run trained; without the column, a run that took less time than its training did not."""
    if "trained" not in df.columns:
        return ~(_numeric(df, "run_seconds") < _numeric(df, "train_seconds"))
    return df["trained"].astype(str).str.lower().isin(["true", "1"])


def beside_training(df: pd.DataFrame) -> pd.Series:
    """Per timed run that trained, its seconds outside training (``run_seconds - train_seconds``); a run whose
    training DVC served from its cache says nothing about that cost and is left out."""
    return (_numeric(df, "run_seconds") - _numeric(df, "train_seconds"))[_trained(df)].dropna()


def overheads(df: pd.DataFrame) -> Overhead:
    """From the timed runs: median ``run_seconds - train_seconds`` of those that trained, median ``run_seconds``
    of those that did not (0 where none were timed). Medians: a run served whole from the cache is an outlier."""
    rest = beside_training(df)
    reused = _numeric(df, "run_seconds")[~_trained(df)].dropna()
    return Overhead(float(rest.median()) if len(rest) else 0.0, float(reused.median()) if len(reused) else 0.0)


def training_keys(rows: pd.DataFrame, training_label: Callable[[str], str]) -> pd.Series:
    """Per run, the training it needs: (task, training row, seed, lr)."""
    return pd.Series([(str(t), training_label(str(m)), int(s), float(lr)) for t, m, s, lr in
                      zip(rows["task"], rows["method"], rows["seed"], rows["lr"])], index=rows.index, dtype=object)


def cost(rows: pd.DataFrame, overhead: Overhead, training_label: Callable[[str], str]) -> Cost:
    """The cost of ``rows`` (:class:`Cost`); each distinct training at the median ``train_seconds`` its runs
    recorded (runs side by side under contention record the same training at different times)."""
    run = _numeric(rows, "run_seconds")
    keys = training_keys(rows, training_label)
    train = _numeric(rows, "train_seconds").groupby(keys.map(str)).median().fillna(0.0)
    trainings = len(train)
    fresh = train.sum() + overhead.trained * trainings + overhead.reused * (len(rows) - trainings)
    return Cost(runs=len(rows), trainings=trainings, measured_h=float(run.sum()) / HOUR,
                untimed=int(run.isna().sum()), fresh_h=float(fresh) / HOUR)


def first_stage(df: pd.DataFrame) -> pd.Series:
    """Per run, whether it belongs to the sequential protocol's first stage: its seed is no later than the last
    seed every row of its task ran (the lr sweep included); later seeds extend the study."""
    every_row = df.groupby(["task", "method"])["seed"].transform("max").groupby(df["task"]).transform("min")
    return df["seed"] <= every_row


def _row(name: str, c: Cost) -> str:
    return (f"| {name} | {c.runs} | {c.trainings} | {c.measured_h:.2f} | {c.untimed or '–'} | "
            f"**{c.fresh_h:.2f}** |")


def section(df: pd.DataFrame, training_label: Callable[[str], str], top: int = 5) -> list[str]:
    """Markdown lines: the study's CPU hours by protocol stage, and the ``top`` most costly trained rows (each
    with the rows that reuse its training)."""
    if df.empty or "train_seconds" not in df.columns:
        return []
    df = df.dropna(subset=["seed", "lr"])
    overhead = overheads(df)
    in_first = first_stage(df)
    head = ["| | runs | trainings | measured h | untimed runs | h, empty cache |", "|---|---:|---:|---:|---:|---:|"]
    lines = ["", "## Cost", "",
             "Hours of single-thread runs, by the wall clock: CPU hours, plus any wait for a core while runs shared "
             "the machine. *Measured*: each run's `run_seconds` summed, what the clock saw here (a training DVC "
             "served from its run cache costs next to nothing; rows from before the column existed are untimed). "
             "*Empty cache*: an estimate of the same runs on a fresh machine, every distinct training once at its "
             "`train_seconds` (a `+compress` row reuses the training of the row before its `+compress`), plus the "
             f"median time outside training the timed runs measured: {overhead.trained:.0f} s for a run that "
             f"trains, {overhead.reused:.0f} s for one that reuses a training.", "", *head,
             _row("first stage: the seeds every row ran, lr sweep included", cost(df[in_first], overhead, training_label))]
    if (~in_first).any():
        lines.append(_row("later seeds: the sequential extension", cost(df[~in_first], overhead, training_label)))
    lines.append(_row("all", cost(df, overhead, training_label)))
    groups = df.assign(_trains=[training_label(str(m)) for m in df["method"]]).groupby(["task", "_trains"])
    per_row = sorted(((cost(g, overhead, training_label), f"{task} {label}") for (task, label), g in groups),
                     key=lambda x: -x[0].fresh_h)
    lines += ["", f"The {min(top, len(per_row))} most costly trained rows (each with the rows that reuse its "
              "training):", "", *head]
    lines += [_row(name, c) for c, name in per_row[:top]]
    return lines
