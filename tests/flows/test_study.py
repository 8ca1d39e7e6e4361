"""The study's selection and report logic on hand-made rows (the real runs are in test_flows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import flows.paired as paired
from flows.study import (
    STAGE_OVERHEAD_SECONDS,
    NotReproduced,
    PlannedRun,
    check_reproduced,
    choose_factor,
    estimate_seconds,
    extension_pairs,
    restore_pairs,
    shown_command,
    shown_path,
    sweep_order,
    with_earlier_rows,
)
from flows.study_report import (
    COLUMNS,
    _place_labels,
    markdown,
    no_better_than_trivial,
    pareto_chart,
    peer_rows,
    summary,
    targets,
)
from flows.variants import chart_label, parse_variant
from lora_ops.methods import get_method
from lora_ops.methods.blora import BLoRAParams
from stages.common.params import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[2]
N = 400  # dev examples of the constructed runs
LABELS = np.arange(N) % 2


def _row(method, seed, score, stored, factor=1.0, selected=True, validation=None, **kw):
    r = dict.fromkeys(COLUMNS)
    r.update(task="sst2", method=method, seed=seed, lr=1e-3 * factor, lr_factor=factor, selected=selected,
             metric="accuracy", score=score, validation_score=score if validation is None else validation,
             trivial_score=0.5, trainable_params=stored, stored_params=stored, pct_of_lora=100 * stored / 1000,
             train_seconds=10.0, peak_rss_mb=900.0, trained=True)
    r.update(kw)
    return r


def _lora_predictions(seed):
    """LoRA's seed ``seed``: right on the first 336 + 2 * (seed - 1) dev examples, wrong on the rest."""
    right = 336 + 2 * (seed - 1)
    return np.where(np.arange(N) < right, LABELS, 1 - LABELS)


def _shifted(seed, delta):
    """LoRA's predictions with ``delta`` examples changed: negative turns right ones wrong, positive the reverse."""
    p = _lora_predictions(seed).copy()
    right = 336 + 2 * (seed - 1)
    idx = range(right - 1, right - 1 + delta, -1) if delta < 0 else range(right, right + delta)
    for i in idx:
        p[i] = 1 - p[i]
    return p


def _run(method, seed, predictions, stored, factor=1.0, **kw):
    """A study row and its per-example predictions, the score computed from them."""
    row = _row(method, seed, float(np.mean(predictions == LABELS)), stored, factor, **kw)
    preds = pd.DataFrame({"task": "sst2", "method": method, "seed": seed, "lr_factor": factor,
                          "example": np.arange(N), "prediction": predictions, "label": LABELS})
    return row, preds


def _study(lora_drop_stored=550):
    """lora_drop −0.25 pt every seed (met), bone −4.5 pt (not met), bat +1 pt over bone (met), blora −3/+1/+1 pt
    (inconclusive): rows and predictions, as a study writes them."""
    runs = [_run("lora", s, _lora_predictions(s), 1000) for s in (1, 2, 3)]
    runs += [_run("lora_drop", s, _shifted(s, -1), lora_drop_stored) for s in (1, 2, 3)]
    runs += [_run("bone", s, _shifted(s, -18), 1000) for s in (1, 2, 3)]
    runs += [_run("bat", s, _shifted(s, -14), 1000) for s in (1, 2, 3)]
    runs += [_run("blora", s, _shifted(s, d), 1000, bops_ratio_adapter=0.4, gates_closed=12)
             for s, d in ((1, -12), (2, 4), (3, 4))]
    runs.append(_run("lora", 1, 1 - LABELS, 1000, factor=2.0, selected=False))  # a sweep run: not compared
    df = pd.DataFrame([r for r, _ in runs], columns=COLUMNS)
    return df, paired.combine([p for _, p in runs])


def test_lr_choice_uses_validation_and_prefers_the_recipe_on_ties():
    sweep = [_row("lora", 1, 0.90, 1000, f, validation=v) for f, v in ((0.5, 0.80), (1.0, 0.85), (2.0, 0.85))]
    assert choose_factor(sweep) == 1.0  # tie between 1 and 2: the recipe's own value
    sweep[0]["validation_score"] = 0.86
    sweep[0]["score"] = 0.10  # dev plays no part
    assert choose_factor(sweep) == 0.5


def test_lr_choice_over_several_seeds_uses_their_mean_validation():
    # seed 1 alone would pick factor 2; the mean over seeds 1 and 2 picks 1
    sweep = [_row("lora", s, 0.9, 1000, f, validation=v)
             for s, f, v in ((1, 1.0, 0.84), (2, 1.0, 0.86), (1, 2.0, 0.85), (2, 2.0, 0.80))]
    assert choose_factor(sweep[::2]) == 2.0 and choose_factor(sweep) == 1.0
    runs, rest = sweep_order([1, 2, 3, 4, 5], [0.5, 1.0, 2.0], 2)
    assert runs == [(1, 0.5), (2, 0.5), (1, 1.0), (2, 1.0), (1, 2.0), (2, 2.0)] and rest == [3, 4, 5]
    assert sweep_order([7, 8], [1.0], 1) == ([(7, 1.0)], [8])


def test_closed_gates_counts_rank_and_bit_levels():
    ctl = {"modules": [{"rank": 6, "max_rank": 8, "bits_A": 8, "bits_B": 32},
                       {"rank": 8, "max_rank": 8, "bits_A": 32, "bits_B": 2}]}
    # 2 rank gates + 8-bit (2 levels below 32) + 2-bit (4 levels)
    figures = get_method("blora").report_figures(ctl, BLoRAParams(bits=[2, 4, 8, 16, 32]))
    assert figures == {"rank_gates_closed": 2, "bit_levels_dropped": 2 + 4, "gates_closed": 2 + 2 + 4}
    assert get_method("blora").report_figures(None, BLoRAParams()) == {"gates_closed": None}
    assert get_method("lora").report_figures(ctl, get_method("lora").params_model()) == {}


def test_summary_targets_report_and_chart(tmp_path):
    df, preds = _study()
    s = summary(df)
    lora = s[s["method"] == "lora"].iloc[0]
    assert lora["n"] == 3 and lora["score_mean"] == pytest.approx(0.845) and lora["score_std"] == pytest.approx(0.005)
    chosen = paired.selected(df, preds)
    assert len(chosen) == 15 * N  # the sweep run's predictions are not compared
    verdicts = {c.method: c.verdict for c in targets(s, chosen, draws=500)}
    assert verdicts == {"lora_drop": "met", "bone": "not met", "bat": "met", "blora": "inconclusive"}
    md = markdown(df, "# Method study", "python -m flows.study --methods lora", preds, draws=500)
    assert "| sst2 | lora | accuracy | 0.8450 ± 0.0050 | [82.37, 86.54] | 3 |" in md  # seeds, then examples
    assert "| sst2 | lora | 1 | 2 | 2.0e-03 | 0.0000 | 0.0000 |  |" in md  # seed 1's sweep row, not chosen
    assert "## Paired differences" in md
    assert "| sst2 | lora_drop | lora | accuracy | -0.25 | [" in md and "| 3 | s1 -0.25, s2 -0.25, s3 -0.25 |" in md
    assert "| sst2 | bone | lora | accuracy | -4.50 | [" in md and "| **lower** |" in md
    assert "| sst2 | blora | lora | accuracy | -0.33 |" in md and "s1 -3.00, s2 +1.00, s3 +1.00" in md
    assert "| sst2: bat >= bone | bone | +0 | +1.00 [" in md
    assert "| sst2: bone within 1 pt of lora (equal params) | lora | -1 |" in md and "| **not met** |" in md
    # the test column: the one-sided p on the mean's side against its Holm level (4 targets: 0.025 / 4, / 3, ...)
    assert "55.0 % of LoRA's stored params (<= 60 %) | above: 0.0020 ≤ 0.0063 | met |" in md
    assert "-3.25] pt, 3 seeds | below: 0.0020 ≤ 0.0063 | **not met** |" in md  # bone
    assert "12 gates closed (> 0) | above: 0.2475 > 0.0125 | inconclusive |" in md  # blora
    assert md == markdown(df, "# Method study", "python -m flows.study --methods lora", preds, draws=500)
    assert "## Cost" in md and "| all | 16 |" in md  # 15 selected runs and seed 1's sweep run
    pareto_chart(df, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_no_better_than_the_trivial_predictor_are_counted_per_row():
    df, preds = _study()
    # bone's seed 2 collapsed to the majority class (0.5, the trivial score); a run below it counts too
    df.loc[(df["method"] == "bone") & (df["seed"] == 2), "score"] = 0.5
    df.loc[(df["method"] == "bat") & (df["seed"] == 3), "score"] = 0.49
    s = summary(df).set_index("method")
    assert s.loc["bone", "at_trivial"] == 1 and s.loc["bat", "at_trivial"] == 1 and s.loc["lora", "at_trivial"] == 0
    md = markdown(df, "# Method study", "cmd", preds, draws=200)
    assert "| sst2 | bone | accuracy | 0.7000 ± 0.1733 | [" in md and "| 3 | 1 | 1.0e-03 |" in md
    assert "| ≤ trivial |" in md and "`≤ trivial`: the row's runs" in md
    # lower is better (perplexity): no better than the base is a score at or above its
    ppl = pd.Series([30.0, 41.0, 40.0])
    assert no_better_than_trivial(ppl, pd.Series(40.0, index=ppl.index), "perplexity").tolist() == [False, True, True]


def test_holm_runs_across_all_targets_and_a_failed_condition_is_not_met(monkeypatch):
    df, preds = _study(lora_drop_stored=700)  # 70 % of LoRA's stored params: the side-condition fails
    families = []
    real = paired.verdicts

    def spy(targets, alpha=0.05):
        families.append([t.name for t in targets])
        return real(targets, alpha)

    monkeypatch.setattr(paired, "verdicts", spy)
    checks = targets(summary(df), paired.selected(df, preds), draws=500)
    assert families == [[c.target.what for c in checks]] and len(checks) == 4  # one family: the whole report
    (drop,) = [c for c in checks if c.method == "lora_drop"]
    assert drop.verdict == "not met" and "70.0 %" in drop.measured  # whatever its interval says
    assert drop.difference is not None and drop.difference.low > -1


def test_targets_without_predictions_are_inconclusive_not_judged_on_means():
    df, _ = _study()
    checks = targets(summary(df))
    assert {c.verdict for c in checks} == {"inconclusive"}
    assert all(c.measured.startswith("no per-example predictions") for c in checks)
    assert "no per-example predictions on a common seed" in markdown(df, "# Method study", "cmd")


def test_extension_runs_only_new_seeds_of_inconclusive_pairs_on_both_sides(tmp_path):
    df, preds = _study()
    df.to_csv(tmp_path / "study.csv", index=False)
    paired.write(tmp_path / "predictions.parquet", preds)
    assert paired.read(tmp_path / "predictions.parquet").equals(preds)  # the file round-trips
    pairs = extension_pairs(tmp_path / "study.csv", max_seeds=10)
    # blora vs lora is inconclusive: both get 5 more seeds (paired on common seeds), each at the lr factor its
    # sweep chose (lora swept 1 and 2 on seed 1 and chose 1): the earlier runs are kept, not run again
    assert pairs == [{"task": "sst2", "method": "blora", "seeds": [4, 5, 6, 7, 8], "lr_factors": [1.0], "extends": True},
                     {"task": "sst2", "method": "lora", "seeds": [4, 5, 6, 7, 8], "lr_factors": [1.0], "extends": True}]
    assert extension_pairs(tmp_path / "study.csv", max_seeds=3) == []  # at the cap: nothing to extend
    # a share of the step for one of two checkouts: just the rows named; a name that is no row is refused
    assert extension_pairs(tmp_path / "study.csv", max_seeds=10, only=["blora", "bone"]) == pairs[:1]
    with pytest.raises(ConfigError, match="--methods 'blora_x' is not a row of"):
        extension_pairs(tmp_path / "study.csv", max_seeds=10, only=["blora_x"])
    # a pair whose earlier predictions are gone cannot be paired on those seeds: restore them first
    paired.write(tmp_path / "predictions.parquet", preds[~((preds["method"] == "blora") & (preds["seed"] == 2))])
    with pytest.raises(ConfigError, match="blora: no per-example predictions for seed 2.*--restore-predictions"):
        extension_pairs(tmp_path / "study.csv", max_seeds=10)


def test_extension_counts_the_seeds_a_target_pairs_on_not_its_longer_side(tmp_path):
    # LoRA already ran 5 more seeds for another target: blora vs lora is still paired on 3 seeds, so blora is
    # extended to 8 (LoRA's seeds 4-8 are there); counting LoRA's 8 would have left blora at 3 for good
    df, preds = _study()
    more = [_run("lora", x, _lora_predictions(x), 1000) for x in (4, 5, 6, 7, 8)]
    df = pd.concat([df, pd.DataFrame([r for r, _ in more], columns=COLUMNS)], ignore_index=True)
    df.to_csv(tmp_path / "study.csv", index=False)
    paired.write(tmp_path / "predictions.parquet", paired.combine([preds, *[q for _, q in more]]))
    pairs = extension_pairs(tmp_path / "study.csv", max_seeds=10)
    assert pairs == [{"task": "sst2", "method": "blora", "seeds": [4, 5, 6, 7, 8], "lr_factors": [1.0], "extends": True}]


def test_extension_covers_the_compress_targets(tmp_path):
    # the PEFT-style trim and a smaller trimmed row that is 1 example worse on seed 1 only: inconclusive
    runs = [_run("lora", x, _lora_predictions(x), 1000, stored_bytes=4000) for x in (1, 2, 3)]
    trim = "lora+compress[rank=svd,budget=energy,energy=0.9,bits=none]"
    runs += [_run(trim, x, _lora_predictions(x), 1000, stored_bytes=2000) for x in (1, 2, 3)]
    runs += [_run("lora+compress", x, _shifted(x, -4 if x == 1 else 1), 1000, stored_bytes=1000) for x in (1, 2, 3)]
    df = pd.DataFrame([r for r, _ in runs], columns=COLUMNS)
    df.to_csv(tmp_path / "study.csv", index=False)
    paired.write(tmp_path / "predictions.parquet", paired.combine([q for _, q in runs]))
    pairs = {p["method"]: p["seeds"] for p in extension_pairs(tmp_path / "study.csv")}
    assert pairs == {"lora+compress": [4, 5, 6, 7, 8], trim: [4, 5, 6, 7, 8]}
    # "above the frontier" is a verdict too: with LoRA stored int4 at 500 bytes (the frontier point at both
    # rows' size), 2 examples worse on seed 1 only, their places against it are inconclusive: it is extended
    int4 = "lora+compress[rank=none,bits=4]"
    runs += [_run(int4, x, _shifted(x, -2 if x == 1 else 0), 1000, stored_bytes=500) for x in (1, 2, 3)]
    df = pd.DataFrame([r for r, _ in runs], columns=COLUMNS)
    df.to_csv(tmp_path / "study.csv", index=False)
    paired.write(tmp_path / "predictions.parquet", paired.combine([q for _, q in runs]))
    pairs = {p["method"]: p["seeds"] for p in extension_pairs(tmp_path / "study.csv")}
    assert set(pairs) == {"lora+compress", trim, int4} and pairs[int4] == [4, 5, 6, 7, 8]


def test_extended_pairs_keep_their_earlier_rows_and_predictions():
    df, preds = _study()
    new_rows, new_preds = zip(*[_run("blora", x, _lora_predictions(x), 1000) for x in (4, 5)])
    new = pd.DataFrame(list(new_rows), columns=COLUMNS)
    merged = with_earlier_rows(new, df, {("sst2", "blora")})
    assert sorted(merged[merged["method"] == "blora"]["seed"]) == [1, 2, 3, 4, 5]
    assert len(merged) == len(df) + 2
    both = paired.with_earlier(paired.combine(list(new_preds)), preds, {("sst2", "blora")})
    assert sorted(both[both["method"] == "blora"]["seed"].unique()) == [1, 2, 3, 4, 5] and len(both) == len(preds) + 2 * N
    # without the mark (a pair run again from scratch) its earlier rows are replaced, as --append always did
    assert sorted(with_earlier_rows(new, df)[lambda d: d["method"] == "blora"]["seed"]) == [4, 5]
    # a run the extension has again (same seed and lr factor) replaces its earlier row, never doubles it
    again = pd.DataFrame([_row("blora", 3, 0.5, 1000)], columns=COLUMNS)
    assert (with_earlier_rows(again, df, {("sst2", "blora")})["method"] == "blora").sum() == 3


def test_cpu_estimate_uses_measured_times_else_a_rough_step_cost():
    p = load_params(overrides={"data.train_size": 640, "train.batch_size": 32, "train.epochs": 2})
    runs = [PlannedRun("sst2", "lora", 1, 1.0, p), PlannedRun("sst2", "eva", 1, 1.0, p),
            PlannedRun("cola", "lora", 1, 1.0, p)]
    earlier = pd.DataFrame([_row("lora", s, 0.8, 1000) for s in (1, 2)] + [_row("bone", 1, 0.8, 1000)])
    earlier.loc[2, "train_seconds"] = 40.0
    seconds, how = estimate_seconds(runs, earlier)
    # lora measured 10 s; eva: sst2's mean (10 + 10 + 40) / 3 = 20 s; cola: 40 steps at the rough cost
    assert seconds == pytest.approx(10 + 20 + 40 * 0.3 + 3 * STAGE_OVERHEAD_SECONDS)
    assert "3 trainings: 2 at the times" in how and "1 at" in how and "as earlier runs measured" not in how
    assert estimate_seconds(runs[:1], None)[0] == pytest.approx(40 * 0.3 + STAGE_OVERHEAD_SECONDS)
    # runs that measured their whole wall time: the other stages cost what they took beside training, the median
    # over the rows that trained (a row DVC's cache served ran nothing and is left out)
    earlier = pd.concat([earlier, earlier.iloc[:1]], ignore_index=True)
    earlier["run_seconds"] = [70.0, 90.0, 100.0, 200.0]  # 60, 80, 60 and 190 s beside training
    earlier["trained"] = [True, True, False, True]
    seconds, how = estimate_seconds(runs, earlier)
    assert seconds == pytest.approx(10 + (10 + 10 + 40 + 10) / 4 + 40 * 0.3 + 3 * 80)  # median 80, mean 110
    assert "~80 s per run for the other stages (as earlier runs measured)" in how


def test_cpu_estimate_counts_a_training_the_plan_shares_once():
    p = load_params()
    earlier = pd.DataFrame([_row("lora", 1, 0.8, 1000), _row("lora+compress", 1, 0.8, 1000)])
    earlier["train_seconds"] = [100.0, 100.0]
    earlier["run_seconds"] = [130.0, 12.0]  # lora trained (30 s beside training); the compress row came from the cache
    earlier["trained"] = [True, False]
    compress = "lora+compress[rank=none,bits=4]"
    runs = [PlannedRun("sst2", "lora", 1, 0.5, p), PlannedRun("sst2", "lora", 1, 1.0, p),
            PlannedRun("sst2", "lora", 3, None, p),  # seed 3 at the factor the sweep chooses
            PlannedRun("sst2", compress, 1, 0.5, p), PlannedRun("sst2", compress, 3, None, p)]
    seconds, how = estimate_seconds(runs, earlier)
    # three trainings; the two compress runs reuse two of them and pay only the other stages
    assert seconds == pytest.approx(3 * 100 + 5 * 30)
    assert "3 trainings" in how and "2 runs reuse a training of the plan" in how


def test_estimate_prints_the_plan_and_runs_nothing(tmp_path, capsys, monkeypatch):
    import flows.study as study_flow

    monkeypatch.setattr(study_flow, "study", lambda **kw: pytest.fail("--estimate must not run the study"))
    argv = ["--tasks", "sst2", "--methods", "lora", "lora+compress", "--seeds", "1", "2", "3",
            "--lr-factors", "0.5", "1", "2", "--sweep-seeds", "2", "--estimate", "--out", str(tmp_path)]
    assert study_flow.main(argv) == 0
    out = capsys.readouterr().out
    # per row: 3 factors x 2 sweep seeds + seed 3 = 7 runs; the compress row trains nothing of its own
    assert out.startswith("study: 14 runs, estimated CPU time at most ") and "7 trainings" in out
    assert "7 runs reuse a training of the plan" in out
    assert not any(tmp_path.iterdir())
    assert study_flow.main([*argv[:4], "nosuch", *argv[5:]]) == 2  # a bad row: one line, exit 2


def test_report_paths_are_relative_to_the_repository(tmp_path):
    assert shown_path(tmp_path / "reports" / "study.csv", tmp_path) == "reports/study.csv"
    assert shown_path("/elsewhere/clone/reports/study.csv", tmp_path) == "study.csv"
    other = tmp_path.parent / f"{tmp_path.name}-other-checkout"
    (other / ".git").mkdir(parents=True)
    csv = other / "reports" / "cola" / "study.csv"
    assert shown_path(csv, tmp_path) == "study.csv"  # a git folder that is not a checkout of this project
    (other / "flows").mkdir()
    (other / "flows" / "study.py").write_text("")
    assert shown_path(csv, tmp_path) == "<checkout>/reports/cola/study.csv"
    assert shown_path(tmp_path / "reports" / ".." / "reports" / "a.csv", tmp_path / "reports" / "..") == "reports/a.csv"
    # the printed command: no machine path, also after "="; the note is one quoted argument
    line = shown_command(["--report", "reports/a.csv", str(csv), f"--out={tmp_path / 'out'}", "--note", "two words"],
                         tmp_path)
    assert line == ("python -m flows.study --report reports/a.csv '<checkout>/reports/cola/study.csv' --out=out "
                    "--note 'two words'")
    assert str(other) not in line and str(tmp_path) not in line


def test_method_variants_parse_to_overrides():
    off = {"compress.rank": "none", "compress.bits": "none"}
    assert parse_variant("lora") == ("lora", "lora", off)
    assert parse_variant("lora_drop[threshold=0.6, probe_epochs=1]") == (
        "lora_drop[threshold=0.6, probe_epochs=1]", "lora_drop", {**off, "lora_drop.threshold": 0.6,
                                                                   "lora_drop.probe_epochs": 1})
    with pytest.raises(ConfigError, match="key=value"):
        parse_variant("lora_drop[threshold]")


def test_chart_labels_are_short_and_keep_what_tells_rows_apart():
    assert chart_label("lora") == "lora"
    assert chart_label("lora[adapter.rank=2]+compress[rank=none,bits=4]") == "lora r2 +compress int4"
    assert chart_label("lora+compress") == "lora +compress"
    assert chart_label("lora+compress[confidence=null]") == "lora +compress confidence=null"
    assert chart_label("lora+compress[rank=svd,budget=energy,energy=0.9,bits=none]") == \
        "lora +compress svd budget=energy energy=0.9"
    assert chart_label("blora[quantize_base=true]") == "blora quantize_base=true"
    labels = [chart_label(s) for s in (ROOT / "reports/protocol/specs.txt").read_text().split()]
    assert len(set(labels)) == len(labels)  # no two protocol rows share a chart label


def test_chart_labels_of_coinciding_points_do_not_overlap():
    from stages.common.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2])
    _place_labels(ax, [(1.5, 1.5, "1"), (1.5, 1.5, "2"), (1.5, 1.5, "3"), (1.9, 1.1, "4")])
    offsets = [a.xyann[1] for a in ax.texts]
    plt.close(fig)
    assert len(set(offsets[:3])) == 3 and min(abs(a - b) for a in offsets[:3] for b in offsets[:3] if a != b) >= 7
    assert offsets[3] == 2  # a point apart keeps its label where it is


def test_restore_plans_each_pairs_selected_runs_and_skips_those_done():
    rows = pd.DataFrame([_row("lora", 1, 0.80, 100, factor=0.5, selected=False), _row("lora", 1, 0.81, 100),
                         _row("lora", 2, 0.82, 100, factor=0.5, selected=False), _row("lora", 2, 0.80, 100),
                         _row("lora", 3, 0.79, 100), _row("bone", 1, 0.70, 100, factor=2.0)])
    rows["selected"] = rows["selected"].astype(str)  # as read back from a study.csv
    assert restore_pairs(rows) == [{"task": "sst2", "method": "lora", "seeds": [1, 2, 3], "lr_factors": [1.0]},
                                   {"task": "sst2", "method": "bone", "seeds": [1], "lr_factors": [2.0]}]
    assert [p["method"] for p in restore_pairs(rows, done=rows[rows["method"] == "lora"])] == ["bone"]
    assert [p["method"] for p in restore_pairs(rows, only=["bone"])] == ["bone"]
    with pytest.raises(ConfigError, match="'eva' is not a row"):
        restore_pairs(rows, only=["eva"])
    rows.loc[4, "lr_factor"] = 2.0  # a seed selected at another factor: not one study's choice
    with pytest.raises(ConfigError, match="lr factors"):
        restore_pairs(rows)


def test_restore_keeps_a_rerun_only_if_it_reproduces_its_row_exactly():
    old = pd.DataFrame([_row("lora", 1, 0.8125, 100), _row("lora", 2, 0.7975, 100)])
    new = old.copy()
    check_reproduced(old, new)
    new.loc[1, "score"] = 0.7975000000000001  # one ulp is a different run, not noise to tolerate
    with pytest.raises(NotReproduced, match="seed 2 lr factor 1: score"):
        check_reproduced(old, new)
    new = old.copy()
    new.loc[0, "validation_score"] = 0.5
    with pytest.raises(NotReproduced, match="validation_score"):
        check_reproduced(old, new)
    with pytest.raises(NotReproduced, match="no earlier row"):
        check_reproduced(old.iloc[:1], old)


def test_compress_variants_run_the_compress_stage_and_plain_rows_do_not():
    assert parse_variant("lora_drop+compress") == ("lora_drop+compress", "lora_drop", {})
    assert parse_variant("lora[adapter.rank=16]+compress[rank=svd, bits=8]")[1:] == (
        "lora", {"adapter.rank": 16, "compress.rank": "svd", "compress.bits": 8})
    assert parse_variant("lora[adapter.rank=2]")[2] == {"compress.rank": "none", "compress.bits": "none",
                                                        "adapter.rank": 2}
    with pytest.raises(ConfigError, match="in brackets"):
        parse_variant("lora+compressrank=svd")


def test_peers_table_says_who_beats_whom():
    rows = [_row("lora", s, 0.84, 1000) for s in (1, 2, 3)]
    rows += [_row("lora_drop", s, 0.845, 600) for s in (1, 2, 3)]   # better and smaller than both peers
    rows += [_row("bone", s, 0.80, 1000) for s in (1, 2, 3)]        # worse and not smaller than eva
    rows += [_row("eva", s, 0.83, 900) for s in (1, 2, 3)]
    rows += [_row("svd_trim[energy=0.8]", s, 0.82, 500) for s in (1, 2, 3)]
    s = summary(pd.DataFrame(rows, columns=COLUMNS))
    verdicts = {(m, p): v for _, m, p, _, _, v in peer_rows(s)}
    assert verdicts[("lora_drop", "eva")] == "beats the peer"
    assert verdicts[("lora_drop", "svd_trim[energy=0.8]")] == "trade-off"  # better, but 100 more params
    assert verdicts[("bone", "eva")] == "**peer better**"
    assert not any(m in ("eva", "svd_trim[energy=0.8]") for m, _ in verdicts)  # peers are not compared to peers
    md = markdown(pd.DataFrame(rows, columns=COLUMNS), "# Method study", "cmd")
    assert "| sst2 | lora_drop | eva | +1.50 | -300 | beats the peer |" in md
    assert "| sst2 | svd_trim[energy=0.8] | accuracy |" in md and "| 50.0 |" in md  # stored % of LoRA


def test_append_keeps_earlier_rows_except_the_methods_run_again(tmp_path):
    earlier = pd.DataFrame([_row("lora", s, 0.84, 1000) for s in (1, 2)] + [_row("eva", 1, 0.70, 900)],
                           columns=COLUMNS).drop(columns=["git"])  # a study.csv from before the git column
    earlier.to_csv(tmp_path / "study.csv", index=False)
    now = pd.DataFrame([_row("eva", s, 0.83, 900, git="abc123") for s in (1, 2)], columns=COLUMNS)
    merged = with_earlier_rows(now, pd.read_csv(tmp_path / "study.csv"))
    assert list(merged["method"]) == ["lora", "lora", "eva", "eva"]  # the earlier eva row is replaced
    assert merged["selected"].dtype == bool and merged["selected"].all()
    assert list(merged["git"].fillna("")) == ["", "", "abc123", "abc123"]
    assert summary(merged).set_index("method").loc["eva", "score_mean"] == pytest.approx(0.83)
    assert merged["params_hash"].isna().all()  # an older study.csv without the column


def test_append_merges_predictions_as_the_csv():
    earlier = paired.combine([_run(m, s, _lora_predictions(s), 1000)[1] for m in ("lora", "eva") for s in (1, 2)])
    now = paired.combine([_run("eva", s, _shifted(s, -2), 900)[1] for s in (1, 2, 3)])
    merged = paired.with_earlier(now, earlier)
    assert list(merged.drop_duplicates(["method", "seed"])[["method", "seed"]].itertuples(index=False, name=None)) == [
        ("lora", 1), ("lora", 2), ("eva", 1), ("eva", 2), ("eva", 3)]  # the earlier eva runs are replaced
    assert len(merged) == 5 * N and list(merged.columns) == paired.COLUMNS


@pytest.mark.parametrize("spec", [line.strip() for line in
                                  (ROOT / "reports" / "protocol" / "specs.txt").read_text().splitlines()
                                  if line.strip()])
def test_every_protocol_row_is_a_valid_run(spec):
    # a typo in a row would only surface hours into reports/protocol/run.sh
    label, method, settings = parse_variant(spec)
    params = load_params(overrides={**settings, "method.name": method, "data.validation_size": 2000})
    assert label == spec and params.method.name == method and get_method(method) is not None
    for key, value in settings.items():
        section, _, name = key.partition(".")
        holder = params.method_params() if section == method else getattr(params, section)
        assert getattr(holder, name) == value


@pytest.mark.parametrize("spec", ["lora+compress[confidance=null]", "blora[quantize_bse=true]"])
def test_a_misspelt_protocol_setting_is_refused(spec):
    _, method, settings = parse_variant(spec)
    with pytest.raises(ConfigError, match="confidance|quantize_bse"):
        load_params(overrides={**settings, "method.name": method}).method_params()
