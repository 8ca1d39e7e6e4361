"""What a study cost: the measured time of its runs, per stage of the sequential protocol and per row.

Each study row carries ``run_seconds``, the wall time of its pipeline run (every stage DVC did not serve from
its run cache; a compress row beside the row whose training it reuses counts only its own stages). The
studies run one thread per run, so a run's wall time is its CPU time. Rows from before the column existed
have only ``train_seconds``: they are counted apart, estimated from the timed runs (:func:`overheads`), and
the report says how many there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

HOUR = 3600.0


@dataclass(frozen=True)
class Cost:
    """Runs and CPU hours of a set of study rows."""

    runs: int
    trained: int
    measured_h: float  # sum of run_seconds over the rows that have it
    estimated_runs: int  # rows without run_seconds
    estimated_h: float  # their train_seconds plus the measured mean time outside training

    @property
    def total_h(self) -> float:
        return self.measured_h + self.estimated_h


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series(math.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce")


def _trained(df: pd.DataFrame) -> pd.Series:
    if "trained" not in df.columns:
        return pd.Series(True, index=df.index)
    return df["trained"].astype(str).str.lower().isin(["true", "1"])


@dataclass(frozen=True)
class Overhead:
    """Mean measured seconds outside training: of a run that trained, and of one that reused a training."""

    trained: float
    reused: float


def overheads(df: pd.DataFrame) -> Overhead:
    """From the timed runs: mean ``run_seconds - train_seconds`` of those that trained, mean ``run_seconds`` of
    those that did not (0 where none were timed)."""
    run, trained = _numeric(df, "run_seconds"), _trained(df)
    rest = (run - _numeric(df, "train_seconds"))[trained].dropna()
    reused = run[~trained].dropna()
    return Overhead(float(rest.mean()) if len(rest) else 0.0, float(reused.mean()) if len(reused) else 0.0)


def cost(rows: pd.DataFrame, overhead: Overhead) -> Cost:
    """The cost of ``rows``; an untimed row that trained is its training time plus ``overhead.trained``, one
    that reused a training ``overhead.reused``."""
    run = _numeric(rows, "run_seconds")
    untimed = run.isna()
    trained = _trained(rows)
    train = _numeric(rows, "train_seconds").fillna(0.0)
    estimate = (train + overhead.trained).where(trained, overhead.reused)[untimed]
    return Cost(runs=len(rows), trained=int(trained.sum()), measured_h=float(run.sum()) / HOUR,
                estimated_runs=int(untimed.sum()), estimated_h=float(estimate.sum()) / HOUR)


def first_stage_seeds(df: pd.DataFrame) -> int:
    """The seeds every row ran (1..n): the sequential protocol's first stage; further seeds extend it."""
    return int(df.groupby(["task", "method"])["seed"].max().min())


def _row(name: str, c: Cost) -> str:
    estimated = f"{c.estimated_h:.2f} ({c.estimated_runs})" if c.estimated_runs else "–"
    return f"| {name} | {c.runs} | {c.trained} | {c.measured_h:.2f} | {estimated} | **{c.total_h:.2f}** |"


def section(df: pd.DataFrame, top: int = 5) -> list[str]:
    """Markdown lines: the study's CPU hours by protocol stage, and the ``top`` most costly rows."""
    if df.empty or ("run_seconds" not in df.columns and "train_seconds" not in df.columns):
        return []
    overhead = overheads(df)
    n = first_stage_seeds(df)
    first = df[df["seed"].astype(int) <= n]
    later = df[df["seed"].astype(int) > n]
    head = ["| | runs | trained | measured CPU h | estimated CPU h (rows) | CPU h |", "|---|---:|---:|---:|---:|---:|"]
    lines = ["", "## Cost", "",
             "CPU hours of the runs behind this report, one thread per run (wall time = CPU time): each row's "
             "`run_seconds` summed; a row that reuses another row's training (a compress variant) counts only "
             "its own stages, a row served whole from DVC's run cache next to nothing. Rows from before "
             "`run_seconds` existed are estimated from the timed ones: their `train_seconds` plus the mean time "
             f"a timed run that trained spent outside training ({overhead.trained:.0f} s), or the mean time of a "
             f"timed run that reused a training ({overhead.reused:.0f} s). Two runs side by side share the 2 cores, so times "
             "include that contention.", "", *head,
             _row(f"seeds 1–{n} (lr sweep and the first stage)", cost(first, overhead))]
    if len(later):
        last = int(later["seed"].astype(int).max())
        lines.append(_row(f"seeds {n + 1}–{last} (the sequential extension)", cost(later, overhead)))
    lines.append(_row("all", cost(df, overhead)))
    per_row = sorted(((cost(g, overhead), f"{task} {label}") for (task, label), g in df.groupby(["task", "method"])),
                     key=lambda x: -x[0].total_h)
    lines += ["", f"The {min(top, len(per_row))} most costly rows:", "", *head]
    lines += [_row(name, c) for c, name in per_row[:top]]
    return lines
