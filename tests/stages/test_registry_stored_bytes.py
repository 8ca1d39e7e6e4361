"""The registry gate on the stored adapter's bytes (registry.max_stored_bytes, off by default)."""

from stages.common.registry import Limits, decide


def _cand(**extra):
    return {"score": 0.85, "stored_params": 1000, "trivial_score": 0.5, "gain_over_trivial": 0.35,
            "constant_predictions": False, **extra}


def test_max_stored_bytes_gates_promotion_only_when_set():
    assert decide(_cand(stored_bytes=60_000), None, Limits()).promote  # off by default
    over = decide(_cand(stored_bytes=60_000), None, Limits(max_stored_bytes=50_000))
    assert not over.promote and any("exceed max_stored_bytes" in r for r in over.reasons)
    assert decide(_cand(stored_bytes=40_000), None, Limits(max_stored_bytes=50_000)).promote
    unknown = decide(_cand(), None, Limits(max_stored_bytes=50_000))
    assert not unknown.promote and any("unknown" in r for r in unknown.reasons)
