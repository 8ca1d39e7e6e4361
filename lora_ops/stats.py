"""Paired, seed-aware statistics: intervals and verdicts that say what the data support.

Used by the method study (differences between methods over seeds) and by the ``compress`` search (is a
compressed adapter within tolerance of the uncompressed one on validation, beyond the noise of a few
hundred examples?). Pure numpy/torch, no I/O.

A study compares a method against a reference (``lora``, a peer) on the same dev examples with the same
seeds. Two sources of noise matter: which seed was drawn (training randomness, often 1-2 points on
GLUE dev at this budget) and which dev examples happen to be in the split. The interval here reflects
both, by a **hierarchical, paired bootstrap**:

1. resample the seeds (with replacement);
2. within each drawn seed, resample that seed's dev examples (with replacement), the *same* indices for
   both methods (the pairing: both saw the same examples, with the same seed);
3. compute the task metric of each method on the resampled examples, take the difference, and average
   the per-seed differences.

Any metric works (accuracy, Matthews correlation, F1, Pearson ...) because it is recomputed from the
per-example predictions on every resample; nothing assumes it decomposes over examples.

A target is a claim ``difference > threshold`` (``"within 1 point of LoRA"`` is ``difference > -1``;
``"at least as good as bone"`` is ``difference > 0``). Its verdict is

* **met** when the claim survives a one-sided test at the Holm-corrected level (equivalently: the whole
  corrected interval lies above the threshold),
* **not met** when the opposite claim ``difference < threshold`` survives the same test,
* **inconclusive** otherwise: the data cannot tell, and more seeds are what helps.

Holm's step-down correction runs over all targets of one report, so "k targets, each at 95 %" does
not turn into "one of them passed by luck".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lora_ops.metrics import METRIC_FUNCTIONS

MetricFn = Callable[[np.ndarray, np.ndarray], float]  # (predictions, labels) -> score

MET, NOT_MET, INCONCLUSIVE = "met", "not met", "inconclusive"


@dataclass(frozen=True)
class SeedRun:
    """One seed's per-example dev predictions of a method, and the labels they are scored against."""

    seed: int
    predictions: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class PairedDifference:
    """``method − reference`` over the seeds both ran; ``per_seed`` are the observed per-seed differences."""

    mean: float
    low: float
    high: float
    per_seed: dict[int, float]
    draws: np.ndarray = field(repr=False)  # bootstrap distribution of the mean difference
    confidence: float = 0.95

    def p_value_above(self, threshold: float) -> float:
        """One-sided bootstrap p-value of H0 ``difference <= threshold`` (small: the claim ``> threshold`` holds)."""
        return float((np.sum(self.draws <= threshold) + 1) / (self.draws.size + 1))

    def p_value_below(self, threshold: float) -> float:
        """One-sided bootstrap p-value of H0 ``difference >= threshold``."""
        return float((np.sum(self.draws >= threshold) + 1) / (self.draws.size + 1))


def _pair_runs(method: Sequence[SeedRun], reference: Sequence[SeedRun]) -> list[tuple[SeedRun, SeedRun]]:
    by_seed = {r.seed: r for r in reference}
    pairs = [(m, by_seed[m.seed]) for m in sorted(method, key=lambda r: r.seed) if m.seed in by_seed]
    if not pairs:
        raise ValueError("no seed in common between the method and its reference: runs are paired by seed")
    for m, r in pairs:
        if m.labels.shape != r.labels.shape or not np.array_equal(m.labels, r.labels):
            raise ValueError(f"seed {m.seed}: the two runs were scored on different dev examples; pairing needs the "
                             "same examples in the same order")
        if m.predictions.shape[0] != m.labels.shape[0] or r.predictions.shape[0] != r.labels.shape[0]:
            raise ValueError(f"seed {m.seed}: one prediction per dev example is needed")
    return pairs


def _check(draws: int, confidence: float) -> None:
    if draws < 100:
        raise ValueError(f"draws must be at least 100, got {draws}")
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")


def _two_level_bootstrap(sizes: Sequence[int], statistic: Callable[[int, np.ndarray], float], draws: int,
                         seed: int) -> np.ndarray:
    """``draws`` means of ``statistic(run, examples)`` over a resample of the runs (seeds), each scored on a
    resample of its own examples (``sizes[run]`` of them)."""
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for b in range(draws):
        total = 0.0
        for i in rng.integers(0, len(sizes), len(sizes)):
            total += statistic(int(i), rng.integers(0, sizes[i], sizes[i]))
        out[b] = total / len(sizes)
    return out


def _bounds(out: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(out, [tail, 1 - tail])
    return float(low), float(high)


def paired_difference(method: Sequence[SeedRun], reference: Sequence[SeedRun], metric: MetricFn, *,
                      scale: float = 1.0, draws: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> PairedDifference:
    """Hierarchical paired bootstrap of ``metric(method) − metric(reference)``, in units of ``scale``
    (100 for points). Deterministic for a given ``seed``."""
    _check(draws, confidence)
    pairs = _pair_runs(method, reference)
    observed = {m.seed: scale * (metric(m.predictions, m.labels) - metric(r.predictions, r.labels))
                for m, r in pairs}

    def diff(i: int, idx: np.ndarray) -> float:
        m, r = pairs[i]
        labels = m.labels[idx]
        return metric(m.predictions[idx], labels) - metric(r.predictions[idx], labels)

    out = scale * _two_level_bootstrap([m.labels.shape[0] for m, _ in pairs], diff, draws, seed)
    low, high = _bounds(out, confidence)
    return PairedDifference(mean=float(np.mean(list(observed.values()))), low=low, high=high,
                            per_seed=observed, draws=out, confidence=confidence)


@dataclass(frozen=True)
class ScoreInterval:
    """A method's mean score over its seeds and its hierarchical-bootstrap interval (same units)."""

    mean: float
    low: float
    high: float
    seeds: int


def score_interval(runs: Sequence[SeedRun], metric: MetricFn, *, scale: float = 1.0, draws: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> ScoreInterval:
    """The mean of ``metric`` over the seeds, with a 95 % interval from the same two-level bootstrap as
    :func:`paired_difference` (seeds, then examples): what the study's charts draw as error bars, so a bar
    says how well the mean is known, not how much the seeds spread."""
    if not runs:
        raise ValueError("no runs to score")
    _check(draws, confidence)
    runs = sorted(runs, key=lambda r: r.seed)
    out = scale * _two_level_bootstrap([r.labels.shape[0] for r in runs],
                                       lambda i, idx: metric(runs[i].predictions[idx], runs[i].labels[idx]),
                                       draws, seed)
    low, high = _bounds(out, confidence)
    mean = scale * float(np.mean([metric(r.predictions, r.labels) for r in runs]))
    return ScoreInterval(mean=mean, low=low, high=high, seeds=len(runs))


@dataclass(frozen=True)
class Target:
    """A claim ``difference > threshold`` about one comparison (``name`` is what the report prints)."""

    name: str
    difference: PairedDifference
    threshold: float


@dataclass(frozen=True)
class Verdict:
    target: Target
    verdict: str
    p_met: float
    p_not_met: float
    level_met: float  # the Holm-corrected level this target's test ran at
    level_not_met: float


def _holm(p_values: list[float], alpha: float) -> tuple[list[bool], list[float]]:
    """Holm's step-down procedure: which hypotheses are rejected, and the level each was tested at."""
    order = sorted(range(len(p_values)), key=lambda i: (p_values[i], i))
    rejected = [False] * len(p_values)
    levels = [alpha] * len(p_values)
    still_rejecting = True
    for rank, i in enumerate(order):
        levels[i] = alpha / (len(p_values) - rank)
        if still_rejecting and p_values[i] <= levels[i]:
            rejected[i] = True
        else:
            still_rejecting = False  # every later (larger) p-value is kept too
    return rejected, levels


def verdicts(targets: Sequence[Target], alpha: float = 0.05) -> list[Verdict]:
    """Met / not met / inconclusive for each target, Holm-corrected across all of them.

    Each direction is tested one-sided at ``alpha / 2``, so that before correction a target is met (not
    met) exactly when the reported two-sided ``1 - alpha`` interval lies wholly above (below) its
    threshold: a verdict never contradicts the interval printed beside it."""
    if not targets:
        return []
    p_met = [t.difference.p_value_above(t.threshold) for t in targets]
    p_not = [t.difference.p_value_below(t.threshold) for t in targets]
    met, levels_met = _holm(p_met, alpha / 2)
    not_met, levels_not = _holm(p_not, alpha / 2)
    out = []
    for i, t in enumerate(targets):
        word = MET if met[i] else NOT_MET if not_met[i] else INCONCLUSIVE
        out.append(Verdict(t, word, p_met[i], p_not[i], levels_met[i], levels_not[i]))
    return out


def seeds_to_extend(results: dict[str, str], seeds_run: int, max_seeds: int = 10, step: int = 5) -> dict[str, int]:
    """The sequential protocol: only inconclusive comparisons get more seeds, ``step`` at a time, up to
    ``max_seeds``. ``results`` maps a comparison (e.g. ``"cola/lora_drop"``) to its verdict; returns how
    many seeds each one that is extended should have in total."""
    target = min(seeds_run + step, max_seeds)
    if target <= seeds_run:
        return {}
    return {key: target for key, word in sorted(results.items()) if word == INCONCLUSIVE}


def format_interval(d: PairedDifference, digits: int = 2) -> str:
    """``+0.84 [-2.30, +3.98]``: mean paired difference and its interval."""
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"


def task_metric(name: str) -> MetricFn:
    """The project's own definition of a GLUE metric (``lora_ops.metrics``) on numpy arrays, so that the
    bootstrap recomputes exactly what the study reports."""
    if name not in METRIC_FUNCTIONS:
        raise ValueError(f"unknown metric {name!r}; known: {sorted(METRIC_FUNCTIONS)}")
    fn = METRIC_FUNCTIONS[name]

    def tensor(a: np.ndarray) -> torch.Tensor:
        a = np.ascontiguousarray(a)
        return torch.from_numpy(a if a.flags.writeable else a.copy())  # arrays read from parquet are read-only

    def metric(predictions: np.ndarray, labels: np.ndarray) -> float:
        return fn(tensor(predictions), tensor(labels))

    return metric
