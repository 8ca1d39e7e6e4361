"""The study report's cost section: measured CPU hours, the empty-cache estimate, protocol stages."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from flows import cost
from flows.variants import training_label


def _rows(spec: list[tuple[str, int, bool, float, float]], lr: float = 1e-3) -> pd.DataFrame:
    """(method, seed, trained, train_seconds, run_seconds or nan) per run, on one task."""
    return pd.DataFrame([{"task": "cola", "method": m, "seed": s, "lr": lr, "trained": t, "train_seconds": tr,
                          "run_seconds": rs} for m, s, t, tr, rs in spec])


def test_training_label_strips_the_compress_part_only():
    assert training_label("lora[adapter.rank=16]+compress[rank=none,bits=4]") == "lora[adapter.rank=16]"
    assert training_label("lora_drop+compress") == "lora_drop"
    assert training_label("blora[quantize_base=true]") == "blora[quantize_base=true]"


def test_measured_is_the_clock_and_fresh_counts_each_training_once():
    # lora trained on seed 1 (run 160 s: 100 training + 60); seed 2's training came from DVC's cache (run 20 s);
    # the compress row reused seed 1's training (run 40 s)
    df = _rows([("lora", 1, True, 100.0, 160.0), ("lora", 2, False, 120.0, 20.0),
                ("lora+compress", 1, False, 100.0, 40.0)])
    o = cost.overheads(df)
    assert (o.trained, o.reused) == (pytest.approx(60.0), pytest.approx(30.0))  # medians of (20, 40) reused
    c = cost.cost(df, o, training_label)
    assert (c.runs, c.trainings, c.untimed) == (3, 2, 0)
    assert c.measured_h == pytest.approx(220.0 / 3600)
    # empty cache: both trainings (100 + 120) each with 60 s around them, and one reuse at 30 s
    assert c.fresh_h == pytest.approx((100.0 + 120.0 + 2 * 60.0 + 30.0) / 3600)


def test_distinct_trainings_are_told_apart_by_lr_and_seed_and_untimed_rows_count_in_fresh_only():
    df = pd.concat([_rows([("lora", 1, True, 100.0, 150.0)]), _rows([("lora", 1, True, 200.0, math.nan)], lr=2e-3),
                    _rows([("lora[adapter.rank=2]+compress[bits=4]", 1, True, 50.0, math.nan)])],
                   ignore_index=True)
    c = cost.cost(df, cost.overheads(df), training_label)
    assert (c.trainings, c.untimed) == (3, 2)
    assert c.measured_h == pytest.approx(150.0 / 3600)
    assert c.fresh_h == pytest.approx((100.0 + 200.0 + 50.0 + 3 * 50.0) / 3600)


def test_trained_column_read_from_csv_strings_and_absent():
    df = _rows([("lora", 1, True, 10.0, 20.0), ("x", 1, False, 10.0, 5.0)]).astype({"trained": str})
    assert cost.overheads(df) == cost.Overhead(10.0, 5.0)
    # without the column, a run shorter than its training did not train
    assert cost.overheads(df.drop(columns="trained")) == cost.Overhead(10.0, 5.0)


def test_a_training_recorded_at_different_times_counts_once_at_its_median():
    # three rows share seed 1's training; under contention they recorded it at 100, 140 and 300 s
    df = _rows([("lora", 1, True, 100.0, 160.0), ("lora+compress", 1, False, 140.0, 40.0),
                ("lora+compress[bits=4]", 1, False, 300.0, math.nan)])
    c = cost.cost(df, cost.Overhead(60.0, 40.0), training_label)
    assert c.trainings == 1 and c.fresh_h == pytest.approx((140.0 + 60.0 + 2 * 40.0) / 3600)


def test_section_splits_first_stage_seeds_from_the_extension_and_groups_reuse_with_its_training():
    spec = [("lora", s, True, 300.0, 360.0) for s in range(1, 11)]
    spec += [("lora+compress", s, False, 300.0, 36.0) for s in range(1, 11)]
    spec += [("bone", s, True, 1020.0, 1080.0) for s in range(1, 6)]
    df = _rows(spec)
    md = "\n".join(cost.section(df, training_label))
    assert list(cost.first_stage(df)) == [s <= 5 for s in df["seed"]]
    # seeds 1-5: 5 x 360 + 5 x 36 + 5 x 1080 s = 2.05 h measured, and so on an empty cache (60 s around a
    # training, 36 s for a reuse); seeds 6-10: 5 x (360 + 36) s = 0.55 h
    assert "| first stage: the seeds every row ran, lr sweep included | 15 | 10 | 2.05 | – | **2.05** |" in md
    assert "| later seeds: the sequential extension | 10 | 5 | 0.55 | – | **0.55** |" in md
    assert "| all | 25 | 15 | 2.60 | – | **2.60** |" in md
    # most costly first: bone 1.5 h, then lora with its compress rows (10 x 396 s = 1.1 h)
    assert md.index("| cola bone | 5 | 5 | 1.50 |") < md.index("| cola lora | 20 | 10 | 1.10 |")


def test_section_measured_and_empty_cache_differ_and_stages_are_per_task():
    # cola: seed 2's training came from DVC's cache (run 20 s) and seed 3 is untimed; sst2 stopped at seed 1,
    # so its seed 2 is an extension while cola's seeds 1-3 are all its first stage
    cola = _rows([("lora", 1, True, 300.0, 360.0), ("lora", 2, False, 300.0, 20.0), ("lora", 3, True, 300.0, math.nan)])
    sst2 = _rows([("lora", 1, True, 600.0, 660.0), ("bone", 1, True, 600.0, 660.0), ("lora", 2, True, 600.0, 660.0)])
    sst2["task"] = "sst2"
    df = pd.concat([cola, sst2], ignore_index=True)
    assert list(cost.first_stage(df)) == [True, True, True, True, True, False]
    md = "\n".join(cost.section(df, training_label, top=2))
    # first stage measured: 360 + 20 + 660 + 660 s; empty cache: 3 x 300 + 2 x 600 s of training, 5 x 60 s around
    assert "| first stage: the seeds every row ran, lr sweep included | 5 | 5 | 0.47 | 1 | **0.67** |" in md
    assert "| later seeds: the sequential extension | 1 | 1 | 0.18 | – | **0.18** |" in md
    # top 2 only: sst2 lora 2 x 660 s, cola lora 3 x 300 + 3 x 60 s; sst2 bone (660 s) left out
    assert "| sst2 lora | 2 | 2 | 0.37 | – | **0.37** |" in md and "| cola lora | 3 | 3 | 0.11 | 1 | **0.30** |" in md
    assert "| sst2 bone |" not in md


def test_section_without_an_extension_or_any_times():
    md = "\n".join(cost.section(_rows([("lora", s, True, 300.0, 360.0) for s in (1, 2, 3)]), training_label))
    assert "extension" not in md and "| all | 3 | 3 | 0.30 |" in md
    assert cost.section(pd.DataFrame({"task": ["cola"], "method": ["lora"], "seed": [1]}), training_label) == []
