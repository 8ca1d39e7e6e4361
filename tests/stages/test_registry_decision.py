"""The pure promotion rule (no server): margin, efficiency limits, ties, missing data."""

from stages.common.registry import (
    Limits,
    decide,
    default_name,
    higher_is_better,
    metric_tags,
    metrics_from_tags,
)


def cand(score=0.80, stored=1000, latency=10.0, trivial=0.5, **extra):
    return {"score": score, "stored_params": stored, "trainable_params": stored * 2,
            "latency_merged_ms": latency, "trivial_score": trivial, "gain_over_trivial": score - trivial,
            "constant_predictions": False, **extra}


def test_chance_level_model_never_becomes_champion_even_without_one():
    at_trivial = decide(cand(score=0.5104, trivial=0.5104), None, Limits())
    assert not at_trivial.promote and "trivial predictor" in " ".join(at_trivial.reasons)
    just_below_min = decide(cand(score=0.515, trivial=0.51), None, Limits(min_gain_over_trivial=0.01))
    assert not just_below_min.promote
    constant = decide(cand(score=0.9, constant_predictions=True), None, Limits())
    assert not constant.promote and "constant" in constant.reasons[0]
    unmeasured = {k: v for k, v in cand().items() if k != "gain_over_trivial"}
    assert not decide(unmeasured, None, Limits()).promote
    # with the gain check off, only constant predictions are refused
    assert decide(cand(score=0.5, trivial=0.5), None, Limits(min_gain_over_trivial=None)).promote
    assert not decide(cand(score=0.5, constant_predictions=True), None, Limits(min_gain_over_trivial=None)).promote
    # a champion at chance is replaced by a model that learned something
    champ = {"score": 0.51, "version": "1"}
    assert decide(cand(score=0.62, trivial=0.51), champ, Limits()).promote


def test_first_model_becomes_champion():
    d = decide(cand(), None, Limits())
    assert d.promote and "no current champion" in d.reasons[-1]


def test_better_by_more_than_margin_wins_and_tie_or_worse_keeps_champion():
    champ = {"score": 0.80, "version": "3"}
    assert decide(cand(0.82), champ, Limits(margin=0.01)).promote
    assert not decide(cand(0.805), champ, Limits(margin=0.01)).promote  # better, but inside the margin
    tie = decide(cand(0.80), champ, Limits())
    assert not tie.promote and "does not beat champion v3" in tie.reasons[-1]
    assert not decide(cand(0.70), champ, Limits()).promote


def test_efficiency_limits_block_even_a_better_model():
    champ = {"score": 0.5, "version": "1"}
    too_big = decide(cand(0.9, stored=5000), champ, Limits(max_adapter_params=4000))
    assert not too_big.promote and any("exceed max_adapter_params" in r for r in too_big.reasons)
    too_slow = decide(cand(0.9, latency=50.0), champ, Limits(max_latency_ms=20))
    assert not too_slow.promote and any("exceeds max_latency_ms" in r for r in too_slow.reasons)
    ok = decide(cand(0.9, stored=4000, latency=20.0), champ, Limits(max_adapter_params=4000, max_latency_ms=20))
    assert ok.promote and len(ok.reasons) == 4  # trivial gain, size, latency, champion


def test_stored_params_preferred_and_trainable_as_fallback():
    no_stored = {"score": 0.9, "trainable_params": 5000}
    assert not decide(no_stored, None, Limits(max_adapter_params=4000)).promote
    assert decide(cand(0.9, stored=3000), None, Limits(max_adapter_params=4000)).promote  # trainable 6000


def test_missing_score_or_unknown_efficiency_is_not_promotable():
    assert not decide({"accuracy": 0.9}, None, Limits()).promote
    assert not decide({"score": float("nan")}, None, Limits()).promote
    assert not decide({"score": 0.9}, None, Limits(max_latency_ms=10)).promote
    assert decide(cand(0.9), {"version": "1"}, Limits()).promote  # champion without a score


def test_lower_is_better_metrics():
    assert not higher_is_better("perplexity") and higher_is_better("accuracy")
    lm = {"gain_over_trivial": 2.0}  # perplexity 2 below the unadapted base model
    assert decide({"perplexity": 20.0, **lm}, {"perplexity": 25.0}, Limits(), "perplexity", False).promote
    assert not decide({"perplexity": 30.0, **lm}, {"perplexity": 25.0}, Limits(), "perplexity", False).promote


def test_tags_round_trip_and_default_name():
    tags = metric_tags({"score": 0.8125, "trainable_params": 12, "main_metric": "accuracy", "flag": True})
    assert metrics_from_tags(tags) == {"score": 0.8125, "trainable_params": 12.0}
    assert default_name("sst2", "minilm") == "sst2-minilm"
    assert default_name("rte", "/models/org/My Model/") == "rte-My-Model"
    assert default_name("mrpc", "HuggingFaceTB/SmolLM2-135M") == "mrpc-SmolLM2-135M"
