"""The study's selection and report logic on hand-made rows (the real runs are in test_flows)."""

from __future__ import annotations

import pandas as pd
import pytest

from flows.study import (
    COLUMNS,
    choose_factor,
    markdown,
    pareto_chart,
    parse_variant,
    peer_rows,
    summary,
    targets,
    with_earlier_rows,
)
from lora_ops.methods import get_method
from lora_ops.methods.blora import BLoRAParams
from stages.common.params import ConfigError


def _row(method, seed, score, stored, factor=1.0, selected=True, validation=None, **kw):
    r = dict.fromkeys(COLUMNS)
    r.update(task="sst2", method=method, seed=seed, lr=1e-3 * factor, lr_factor=factor, selected=selected,
             metric="accuracy", score=score, validation_score=score if validation is None else validation,
             trivial_score=0.5, trainable_params=stored, stored_params=stored, pct_of_lora=100 * stored / 1000,
             train_seconds=10.0, peak_rss_mb=900.0, trained=True)
    r.update(kw)
    return r


def test_lr_choice_uses_validation_and_prefers_the_recipe_on_ties():
    sweep = [_row("lora", 1, 0.90, 1000, f, validation=v) for f, v in ((0.5, 0.80), (1.0, 0.85), (2.0, 0.85))]
    assert choose_factor(sweep) == 1.0  # tie between 1 and 2: the recipe's own value
    sweep[0]["validation_score"] = 0.86
    sweep[0]["score"] = 0.10  # dev plays no part
    assert choose_factor(sweep) == 0.5


def test_closed_gates_counts_rank_and_bit_levels():
    ctl = {"modules": [{"rank": 6, "max_rank": 8, "bits_A": 8, "bits_B": 32},
                       {"rank": 8, "max_rank": 8, "bits_A": 32, "bits_B": 2}]}
    # 2 rank gates + 8-bit (2 levels below 32) + 2-bit (4 levels)
    figures = get_method("blora").report_figures(ctl, BLoRAParams(bits=[2, 4, 8, 16, 32]))
    assert figures == {"gates_closed": 2 + 2 + 4}
    assert get_method("lora").report_figures(ctl, get_method("lora").params_model()) == {}


def test_summary_targets_report_and_chart(tmp_path):
    rows = [_row("lora", s, 0.84 + 0.002 * s, 1000) for s in (1, 2, 3)]
    rows += [_row("lora_drop", s, 0.835, 550) for s in (1, 2, 3)]  # 55 %, -0.7 pt: met
    rows += [_row("bone", s, 0.80, 1000) for s in (1, 2, 3)]  # -4.4 pt: not met
    rows += [_row("bat", s, 0.81, 1000) for s in (1, 2, 3)]
    rows += [_row("blora", s, 0.84, 1000, bops_ratio_adapter=0.4, gates_closed=12) for s in (1, 2, 3)]
    rows.append(_row("lora", 1, 0.70, 1000, factor=2.0, selected=False))  # a sweep run: not in the means
    df = pd.DataFrame(rows, columns=COLUMNS)
    s = summary(df)
    lora = s[s["method"] == "lora"].iloc[0]
    assert lora["n"] == 3 and lora["score_mean"] == pytest.approx(0.844) and lora["score_std"] == pytest.approx(0.002)
    verdicts = {t.split(": ", 1)[1].split(" ")[0]: v for t, _, v in targets(s)}
    assert verdicts == {"lora_drop": "met", "bone": "**not met**", "bat": "met", "blora": "met"}
    md = markdown(df, "# Method study", "python -m flows.study --methods lora")
    assert "| sst2 | lora | accuracy | 0.8440 ± 0.0020 | 3 |" in md
    assert "| sst2 | lora | 2 | 2.0e-03 | 0.7000 | 0.7000 |  |" in md  # the sweep row, not chosen
    pareto_chart(df, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_method_variants_parse_to_overrides():
    assert parse_variant("lora") == ("lora", "lora", {})
    assert parse_variant("lora_drop[threshold=0.6, probe_epochs=1]") == (
        "lora_drop[threshold=0.6, probe_epochs=1]", "lora_drop", {"lora_drop.threshold": 0.6,
                                                                   "lora_drop.probe_epochs": 1})
    with pytest.raises(ConfigError, match="key=value"):
        parse_variant("lora_drop[threshold]")


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
