"""The study's paired statistics: per-run dev predictions, paired differences by seed, and the papers'
targets as met / not met / inconclusive (``lora_ops.stats``: hierarchical bootstrap, Holm).

A study keeps every run's per-example dev predictions in ``<out>/predictions.parquet``::

    task, method, seed, lr_factor, example, prediction, label

(``method`` is the study label, a variant included; ``lr_factor`` tells the chosen run of the first seed from
its sweep siblings; ``prediction`` is the argmax class, or the value for regression; both prediction and label
are float64 here, whatever the task). The comparisons use the *selected* runs of study.csv only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lora_ops.methods.base import PaperTarget, method_class, reference_method
from lora_ops.stats import (
    INCONCLUSIVE,
    MET,
    NOT_MET,
    PairedDifference,
    ScoreInterval,
    SeedRun,
    Target,
    Verdict,
    format_interval,
    paired_difference,
    score_interval,
    seeds_to_extend,
    task_metric,
    verdicts,
)
from stages.common.io import write_parquet

KEYS = ["task", "method", "seed", "lr_factor"]
COLUMNS = [*KEYS, "example", "prediction", "label"]
#: metrics computed on values, not on classes
VALUE_METRICS = {"pearson", "spearman"}
DRAWS = 2000  # bootstrap resamples per comparison (seeded: the report's numbers are reproducible)
MAX_SEEDS = 10  # the sequential protocol's cap


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("lr_factor", "prediction", "label")
                                      else "int64" if c in ("seed", "example") else "object") for c in COLUMNS})


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """The study file's column order and types (the same bytes for the same content)."""
    df = df.reindex(columns=COLUMNS)
    return df.astype({"task": "object", "method": "object", "seed": "int64", "lr_factor": "float64",
                      "example": "int64", "prediction": "float64", "label": "float64"}).reset_index(drop=True)


def run_predictions(path: Path, row: Mapping[str, Any]) -> pd.DataFrame | None:
    """One run's ``data/evaluate/predictions.parquet`` keyed by the study row it belongs to; None when the run
    wrote none or an empty one (a causal LM is scored on corpora, not per example)."""
    if not path.is_file():
        return None
    df = pd.read_parquet(path)
    if df.empty:
        return None
    return typed(df.assign(**{k: row[k] for k in KEYS}))


def combine(frames: Sequence[pd.DataFrame | None]) -> pd.DataFrame:
    kept = [f for f in frames if f is not None and not f.empty]
    return typed(pd.concat(kept, ignore_index=True)) if kept else empty()


def read(path: Path) -> pd.DataFrame:
    """A study's predictions file; an empty frame when there is none (a study from before they were kept)."""
    return typed(pd.read_parquet(path)) if path.is_file() else empty()


def write(path: Path, df: pd.DataFrame) -> None:
    write_parquet(path, typed(df))


def not_rerun(earlier: pd.DataFrame, new: pd.DataFrame,
              extended: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()) -> list[bool]:
    """Which of ``earlier``'s rows (study.csv rows or predictions) stand beside ``new``'s: those of (task, method)
    pairs ``new`` has not run again; of a pair in ``extended`` (more seeds of the same runs), every row but the
    runs ``new`` has again (same seed and lr factor)."""
    ran = set(zip(new["task"], new["method"]))
    runs = set(zip(new["task"], new["method"], new["seed"].astype(int), new["lr_factor"].astype(float)))
    return [(t, m) not in ran or ((t, m) in extended and (t, m, int(x), float(f)) not in runs)
            for t, m, x, f in zip(earlier["task"], earlier["method"], earlier["seed"], earlier["lr_factor"])]


def with_earlier(new: pd.DataFrame, earlier: pd.DataFrame,
                 extended: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()) -> pd.DataFrame:
    """``earlier`` predictions first, without the (task, method) pairs ``new`` has run again (as study.csv's
    ``--append``; a pair in ``extended`` keeps its earlier runs'), then ``new``'s."""
    return combine([earlier[not_rerun(earlier, new, extended)] if len(earlier) else earlier, new])


def selected(df: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """The predictions of study.csv's selected runs (the chosen lr of every seed)."""
    if preds.empty:
        return preds
    sel = df.loc[df["selected"], KEYS].drop_duplicates()
    sel = sel.astype({"seed": "int64", "lr_factor": "float64"})
    return preds.merge(sel, on=KEYS, how="inner")


def seed_runs(preds: pd.DataFrame, task: str, label: str, metric: str) -> list[SeedRun]:
    g = preds[(preds["task"] == task) & (preds["method"] == label)]
    cast = np.float64 if metric in VALUE_METRICS else np.int64
    return [SeedRun(int(seed), r.sort_values("example")["prediction"].to_numpy(cast),
                    r.sort_values("example")["label"].to_numpy(cast))
            for seed, r in g.groupby("seed", sort=True)]


def difference(preds: pd.DataFrame, task: str, label: str, against: str, metric: str, draws: int = DRAWS
               ) -> PairedDifference | None:
    """``label − against`` in points, paired by seed; None without predictions of both on a common seed."""
    mine, theirs = seed_runs(preds, task, label, metric), seed_runs(preds, task, against, metric)
    if not {r.seed for r in mine} & {r.seed for r in theirs}:
        return None
    return paired_difference(mine, theirs, task_metric(metric), scale=100.0, draws=draws)


def interval(preds: pd.DataFrame, task: str, label: str, metric: str, draws: int = DRAWS) -> ScoreInterval | None:
    """``label``'s mean dev score over its seeds with a 95 % hierarchical-bootstrap interval, in points; None
    without per-example predictions."""
    runs = seed_runs(preds, task, label, metric)
    return score_interval(runs, task_metric(metric), scale=100.0, draws=draws) if runs else None


def intervals(s: pd.DataFrame, preds: pd.DataFrame, draws: int = DRAWS) -> dict[tuple[str, str], ScoreInterval]:
    """:func:`interval` of every (task, label) of a study summary that has predictions: computed once per
    report, read by its table and its chart."""
    out = {}
    for _, r in s.iterrows():
        ci = interval(preds, str(r["task"]), str(r["method"]), str(r["metric"]), draws) if not preds.empty else None
        if ci is not None:
            out[(str(r["task"]), str(r["method"]))] = ci
    return out


def is_peer(label: str) -> bool:
    """A peer baseline (PEFT's own alternatives, Method.study_peer): compared against, not compared."""
    cls = method_class(label)
    return cls is not None and cls.study_peer


@dataclass(frozen=True)
class Comparison:
    task: str
    method: str
    against: str
    metric: str
    difference: PairedDifference | None


def comparisons(s: pd.DataFrame, preds: pd.DataFrame, draws: int = DRAWS) -> list[Comparison]:
    """Every method against the reference method, and every non-peer against every peer, per task (``s``:
    the study's summary, one row per task and method label)."""
    reference = reference_method()
    out: list[Comparison] = []
    for task, g in s.groupby("task", sort=False):
        labels = [str(m) for m in g["method"]]
        metric = str(g["metric"].iloc[0])
        peers = [p for p in labels if is_peer(p)]
        for label in labels:
            if label == reference:
                continue
            against = ([reference] if reference in labels else []) + ([] if is_peer(label) else peers)
            out += [Comparison(str(task), label, a, metric, difference(preds, str(task), label, a, metric, draws))
                    for a in against]
    return out


def sign(d: PairedDifference) -> str:
    """MET (the 95 % interval above 0), NOT_MET (below) or INCONCLUSIVE: this comparison alone, uncorrected."""
    return verdicts([Target("", d, 0.0)])[0].verdict


def sign_word(d: PairedDifference) -> str:
    """Higher / lower / no clear difference: :func:`sign` in words."""
    return {MET: "higher", NOT_MET: "**lower**"}.get(sign(d), "no clear difference")


def per_seed_text(d: PairedDifference) -> str:
    return ", ".join(f"s{seed} {v:+.2f}" for seed, v in sorted(d.per_seed.items()))


def section(items: Sequence[Comparison], draws: int = DRAWS) -> list[str]:
    """The report's "Paired differences" section (markdown lines)."""
    if not items:
        return []
    lines = ["", "## Paired differences", "",
             "Method minus the one compared with, in points of the dev metric, paired by seed: mean over the "
             "common seeds, 95 % interval of a hierarchical bootstrap (seeds, then dev examples, the same examples "
             f"for both; {draws} resamples), each seed's own difference, and whether the interval lies above or "
             "below 0 (this comparison alone; the targets below are Holm-corrected).", "",
             "| task | method | against | metric | Δ mean (pt) | 95 % interval | seeds | per seed | sign |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in items:
        d = c.difference
        if d is None:
            lines.append(f"| {c.task} | {c.method} | {c.against} | {c.metric} | – | – | 0 | "
                         "no per-example predictions on a common seed | – |")
            continue
        lines.append(f"| {c.task} | {c.method} | {c.against} | {c.metric} | {d.mean:+.2f} | "
                     f"[{d.low:+.2f}, {d.high:+.2f}] | {len(d.per_seed)} | {per_seed_text(d)} | {sign_word(d)} |")
    return lines


@dataclass(frozen=True)
class TargetCheck:
    """A paper target with its verdict: ``method`` and ``against`` are study labels."""

    task: str
    method: str
    against: str
    target: PaperTarget
    difference: PairedDifference | None
    verdict: str
    test: Verdict | None = None  # the Holm-corrected test behind ``verdict`` (None: nothing to test)

    @property
    def holm(self) -> str:
        """The one-sided bootstrap p-value on the side the mean lies, against the level Holm's procedure tested
        it at: why an uncorrected 95 % interval that clears the margin can still be inconclusive."""
        if self.test is None or self.difference is None:
            return "–"
        t = self.test
        above = t.verdict == MET or (t.verdict != NOT_MET and self.difference.mean > self.target.threshold)
        p, level = (t.p_met, t.level_met) if above else (t.p_not_met, t.level_not_met)
        return f"{'above' if above else 'below'}: {p:.4f} {'≤' if p <= level else '>'} {level:.4f}"

    @property
    def measured(self) -> str:
        parts = [f"{format_interval(self.difference)} pt, {len(self.difference.per_seed)} seeds"
                 if self.difference is not None else "no per-example predictions"]
        if self.target.condition:
            parts.append(self.target.condition)
        return "; ".join(parts)

    @property
    def shown(self) -> str:
        return "**not met**" if self.verdict == NOT_MET else self.verdict


def check_targets(s: pd.DataFrame, preds: pd.DataFrame, alpha: float = 0.05, draws: int = DRAWS
                  ) -> list[TargetCheck]:
    """Each method's paper targets (Method.paper_targets) with a verdict: the paired interval against the
    target's margin, Holm-corrected across every target of the report; a failed side-condition is *not met*;
    a target without predictions of both methods is *inconclusive*."""
    reference = reference_method()
    pending: list[Pending] = []
    for task, g in s.groupby("task", sort=False):
        by: dict[str, Any] = {}
        for _, r in g.iterrows():  # a method's first row (plain, or its first variant) stands for it
            by.setdefault(str(r["method"]).split("[", 1)[0], r)
        if reference not in by:
            continue
        metric = str(g["metric"].iloc[0])
        for name in by:
            cls = method_class(name)
            if cls is None:
                continue
            for t in cls().paper_targets(str(task), by, by[reference]):
                other = t.against or reference
                if other not in by:
                    continue
                me, them = str(by[name]["method"]), str(by[other]["method"])
                pending.append((str(task), me, them, t, difference(preds, str(task), me, them, metric, draws)))
    return judged(pending, alpha)


Pending = tuple[str, str, str, PaperTarget, PairedDifference | None]  # task, method, against, target, difference


def judged(pending: Sequence[Pending], alpha: float = 0.05) -> list[TargetCheck]:
    """One Holm family: every claim with a difference is tested together; one without (no common seed) is
    inconclusive; a failed side-condition is *not met* whatever its test says (the test still takes its place
    in the family, so the other claims keep their own levels)."""
    tested = [Target(t.what, d, t.threshold) for *_, t, d in pending if d is not None]
    tests = iter(verdicts(tested, alpha))
    out = []
    for task, me, them, t, d in pending:
        test = next(tests) if d is not None else None
        word = test.verdict if test is not None else INCONCLUSIVE
        out.append(TargetCheck(task, me, them, t, d, NOT_MET if not t.condition_met else word, test))
    return out


def targets_section(checks: Sequence[TargetCheck]) -> list[str]:
    if not checks:
        return []
    return ["", "## Targets", "",
            "The papers' trends as paired claims (`method − against > margin`, points): **met** only when the whole "
            f"Holm-corrected interval (over the {len(checks)} targets of this report) clears the margin, **not met** "
            "when it lies wholly on the wrong side or a stated side-condition fails, else inconclusive. The interval "
            "shown is the uncorrected 95 % one; the test column gives the one-sided bootstrap p-value on the side "
            "the mean lies and the level Holm's procedure tested it at (a verdict needs p ≤ level).", "",
            "| target | against | margin (pt) | measured | test: p vs Holm level | verdict |",
            "|---|---|---|---|---|---|"] + [
        f"| {c.target.what} | {c.against} | {c.target.threshold:+g} | {c.measured} | {c.holm} | {c.shown} |"
        for c in checks]


def seeds_of(df: pd.DataFrame, task: str, label: str) -> list[int]:
    g = df[df["selected"] & (df["task"] == task) & (df["method"] == label)]
    return sorted({int(x) for x in g["seed"]})


@dataclass(frozen=True)
class Undecided:
    """An inconclusive paired verdict that is not a paper target (e.g. a row against the LoRA-by-rank frontier
    point at its size): what :func:`extension` needs of it."""

    task: str
    method: str
    against: str
    verdict: str = INCONCLUSIVE


def extension(df: pd.DataFrame, checks: Sequence[TargetCheck | Undecided], max_seeds: int = MAX_SEEDS
              ) -> dict[tuple[str, str], list[int]]:
    """The sequential protocol: the (task, method) pairs of the inconclusive targets, with the seeds each should
    have (its seeds, then the next unused ones, up to :func:`lora_ops.stats.seeds_to_extend`'s count). Both
    sides of a target are extended to the same count: a difference is only paired on the seeds both ran, so
    the step counts from the seeds the two sides share (LoRA at 10 seeds for one target still pairs with a
    5-seed method on 5)."""
    wanted: dict[tuple[str, str], int] = {}
    for c in checks:
        if c.verdict != INCONCLUSIVE:
            continue
        sides = [(c.task, c.method), (c.task, c.against)]
        n = len(set(seeds_of(df, *sides[0])) & set(seeds_of(df, *sides[1])))
        more = seeds_to_extend({f"{c.task}/{c.method}": INCONCLUSIVE}, n, max_seeds=max_seeds)
        if not more:
            continue
        for side in sides:
            wanted[side] = max(wanted.get(side, 0), *more.values())
    out: dict[tuple[str, str], list[int]] = {}
    for (task, label), n in wanted.items():
        seeds = seeds_of(df, task, label)
        nxt = max(seeds, default=0) + 1
        while len(seeds) < n:
            seeds.append(nxt)
            nxt += 1
        out[(task, label)] = seeds
    return out
