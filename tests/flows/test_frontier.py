"""The LoRA-by-rank frontier and the compress targets on constructed study rows (flows.frontier)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_study import LABELS, N, _lora_predictions, _run, _shifted

import flows.paired as paired
from flows import frontier
from flows.study import ROOT, rebuild
from flows.study_report import COLUMNS, markdown, pareto_chart, summary
from flows.variants import parse_variant
from lora_ops.methods.base import reference_method
from stages.common.params import ConfigError

LORA_BYTES = 10_000
#: label -> (stored bytes, examples changed against rank-8 LoRA per seed: negative = more wrong)
ROWS = {
    "lora": (LORA_BYTES, 0),
    "lora+compress[rank=none,bits=4]": (1_400, 0),
    "lora[adapter.rank=1]": (1_300, -20),               # a cheaper frontier point, 5 points worse
    "lora[adapter.rank=1]+compress[rank=none,bits=4]": (200, -20),
    "lora+compress": (150, 0),                          # 1.5 %: LoRA's dev at fewer bytes than any frontier point
    "lora+compress[rank=svd]": (1_000, -8),             # worse than the rank-1 point... at more bytes
    "lora+compress[rank=svd,budget=energy,energy=0.9,bits=none]": (4_000, 0),
    "lora+compress[budget=components,components=8,bits=none]": (900, -2),
    "lora+compress[rank=svd,budget=components,components=8,bits=none]": (900, -10),
}


def _frontier_study():
    runs = [_run(label, s, _shifted(s, d) if d else _lora_predictions(s), 1000, stored_bytes=b)
            for label, (b, d) in ROWS.items() for s in (1, 2, 3)]
    df = pd.DataFrame([r for r, _ in runs], columns=COLUMNS)
    return df, paired.combine([p for _, p in runs])


def test_frontier_members_are_plain_reference_rows_with_every_component_kept():
    ref = reference_method()
    members = [label for label in ROWS if frontier.is_frontier(label, parse_variant, ref)]
    assert members == ["lora", "lora+compress[rank=none,bits=4]", "lora[adapter.rank=1]",
                       "lora[adapter.rank=1]+compress[rank=none,bits=4]"]
    assert not frontier.is_frontier("lora_drop", parse_variant, ref)  # another method: never the frontier
    assert not frontier.is_frontier("lora[dropout=0.1]", parse_variant, ref)  # LoRA, but not plain


def test_envelope_keeps_points_better_than_every_smaller_one():
    p = [frontier.Point(str(i), b, s, {}) for i, (b, s) in enumerate([(100, 80.0), (200, 79.0), (300, 85.0)])]
    assert [x.label for x in frontier.frontier(p)] == ["0", "2"]


def test_placement_against_the_frontier_is_a_paired_verdict():
    df, preds = _frontier_study()
    s = summary(df)
    chosen = paired.selected(df, preds)
    placed = {p.label: p for p in frontier.place(s, chosen, parse_variant, reference_method(), draws=300)}
    assert set(placed) == {label for label in ROWS if not frontier.is_frontier(label, parse_variant, "lora")}
    small = placed["lora+compress"]
    assert small.at_size is None and small.verdict == "smaller than every frontier point"
    assert small.matched.label == "lora" and small.matched_difference.mean == 0  # LoRA's dev at 1.5 % of its bytes
    svd = placed["lora+compress[rank=svd]"]  # 1,000 bytes: the int4 rank-1 point (200 bytes) is at its size
    assert svd.at_size.label == "lora[adapter.rank=1]+compress[rank=none,bits=4]"
    assert svd.at_size_difference.mean == pytest.approx(3.0, abs=1e-4) and svd.verdict == "**above**"  # -2 vs -5 pt (float32 metric)
    assert svd.matched.label == "lora[adapter.rank=1]"  # the largest point it is not 0.5 pt worse than
    md = "\n".join(frontier.section(list(placed.values())))
    assert "| sst2 | lora+compress | 0.1 KiB | – | – | smaller than every frontier point | lora (9.8 KiB) |" in md
    assert "| 1.5 % |" in md


def test_compress_targets_size_peer_and_criterion():
    df, preds = _frontier_study()
    s = summary(df)
    checks = frontier.compress_targets(s, paired.selected(df, preds), parse_variant, reference_method(), draws=300)
    by = {(c.method, c.target.what): c for c in checks}
    size = by["lora+compress", "≤ 2 % of lora's fp32 bytes at its dev"]
    assert size.target.condition == "stores 1.50 %" and size.verdict == "met"
    peft = "fewer bytes than the PEFT-style trim at its dev"
    assert by["lora+compress", peft].verdict == "met"
    assert by["lora+compress", peft].against == "lora+compress[rank=svd,budget=energy,energy=0.9,bits=none]"
    assert by["lora+compress[rank=svd]", peft].verdict == "not met"  # -2 pt
    crit = by["lora+compress[budget=components,components=8,bits=none]",
              "output criterion beats svd at the same components"]
    assert crit.difference.mean == pytest.approx(2.0, abs=1e-4) and crit.verdict == "met"
    md = markdown(df, "# Study", "python -m flows.study", preds, draws=300)
    assert "## Against the LoRA-by-rank frontier" in md and "## Compress targets" in md
    # each verdict shows the test behind it: p on the mean's side and its Holm level; met needs p <= level
    test = by["lora+compress[rank=svd]", peft].holm
    assert test.startswith("below: ") and "≤" in test and f"| {test} | **not met** |" in md


def test_size_target_not_met_when_nothing_is_small_enough():
    df, preds = _frontier_study()
    df = df[df["method"] != "lora+compress"]
    checks = frontier.compress_targets(summary(df), paired.selected(df, preds), parse_variant, "lora", draws=300)
    size = [c for c in checks if "≤ 2 %" in c.target.what]
    assert len(size) == 1 and size[0].verdict == "not met" and "smallest trimmed row stores" in size[0].target.condition
    # a failed condition still takes its place in the Holm family: the claims after it keep their own verdicts
    crit = [c for c in checks if c.target.what.startswith("output criterion")]
    assert [c.verdict for c in crit] == ["met"]


def test_rebuild_merges_studies_and_draws_the_bytes_chart(tmp_path):
    df, preds = _frontier_study()
    for task in ("sst2", "cola"):
        d = tmp_path / task
        d.mkdir()
        df.assign(task=task).to_csv(d / "study.csv", index=False)
        paired.write(d / "predictions.parquet", preds.assign(task=task))
        (d / "study.md").write_text("# An earlier header, adapter rank 4\n\nCommand: `x`\n")  # never copied
    files = rebuild([str(tmp_path / t / "study.csv") for t in ("sst2", "cola")], ROOT, str(tmp_path / "merged"),
                    "cmd", draws=200, overrides={"data.validation_size": 123})
    md = files[0].read_text()
    # the header is made from params.yaml with the studies' -S settings and the rows, not from a study.md
    assert md.startswith("# Method study\n\nModel `minilm`") and "rank 4" not in md and "Rows of" not in md
    assert "(validation 123 carved from train)" in md and "seeds [1, 2, 3]" in md
    assert "Merged from `study.csv`, `study.csv` (columns `git`" in md  # outside the repo: names only
    assert "| cola | lora+compress | 0.1 KiB |" in md
    assert len(pd.read_csv(files[1])) == 2 * len(df) and len(paired.read(files[3])) == 2 * len(preds)
    assert files[2].read_bytes()[:4] == b"\x89PNG"
    # only some rows (the rank sweep out of a larger study): the others leave the table, CSV and predictions
    ranks = ["lora", "lora[adapter.rank=1]"]
    files = rebuild([str(tmp_path / "sst2" / "study.csv")], ROOT, str(tmp_path / "ranks"), "cmd", draws=200,
                    only=ranks, note="MRPC and RTE: validation 400.")
    assert "own is its `params_hash`. MRPC and RTE: validation 400.\n" in files[0].read_text()
    assert set(pd.read_csv(files[1])["method"]) == set(ranks) and set(paired.read(files[3])["method"]) == set(ranks)
    assert "## Where adapter capacity matters" in files[0].read_text()
    with pytest.raises(ConfigError, match="lora_drop"):
        rebuild([str(tmp_path / "sst2" / "study.csv")], ROOT, str(tmp_path / "x"), "cmd", only=["lora_drop"])
    # a run in two files with the same row (a study and its extension, or two shares of one extension, all
    # hold the study's rows) counts once: the report is the one-file report
    once = rebuild([str(tmp_path / "sst2" / "study.csv")], ROOT, str(tmp_path / "once"), "cmd", draws=200)
    twice = rebuild([str(tmp_path / "sst2" / "study.csv")] * 2, ROOT, str(tmp_path / "twice"), "cmd", draws=200)
    assert [f.read_bytes() for f in twice[1:2] + twice[3:]] == [f.read_bytes() for f in once[1:2] + once[3:]]
    # a run whose rows differ (run again elsewhere) is two runs under one name: refused, never averaged
    again = tmp_path / "again"
    again.mkdir()
    rerun = df.assign(task="sst2")
    rerun.loc[(rerun["method"] == "lora") & (rerun["seed"] == 1), "score"] += 0.01
    rerun.to_csv(again / "study.csv", index=False)
    paired.write(again / "predictions.parquet", preds.assign(task="sst2"))
    with pytest.raises(ConfigError, match=r"the run sst2 lora seed 1 lr factor 1 has 2 different rows \(in study.csv, study.csv\)"):
        rebuild([str(tmp_path / "sst2" / "study.csv"), str(again / "study.csv")], ROOT, str(tmp_path / "x"), "cmd")
    # rows alike but predictions not: refused as well
    rerun = preds.assign(task="sst2")
    first = rerun.index[(rerun["method"] == "lora") & (rerun["seed"] == 1)][0]
    rerun.loc[first, "prediction"] = 1 - rerun.loc[first, "prediction"]
    df.assign(task="sst2").to_csv(again / "study.csv", index=False)
    paired.write(again / "predictions.parquet", rerun)
    with pytest.raises(ConfigError, match=r"the run sst2 lora seed 1 lr factor 1 has different per-example predictions"):
        rebuild([str(tmp_path / "sst2" / "study.csv"), str(again / "study.csv")], ROOT, str(tmp_path / "x"), "cmd")
    pareto_chart(df.drop(columns=["stored_bytes"]), tmp_path / "params.png")  # an older study: parameters axis
    assert np.array_equal(LABELS[:4], [0, 1, 0, 1]) and N == 400


def test_capacity_gap_is_paired_and_names_the_smallest_rank_that_is_enough():
    sweep = {"lora[adapter.rank=16]": (20_000, 0), "lora": (10_000, 0), "lora[adapter.rank=4]": (5_000, 0),
             "lora[adapter.rank=2]": (2_500, -1), "lora[adapter.rank=1]": (1_300, -20), "lora+compress[rank=none,bits=4]": (1_400, -20)}
    runs = [_run(label, s, _shifted(s, d) if d else _lora_predictions(s), 1000, stored_bytes=b)
            for label, (b, d) in sweep.items() for s in (1, 2, 3)]
    rank_effect = pd.DataFrame([r for r, _ in runs], columns=COLUMNS)
    preds = paired.combine([p for _, p in runs])
    # a second task where rank changes nothing: every rank predicts as rank 8 does
    lora_score = rank_effect[rank_effect["method"] == "lora"].set_index("seed")["score"]
    flat = rank_effect.assign(task="cola", score=rank_effect["seed"].map(lora_score))
    flat_preds = pd.concat([p.assign(task="cola", prediction=_lora_predictions(p["seed"].iloc[0]))
                            for _, p in runs], ignore_index=True)
    df, preds = pd.concat([flat, rank_effect], ignore_index=True), pd.concat([flat_preds, preds], ignore_index=True)
    sweeps = frontier.capacity(summary(df), paired.selected(df, preds), parse_variant, reference_method(), draws=300)
    assert [c.task for c in sweeps] == ["sst2", "cola"]  # the largest gap first
    effect, none = sweeps
    # the int4 row is a stored variant, not a rank of the sweep
    assert [p.label for p in effect.ranks] == ["lora[adapter.rank=1]", "lora[adapter.rank=2]", "lora[adapter.rank=4]",
                                              "lora", "lora[adapter.rank=16]"]
    assert effect.gap.mean == pytest.approx(5.0, abs=1e-4) and effect.verdict == "**rank matters**"
    assert effect.enough.label == "lora[adapter.rank=4]" and effect.against_largest[-1] is None
    # rank 2 is one example worse per seed: not shown worse, but not shown within 0.5 point either
    assert effect.not_worse.label == "lora[adapter.rank=2]"
    assert none.gap.mean == 0 and none.verdict == "no clear effect" and none.enough.label == "lora[adapter.rank=1]"
    md = "\n".join(frontier.capacity_section(sweeps))
    assert ("| cola | accuracy | +0.00 [+0.00, +0.00] | no clear effect | lora[adapter.rank=1] | lora[adapter.rank=1] "
            "| lora[adapter.rank=1] 84.50") in md
    assert "| sst2 | accuracy | +5.00 [" in md and "lora[adapter.rank=1] 79.50: -5.00 [" in md


def test_parameters_panel_frontier_is_the_full_precision_ranks(tmp_path):
    params = {"lora": 1000, "lora+compress[rank=none,bits=4]": 1000, "lora[adapter.rank=1]": 125,
              "lora[adapter.rank=1]+compress[rank=none,bits=4]": 125, "lora+compress": 300}
    runs = [_run(label, s, _shifted(s, ROWS[label][1]) if ROWS[label][1] else _lora_predictions(s), n,
                 stored_bytes=ROWS[label][0]) for label, n in params.items() for s in (1, 2, 3)]
    df = pd.DataFrame([r for r, _ in runs], columns=COLUMNS)
    s = summary(df)
    front, envelope, others = frontier.chart_points_by_params(s, "sst2", parse_variant, reference_method())
    # int4 rows store as many parameters as their fp32 twins: on this axis only the fp32 ranks make the frontier
    assert [p.label for p in front] == ["lora", "lora[adapter.rank=1]"]
    assert [(p.label, p.stored_params) for p in envelope] == [("lora[adapter.rank=1]", 125), ("lora", 1000)]
    assert [p.label for p in others] == ["lora+compress"]
    assert len(frontier.chart_points(s, "sst2", parse_variant, reference_method())[0]) == 4  # bytes: all four
    from PIL import Image

    pareto_chart(df, tmp_path / "both.png")
    pareto_chart(df.drop(columns=["stored_bytes"]), tmp_path / "params.png")
    both, params_only = Image.open(tmp_path / "both.png").size, Image.open(tmp_path / "params.png").size
    assert both[0] == params_only[0] and both[1] > 1.8 * params_only[1]  # bytes and parameters: two rows
