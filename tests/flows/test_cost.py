"""The study report's cost section: measured CPU hours, estimates for untimed rows, protocol stages."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from flows import cost


def _rows(spec: list[tuple[str, int, bool, float, float]]) -> pd.DataFrame:
    """(method, seed, trained, train_seconds, run_seconds or nan) per run, on one task."""
    return pd.DataFrame([{"task": "cola", "method": m, "seed": s, "trained": t, "train_seconds": tr, "run_seconds": rs}
                         for m, s, t, tr, rs in spec])


def test_measured_hours_are_the_sum_of_run_seconds():
    df = _rows([("lora", 1, True, 100.0, 3600.0), ("lora", 2, True, 100.0, 1800.0),
                ("lora+compress", 1, False, 100.0, 360.0)])
    c = cost.cost(df, cost.overheads(df))
    assert (c.runs, c.trained, c.estimated_runs) == (3, 2, 0)
    assert c.measured_h == pytest.approx(1.6) and c.total_h == pytest.approx(1.6)


def test_untimed_rows_are_estimated_from_the_timed_ones_by_whether_they_trained():
    df = _rows([("lora", 1, True, 100.0, 160.0), ("lora", 2, True, 200.0, 240.0),  # outside training: 60, 40
                ("lora+compress", 1, False, 100.0, 30.0), ("lora+compress", 2, False, 200.0, 50.0),
                ("lora", 3, True, 300.0, math.nan),  # 300 + 50
                ("lora+compress", 3, False, 300.0, math.nan)])  # reused the training: 40, not 300 + anything
    o = cost.overheads(df)
    assert (o.trained, o.reused) == (pytest.approx(50.0), pytest.approx(40.0))
    c = cost.cost(df, o)
    assert c.estimated_runs == 2 and c.estimated_h == pytest.approx((350.0 + 40.0) / 3600)
    assert c.measured_h == pytest.approx(480.0 / 3600)


def test_trained_column_read_from_csv_strings_and_absent():
    df = _rows([("lora", 1, True, 10.0, 20.0), ("x", 1, False, 10.0, 5.0)]).astype({"trained": str})
    assert cost.cost(df, cost.overheads(df)).trained == 1
    assert cost.cost(df.drop(columns="trained"), cost.overheads(df)).trained == 2


def test_section_splits_first_stage_seeds_from_the_extension():
    spec = [("lora", s, True, 100.0, 360.0) for s in range(1, 11)]
    spec += [("bone", s, True, 100.0, 1080.0) for s in range(1, 6)]
    md = "\n".join(cost.section(_rows(spec)))
    assert cost.first_stage_seeds(_rows(spec)) == 5
    # seeds 1-5: 5 x 360 + 5 x 1080 s = 2.0 h; seeds 6-10: 5 x 360 s = 0.5 h
    assert "| seeds 1–5 (lr sweep and the first stage) | 10 | 10 | 2.00 | – | **2.00** |" in md
    assert "| seeds 6–10 (the sequential extension) | 5 | 5 | 0.50 | – | **0.50** |" in md
    assert "| all | 15 | 15 | 2.50 | – | **2.50** |" in md
    # most costly first: bone 1.5 h over 5 runs before lora's 1.0 h over 10
    assert md.index("| cola bone | 5 | 5 | 1.50 |") < md.index("| cola lora | 10 | 10 | 1.00 |")


def test_section_without_an_extension_or_any_times():
    md = "\n".join(cost.section(_rows([("lora", s, True, 100.0, 360.0) for s in (1, 2, 3)])))
    assert "extension" not in md and "| all | 3 | 3 | 0.30 |" in md
    assert cost.section(pd.DataFrame({"task": ["cola"], "method": ["lora"], "seed": [1]})) == []
