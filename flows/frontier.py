"""The LoRA-by-rank frontier: the baseline every compressed adapter must beat.

Plain LoRA (the reference method) trained at several ranks, each stored as trained (fp32) and with int8 / int4
factors (``compress.rank: none``), gives the cheapest way to buy dev quality with stored bytes that needs no
compression method at all. A study row counts as a saving only if it lies *above* that frontier: better dev at
no more stored bytes, or the same dev (within a margin) as a frontier point that stores more.

Everything here is read from the study's summary (one row per task and label, with ``bytes_mean``) and the
runs' per-example dev predictions, and every claim is a paired difference by seed (:mod:`flows.paired`).
Which rows form the frontier is read from the study label itself (:func:`flows.variants.parse_variant`'s
settings), never from a method's name beyond "the reference method".

The compress issue's targets are checked here too (:func:`compress_targets`): the best compressed adapter
within ``margin`` points of rank-8 LoRA at <= 2 % of its fp32 bytes, fewer bytes than the PEFT-style trim
(``rank: svd``, ``budget: energy``) at equal dev, and the ``output`` criterion against ``svd`` at the same
number of components.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from flows import paired
from lora_ops.methods.base import PaperTarget
from lora_ops.stats import INCONCLUSIVE, MET, NOT_MET, PairedDifference, format_interval

#: non-inferiority margin (dev points) for "the same dev": the compress stage's default tolerance
MARGIN = 0.5
#: the compress issue's size target: share of rank-8 LoRA's fp32 bytes
SIZE_TARGET_PCT = 2.0

Settings = Mapping[str, Any]
Parser = Callable[[str], tuple[str, str, dict[str, Any]]]


@dataclass(frozen=True)
class Point:
    """One (task, label) of the study placed on the bytes axis."""

    label: str
    stored_bytes: float
    score: float  # mean dev score over seeds, in points
    settings: Settings
    stored_params: float = math.nan  # the other axis of the chart: what the adapter stores, in parameters


def _points(s: pd.DataFrame, task: str, parse: Parser) -> list[Point]:
    g = s[(s["task"] == task) & s["bytes_mean"].notna()] if "bytes_mean" in s.columns else s.iloc[0:0]
    return [Point(str(r["method"]), float(r["bytes_mean"]), 100 * float(r["score_mean"]), parse(str(r["method"]))[2],
                  float(r["stored_mean"]))
            for _, r in g.iterrows()]


def is_frontier(label: str, parse: Parser, reference: str | None) -> bool:
    """A frontier row: the reference method, uncompressed or with fixed-bit factors and every component kept,
    with no other setting than its rank."""
    _, method, settings = parse(label)
    extra = {k for k in settings if not k.startswith("compress.") and k != "adapter.rank"}
    return method == reference and settings.get("compress.rank") == "none" and not extra


def frontier(points: Sequence[Point], size: Callable[[Point], float] = lambda p: p.stored_bytes) -> list[Point]:
    """The upper envelope: frontier points sorted by ``size`` (bytes by default), each better than every smaller one."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (size(p), -p.score)):
        if not out or p.score > out[-1].score:
            out.append(p)
    return out


@dataclass(frozen=True)
class Placement:
    """A study row against the frontier: ``at_size`` is the best frontier point storing no more bytes (the
    difference ``label − at_size`` decides "above"), ``matched`` the largest frontier point it is not worse than
    by more than the margin (the bytes it saves against that point)."""

    task: str
    label: str
    stored_bytes: float
    at_size: Point | None
    at_size_difference: PairedDifference | None
    matched: Point | None
    matched_difference: PairedDifference | None

    @property
    def verdict(self) -> str:
        d = self.at_size_difference
        if self.at_size is None:
            return "smaller than every frontier point"
        if d is None:
            return "no paired predictions"
        return {MET: "**above**", NOT_MET: "below"}.get(paired.sign(d), INCONCLUSIVE)


def place(s: pd.DataFrame, preds: pd.DataFrame, parse: Parser, reference: str | None,
          draws: int = paired.DRAWS) -> list[Placement]:
    """Every non-frontier row of every task that has a frontier, placed against it."""
    out: list[Placement] = []
    for task in dict.fromkeys(s["task"]):
        metric = str(s[s["task"] == task]["metric"].iloc[0])
        points = _points(s, str(task), parse)
        front = [p for p in points if is_frontier(p.label, parse, reference)]
        if len(front) < 2:
            continue
        for p in points:
            if p in front:
                continue
            smaller = [f for f in front if f.stored_bytes <= p.stored_bytes]
            at_size = max(smaller, key=lambda f: f.score) if smaller else None
            d_size = (paired.difference(preds, str(task), p.label, at_size.label, metric, draws)
                      if at_size is not None else None)
            matched, d_matched = None, None
            for f in sorted((f for f in front if f.stored_bytes > p.stored_bytes), key=lambda f: -f.stored_bytes):
                d = paired.difference(preds, str(task), p.label, f.label, metric, draws)
                if d is not None and d.low >= -MARGIN:
                    matched, d_matched = f, d
                    break
            out.append(Placement(str(task), p.label, p.stored_bytes, at_size, d_size, matched, d_matched))
    return out


def _kb(b: float) -> str:
    return f"{b / 1024:,.1f} KiB"


def section(placements: Sequence[Placement]) -> list[str]:
    if not placements:
        return []
    lines = ["", "## Against the LoRA-by-rank frontier", "",
             "The frontier: plain LoRA trained at each rank, stored fp32 and with int8 / int4 factors (every "
             "component kept). *At its size*: the best frontier point storing no more bytes, and the paired "
             "difference to it (**above** when the 95 % interval lies above 0). *Matches*: the largest frontier "
             f"point whose dev it stays within {MARGIN} point of (interval's lower end ≥ −{MARGIN}), and the share "
             "of that point's bytes it stores.", "",
             "| task | row | stored | best frontier point at its size | Δ dev (pt) | place | matches | Δ dev (pt) "
             "| bytes vs matched |", "|---|---|---:|---|---|---|---|---|---:|"]
    for p in placements:
        size = ("–", "–") if p.at_size is None else (
            f"{p.at_size.label} ({_kb(p.at_size.stored_bytes)})",
            format_interval(p.at_size_difference) if p.at_size_difference is not None else "–")
        match = ("none", "–", "–") if p.matched is None else (
            f"{p.matched.label} ({_kb(p.matched.stored_bytes)})", format_interval(p.matched_difference),
            f"{100 * p.stored_bytes / p.matched.stored_bytes:.1f} %")
        lines.append(f"| {p.task} | {p.label} | {_kb(p.stored_bytes)} | {size[0]} | {size[1]} | {p.verdict} | "
                     f"{' | '.join(match)} |")
    return lines


# ----------------------------------------------------------------------------- where capacity matters
@dataclass(frozen=True)
class Capacity:
    """One task's rank sweep of the reference method, uncompressed: every rank against the largest one, and the
    headline gap ``largest − smallest`` that says whether adapter capacity matters on the task at all."""

    task: str
    metric: str
    ranks: tuple[Point, ...]  # by stored bytes, smallest first
    against_largest: tuple[PairedDifference | None, ...]  # rank − largest, per rank (None for the largest)
    gap: PairedDifference | None  # largest − smallest

    @property
    def verdict(self) -> str:
        if self.gap is None:
            return "no paired predictions"
        return {MET: "**rank matters**", NOT_MET: "smaller rank is better"}.get(paired.sign(self.gap),
                                                                               "no clear effect")

    def _smallest(self, holds: Callable[[PairedDifference], bool]) -> Point | None:
        """The smallest rank whose difference to the largest satisfies ``holds`` (the largest always does)."""
        return next((p for p, d in zip(self.ranks, self.against_largest, strict=True) if d is None or holds(d)),
                    None)

    @property
    def enough(self) -> Point | None:
        """The smallest rank shown to stay within :data:`MARGIN` of the largest (interval's lower end)."""
        return self._smallest(lambda d: d.low >= -MARGIN)

    @property
    def not_worse(self) -> Point | None:
        """The smallest rank not shown to be worse than the largest (interval's upper end >= 0): weaker evidence
        than :attr:`enough`, which seed noise often leaves at the largest rank."""
        return self._smallest(lambda d: d.high >= 0)


def capacity(s: pd.DataFrame, preds: pd.DataFrame, parse: Parser, reference: str | None,
             draws: int = paired.DRAWS) -> list[Capacity]:
    """The rank sweep of every task with at least two uncompressed ranks of the reference method, tasks with the
    largest gap first (the study's main tasks are those where rank matters)."""
    out: list[Capacity] = []
    for task in dict.fromkeys(s["task"]):
        metric = str(s[s["task"] == task]["metric"].iloc[0])
        ranks = sorted((p for p in _points(s, str(task), parse) if is_frontier(p.label, parse, reference)
                        and p.settings.get("compress.bits") == "none"), key=lambda p: p.stored_bytes)
        if len(ranks) < 2:
            continue
        largest = ranks[-1]
        against = tuple(None if p is largest else paired.difference(preds, str(task), p.label, largest.label,
                                                                     metric, draws) for p in ranks)
        gap = paired.difference(preds, str(task), largest.label, ranks[0].label, metric, draws)
        out.append(Capacity(str(task), metric, tuple(ranks), against, gap))
    return sorted(out, key=lambda c: -(c.gap.mean if c.gap is not None else -math.inf))


def capacity_section(sweeps: Sequence[Capacity]) -> list[str]:
    if not sweeps:
        return []
    lines = ["", "## Where adapter capacity matters", "",
             "Plain LoRA at each rank, stored as trained. *Gap*: the largest rank minus the smallest, paired by seed "
             "(**rank matters** when its 95 % interval lies above 0). *Not worse*: the smallest rank whose interval "
             "against the largest reaches 0 (not shown worse). *Shown enough*: the smallest rank whose dev is shown "
             f"within {MARGIN} point of the largest (interval's lower end ≥ −{MARGIN}); seed noise often leaves it at "
             "the largest rank. Tasks with the largest gap first: only where rank matters can a study separate "
             "methods that allocate rank. In the last column a rank's dev is its mean over its own seeds, its "
             "difference paired on the seeds it shares with the largest rank (the two can count different seeds).",
             "",
             "| task | metric | gap: largest − smallest (pt) | verdict | not worse | shown enough | every rank − largest "
             "(pt) |", "|---|---|---|---|---|---|---|"]
    for c in sweeps:
        gap = format_interval(c.gap) if c.gap is not None else "–"
        each = "; ".join(f"{p.label} {p.score:.2f}" + (f": {format_interval(d)}" if d is not None else "")
                         for p, d in zip(c.ranks, c.against_largest, strict=True))
        enough = c.enough.label if c.enough is not None else "–"
        not_worse = c.not_worse.label if c.not_worse is not None else "–"
        lines.append(f"| {c.task} | {c.metric} | {gap} | {c.verdict} | {not_worse} | {enough} | {each} |")
    return lines


# ----------------------------------------------------------------------------- the compress issue's targets
def compress_targets(s: pd.DataFrame, preds: pd.DataFrame, parse: Parser, reference: str | None,
                     draws: int = paired.DRAWS, alpha: float = 0.05) -> list[paired.TargetCheck]:
    """The compress issue's targets per task (where the study has the rows they need), Holm-corrected together:

    * the smallest trimmed adapter at most :data:`SIZE_TARGET_PCT` % of the reference's fp32 bytes whose dev is
      within :data:`MARGIN` of the reference (``row − reference > −margin``); if none is that small, the best
      trimmed row and its size, *not met*;
    * every trimmed row that stores fewer bytes than the PEFT-style trim (``compress.rank: svd`` with
      ``budget: energy``) against it, at ``> −margin``;
    * ``output`` against ``svd`` at the same fixed component count (``budget: components``), at ``> 0``.
    """
    pending: list[paired.Pending] = []

    def claim(task: str, row: str, against: str, what: str, margin: float, condition: str, held: bool,
              d: PairedDifference | None) -> None:
        pending.append((task, row, against, PaperTarget(what, margin, against, condition, held), d))

    for task in dict.fromkeys(s["task"]):
        g = s[s["task"] == task]
        metric = str(g["metric"].iloc[0])
        points = {p.label: p for p in _points(s, str(task), parse)}
        if reference not in points:
            continue
        lora_fp32 = points[reference].stored_bytes
        trimmed = [p for p in points.values() if p.settings.get("compress.rank", "output") != "none"]

        def diff(a: str, b: str) -> PairedDifference | None:
            return paired.difference(preds, str(task), a, b, metric, draws)  # noqa: B023 - used at once

        small = [p for p in trimmed if 100 * p.stored_bytes / lora_fp32 <= SIZE_TARGET_PCT]
        if small:
            best = min(small, key=lambda p: (-(p.score), p.stored_bytes))
            pct = 100 * best.stored_bytes / lora_fp32
            claim(str(task), best.label, reference, f"≤ {SIZE_TARGET_PCT:g} % of {reference}'s fp32 bytes at its dev",
                  -MARGIN, f"stores {pct:.2f} %", True, diff(best.label, reference))
        elif trimmed:
            best = min(trimmed, key=lambda p: p.stored_bytes)
            pct = 100 * best.stored_bytes / lora_fp32
            claim(str(task), best.label, reference, f"≤ {SIZE_TARGET_PCT:g} % of {reference}'s fp32 bytes at its dev",
                  -MARGIN, f"smallest trimmed row stores {pct:.2f} %", False, diff(best.label, reference))
        peft = [p for p in trimmed if p.settings.get("compress.rank") == "svd"
                and p.settings.get("compress.budget") == "energy"]
        for trim in peft:
            for p in trimmed:
                if p is trim or p.stored_bytes >= trim.stored_bytes:
                    continue
                claim(str(task), p.label, trim.label, "fewer bytes than the PEFT-style trim at its dev", -MARGIN,
                      f"{100 * p.stored_bytes / trim.stored_bytes:.1f} % of its bytes", True, diff(p.label, trim.label))
        for p in trimmed:
            # no criterion in the label: the params' own (output, the default)
            if p.settings.get("compress.rank", "output") == "output" and \
                    p.settings.get("compress.budget") == "components":
                twin = {**p.settings, "compress.rank": "svd"}
                for q in trimmed:
                    if dict(q.settings) == twin:
                        claim(str(task), p.label, q.label, "output criterion beats svd at the same components",
                              0.0, f"{p.settings.get('compress.components')} components each", True,
                              diff(p.label, q.label))
    return paired.judged(pending, alpha)


def targets_section(checks: Sequence[paired.TargetCheck]) -> list[str]:
    if not checks:
        return []
    lines = ["", "## Compress targets", "",
             f"Paired claims `row − against > margin` (points), Holm-corrected over these {len(checks)}: **met** only "
             "when the whole corrected interval clears the margin, **not met** when it lies wholly on the wrong side "
             "or the stated condition fails, else inconclusive; the interval shown is the uncorrected 95 % one, the "
             "test column the one-sided p-value on the mean's side against its Holm level.", "",
             "| task | row | target | against | margin (pt) | measured | test: p vs Holm level | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        seeds = f" ({paired.per_seed_text(c.difference)})" if c.difference is not None else ""
        lines.append(f"| {c.task} | {c.method} | {c.target.what} | {c.against} | {c.target.threshold:+g} | "
                     f"{c.measured}{seeds} | {c.holm} | {'**met**' if c.verdict == MET else c.shown} |")
    return lines


def chart_points(s: pd.DataFrame, task: str, parse: Parser, reference: str | None
                 ) -> tuple[list[Point], list[Point], list[Point]]:
    """(frontier members, their upper envelope, every other row) of one task, for the Pareto chart."""
    points = _points(s, task, parse)
    front = [p for p in points if is_frontier(p.label, parse, reference)]
    return front, frontier(front), [p for p in points if p not in front]


def chart_points_by_params(s: pd.DataFrame, task: str, parse: Parser, reference: str | None
                           ) -> tuple[list[Point], list[Point], list[Point]]:
    """The same, on the stored-parameters axis: there int8/int4 frontier rows sit on their fp32 twin's
    parameter count, so the frontier is the reference method's full-precision ranks and its quantised rows
    are left out of the panel (the bytes panel shows them)."""
    points = _points(s, task, parse)
    full = [p for p in points if is_frontier(p.label, parse, reference) and p.settings.get("compress.bits") == "none"]
    others = [p for p in points if not is_frontier(p.label, parse, reference)]
    return full, frontier(full, size=lambda p: p.stored_params), others
