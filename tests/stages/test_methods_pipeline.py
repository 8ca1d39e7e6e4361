"""Every method through all eight stages (in-process, real MiniLM, a tiny SST-2 subset).

The DVC wiring itself is covered by test_pipeline_e2e; here each stage's ``main`` runs in order
in a scratch copy of the repository, which checks each method's plug-in end to end in seconds.
"""

import importlib
import json
from pathlib import Path

import pandas as pd
import pytest
from support.helpers import scratch_repo

from lora_ops import available_methods

pytestmark = pytest.mark.slow
STAGES = ["resolve", "prepare", "calibrate", "score", "decide", "finetune", "compress", "merge", "evaluate"]
TINY = {"data.train_size": 64, "data.dev_size": 32, "data.validation_size": 32, "train.batch_size": 16,
        "train.epochs": 2, "evaluate.batch_size": 32}
CLASSIFICATION_METHODS = [m for m in available_methods() if m not in ("lora_drop", "loraprune")]


def _run_every_stage(overrides: dict, tmp_path, monkeypatch) -> tuple[Path, dict, dict]:
    """Each stage's ``main`` in order in a scratch repository with ``overrides``: (repo, metrics, plan)."""
    repo = scratch_repo(tmp_path / "repo", overrides, git=False)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for stage in STAGES:
        importlib.import_module(f"stages.{stage}").main()
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    plan = json.loads((repo / "data/decide/plan.json").read_text())
    return repo, metrics, plan


@pytest.mark.parametrize("method", CLASSIFICATION_METHODS)
def test_method_runs_through_every_stage(method, tmp_path, monkeypatch):
    repo, metrics, plan = _run_every_stage({**TINY, "method.name": method}, tmp_path, monkeypatch)
    assert plan["method"] == method
    assert 0.0 <= metrics["dev_accuracy"] <= 1.0 and metrics["trainable_params"] > 0
    assert (repo / "data/merge/model/model.safetensors").is_file()
    assert (repo / "data/evaluate/plots/structure.png").read_bytes()[:4] == b"\x89PNG"
    peft_dir = repo / "data/merge/peft"
    assert (peft_dir / "adapter_config.json").is_file() or (peft_dir / "NOT_EXPORTED.txt").is_file()
    compressed = json.loads((repo / "data/compress/summary.json").read_text())
    assert metrics["compressed"] == compressed["applied"] and metrics["stored_bytes"] == compressed["stored_bytes"]
    if compressed["applied"] or method != "blora":  # blora's own unmerged model is fake-quantised: its gap is
        # reported, not zero; compressed, every method is plain LoRA at the stored ranks
        assert metrics["max_abs_diff_unmerged_vs_merged"] < 1e-4
    else:
        assert "float_export_max_abs_diff" in metrics and "bops_ratio_total" in metrics
    # what is scored is the artifact: blora's quantised layers (the float merge beside them), else the merge
    scored_unmerged = method == "blora" and not compressed["applied"]
    assert metrics["scored_model"].startswith("unmerged") == scored_unmerged
    assert ("float_merge_dev_accuracy" in metrics) == scored_unmerged
    predictions = pd.read_parquet(repo / "data/evaluate/predictions.parquet")
    assert (predictions["prediction"] == predictions["label"]).mean() == pytest.approx(metrics["dev_accuracy"])


@pytest.mark.parametrize("quantize_base", [False, True])
def test_uncompressed_blora_is_scored_on_its_quantised_layers(quantize_base, tmp_path, monkeypatch):
    """Without the compress stage B-LoRA's artifact is its integer export: evaluate scores the fake-quantised
    layers (what its BOPs count) and shows the float merge beside them; with ``quantize_base`` (the paper's
    setting) the base weight's quantiser is in the scored layers too."""
    overrides = {**TINY, "method.name": "blora", "compress.rank": "none", "compress.bits": "none",
                 "blora.quantize_base": quantize_base}
    repo, metrics, _ = _run_every_stage(overrides, tmp_path, monkeypatch)
    assert metrics["scored_model"].startswith("unmerged") and "float_merge_dev_accuracy" in metrics
    assert metrics["max_abs_diff_unmerged_vs_merged"] > 0  # the quantisers are really in what was scored
    controller = json.loads((repo / "data/finetune/summary.json").read_text())["controller"]
    bops = controller["bops"]  # the base counts at its learned width only when it is quantised
    assert controller["quantize_base"] is quantize_base
    assert (bops["base"] == bops["baseline_base"]) is (not quantize_base)
    predictions = pd.read_parquet(repo / "data/evaluate/predictions.parquet")
    assert (predictions["prediction"] == predictions["label"]).mean() == pytest.approx(metrics["dev_accuracy"])


LM_TINY = {"model.name": "smollm2-135m", "task.name": "alpaca", "method.name": "loraprune",
           "data.train_size": 32, "data.dev_size": 8, "data.validation_size": 8, "model.max_length": 48, "train.batch_size": 8,
           "train.epochs": 1, "loraprune.prune_every": 1, "loraprune.min_score_updates": 1, "lm_eval.window": 64, "lm_eval.windows": 2,
           "evaluate.batch_size": 8}


def test_loraprune_on_smollm2_through_every_stage(tmp_path, monkeypatch):
    repo, metrics, plan = _run_every_stage(LM_TINY, tmp_path, monkeypatch)
    assert plan["grid"] and metrics["ppl_window"] == 64 and metrics["ppl_windows"] == 2
    assert metrics["wikitext2_ppl"] > 1 and metrics["ptb_ppl"] > 1
    assert metrics["params_merged"] < metrics["params_dense"]  # heads and channels physically removed
    # the trivial predictor of a causal LM is the unadapted base model
    assert metrics["trivial_score"] == metrics["dense_wikitext2_ppl"]
    assert metrics["gain_over_trivial"] == metrics["dense_wikitext2_ppl"] - metrics["wikitext2_ppl"]
    assert "validation_loss" in metrics
    # the pruned, merged model equals the masked, unmerged one
    assert metrics["max_abs_diff_unmerged_vs_merged"] < 1e-3
    assert (repo / "data/merge/peft/NOT_EXPORTED.txt").is_file()


def test_loraprune_on_a_classifier_scores_its_pruned_merge(tmp_path, monkeypatch):
    """LoRAPrune narrows MiniLM's heads and MLP channels per layer, which a stock config cannot describe:
    evaluate loads the merged folder with lora_ops' pruned-model loader, and scores that model."""
    overrides = {**TINY, "method.name": "loraprune", "loraprune.prune_every": 1, "loraprune.min_score_updates": 1}
    repo, metrics, _ = _run_every_stage(overrides, tmp_path, monkeypatch)
    config = json.loads((repo / "data/merge/model/config.json").read_text())
    assert "lora_sieve_pruning" in config
    assert metrics["max_abs_diff_unmerged_vs_merged"] < 1e-4  # the pruned merge equals the masked adapter
    # what it saves is in the base: fewer parameters than the dense base model
    assert metrics["params_merged"] < metrics["params_dense"]
    assert metrics["params_ratio_to_dense"] == metrics["params_merged"] / metrics["params_dense"]
    predictions = pd.read_parquet(repo / "data/evaluate/predictions.parquet")
    assert (predictions["prediction"] == predictions["label"]).mean() == pytest.approx(metrics["dev_accuracy"])
