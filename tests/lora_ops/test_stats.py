"""Paired hierarchical bootstrap and the verdict rule, on constructed data where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from lora_ops.stats import (
    INCONCLUSIVE,
    MET,
    NOT_MET,
    PairedDifference,
    SeedRun,
    Target,
    paired_difference,
    score_interval,
    seeds_to_extend,
    task_metric,
    verdicts,
)

ACC = task_metric("accuracy")


def _runs(correct_share: list[float], n: int = 400, seed: int = 0, labels: np.ndarray | None = None) -> list[SeedRun]:
    """One run per seed whose predictions are right on the first ``share * n`` examples."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n) if labels is None else labels
    out = []
    for s, share in enumerate(correct_share, start=1):
        pred = labels.copy()
        wrong = np.arange(int(round((1 - share) * n)))
        pred[wrong] = 1 - pred[wrong]
        out.append(SeedRun(s, pred, labels))
    return out


def test_identical_predictions_give_a_zero_width_interval():
    runs = _runs([0.8, 0.82, 0.78])
    d = paired_difference(runs, runs, ACC, scale=100, draws=300)
    assert d.mean == d.low == d.high == 0.0 and set(d.per_seed.values()) == {0.0}
    [within, tied] = verdicts([Target("within 1 pt", d, -1.0), Target("better", d, 0.0)])
    assert within.verdict == MET and tied.verdict == INCONCLUSIVE  # equal is not "better", nor "worse"


def test_a_clear_gain_is_met_and_an_impossible_one_not_met():
    labels = np.random.default_rng(1).integers(0, 2, 600)
    ref = _runs([0.80, 0.81, 0.79, 0.80, 0.80], n=600, labels=labels)
    method = _runs([0.90, 0.91, 0.89, 0.90, 0.90], n=600, labels=labels)
    d = paired_difference(method, ref, ACC, scale=100, draws=500)
    assert d.mean == pytest.approx(10.0, abs=0.2) and 8 < d.low < d.mean < d.high < 12
    assert d.per_seed == pytest.approx({s: 10.0 for s in range(1, 6)}, abs=0.2)
    out = verdicts([Target("gain > 0", d, 0.0), Target("gain > 20", d, 20.0), Target("gain > 10", d, 10.0)])
    assert [v.verdict for v in out] == [MET, NOT_MET, INCONCLUSIVE]


def test_seed_to_seed_spread_widens_the_interval():
    """Same mean gain (+2 points); only the seed spread differs: the interval must reflect it, which a
    bootstrap over dev examples alone would not."""
    labels = np.random.default_rng(2).integers(0, 2, 800)
    ref = _runs([0.80] * 6, n=800, labels=labels)
    steady = paired_difference(_runs([0.82] * 6, n=800, labels=labels), ref, ACC, scale=100, draws=600)
    noisy = paired_difference(_runs([0.87, 0.77, 0.87, 0.77, 0.87, 0.77], n=800, labels=labels), ref, ACC,
                              scale=100, draws=600)
    assert steady.mean == pytest.approx(noisy.mean, abs=0.01)
    assert (noisy.high - noisy.low) > 3 * (steady.high - steady.low)
    assert steady.low > 0 and noisy.low < 0  # the same mean: decisive in one case only


def test_metrics_that_do_not_decompose_over_examples():
    mcc = task_metric("matthews")
    labels = np.random.default_rng(3).integers(0, 2, 500)
    ref = _runs([0.7, 0.72, 0.69], n=500, labels=labels)
    method = _runs([0.8, 0.81, 0.79], n=500, labels=labels)
    d = paired_difference(method, ref, mcc, scale=100, draws=300)
    exact = np.mean([100 * (mcc(m.predictions, labels) - mcc(r.predictions, labels)) for m, r in zip(method, ref)])
    assert d.mean == pytest.approx(exact) and d.low > 0


def test_deterministic_for_a_seed():
    runs_a, runs_b = _runs([0.8, 0.7]), _runs([0.75, 0.76])
    one = paired_difference(runs_a, runs_b, ACC, draws=200, seed=7)
    two = paired_difference(runs_a, runs_b, ACC, draws=200, seed=7)
    assert np.array_equal(one.draws, two.draws)


def _with_p(p: float) -> PairedDifference:
    """A difference whose bootstrap gives p_value_above(0) == p exactly (999 draws)."""
    below = int(round(p * 1000)) - 1
    draws = np.array([-1.0] * below + [1.0] * (999 - below))
    return PairedDifference(mean=0.5, low=-1.0, high=1.0, per_seed={1: 0.5}, draws=draws)


def test_holm_step_down():
    # each direction one-sided at alpha / 2 = 0.025, Holm over the targets: levels 0.025/3, 0.025/2, 0.025
    all_pass = verdicts([Target(str(p), _with_p(p), 0.0) for p in (0.005, 0.01, 0.02)])
    assert [v.verdict for v in all_pass] == [MET, MET, MET]
    assert [v.level_met for v in all_pass] == pytest.approx([0.025 / 3, 0.025 / 2, 0.025])
    # 0.015 fails its level 0.0125, so 0.02 is not tested at 0.025: step-down stops (uncorrected, both pass)
    stopped = verdicts([Target(str(p), _with_p(p), 0.0) for p in (0.005, 0.015, 0.02)])
    assert [v.verdict for v in stopped] == [MET, INCONCLUSIVE, INCONCLUSIVE]
    assert verdicts([Target("alone", _with_p(0.02), 0.0)])[0].verdict == MET


@pytest.mark.parametrize("p", [0.03, 0.04, 0.05])
def test_a_verdict_never_contradicts_the_95_percent_interval(p):
    """One-sided p between 0.025 and 0.05: the 95 % interval holds the threshold, so neither met nor not
    met, even alone (a one-sided 5 % test would call it met while the printed interval crosses 0)."""
    d = _with_p(p)
    assert d.p_value_above(0.0) == pytest.approx(p)
    assert np.quantile(d.draws, 0.025) <= 0.0  # the interval a report prints beside the verdict holds 0
    assert verdicts([Target("alone", d, 0.0)])[0].verdict == INCONCLUSIVE


def test_verdicts_agree_with_the_printed_interval_on_bootstrapped_data():
    labels = np.random.default_rng(4).integers(0, 2, 500)
    ref = _runs([0.80, 0.80, 0.80, 0.80, 0.80], n=500, labels=labels)
    for shares in ([0.81, 0.80, 0.82, 0.80, 0.81], [0.83, 0.79, 0.84, 0.80, 0.82], [0.78, 0.79, 0.80, 0.78, 0.79]):
        d = paired_difference(_runs(shares, n=500, labels=labels), ref, ACC, scale=100, draws=800)
        word = verdicts([Target("gain", d, 0.0)])[0].verdict
        expected = MET if d.low > 0 else NOT_MET if d.high < 0 else INCONCLUSIVE
        assert word == expected, (shares, d.low, d.high, word)


def test_pairing_needs_the_same_seeds_and_examples():
    a = _runs([0.8, 0.8])
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference(a, [SeedRun(9, a[0].predictions, a[0].labels)], ACC)
    other = SeedRun(1, a[0].predictions, 1 - a[0].labels)
    with pytest.raises(ValueError, match="different dev examples"):
        paired_difference(a, [other], ACC)
    with pytest.raises(ValueError, match="unknown metric"):
        task_metric("bleu")


def test_only_inconclusive_comparisons_get_more_seeds():
    results = {"cola/lora_drop": INCONCLUSIVE, "cola/bone": MET, "sst2/eva": NOT_MET, "sst2/blora": INCONCLUSIVE}
    assert seeds_to_extend(results, 5) == {"cola/lora_drop": 10, "sst2/blora": 10}
    assert seeds_to_extend(results, 10) == {}
    assert seeds_to_extend(results, 8, step=5) == {"cola/lora_drop": 10, "sst2/blora": 10}


def test_score_interval_covers_the_mean_and_widens_with_seed_spread():
    labels = np.arange(600) % 2
    steady = score_interval(_runs([0.80] * 5, n=600, labels=labels), ACC, scale=100, draws=400)
    noisy = score_interval(_runs([0.90, 0.70, 0.90, 0.70, 0.80], n=600, labels=labels), ACC, scale=100, draws=400)
    assert steady.low < steady.mean < steady.high and steady.seeds == 5
    assert abs(steady.mean - 80.0) < 0.5 and abs(noisy.mean - 80.0) < 0.5
    assert (noisy.high - noisy.low) > 2 * (steady.high - steady.low)
    with pytest.raises(ValueError, match="no runs"):
        score_interval([], ACC)
