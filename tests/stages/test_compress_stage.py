"""The compress stage on a real tiny run (MiniLM, SST-2 subset, LoRA-drop with shared pairs).

The compact file reloads to the evaluated logits bit for bit; the PEFT exports of the trimmed, quantised
adapter give them up to float rounding; a shared pair is trimmed once and stays shared; the search never
reads dev; reruns are byte-identical; bad settings are one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from support.helpers import run, scratch_repo, set_params

pytestmark = pytest.mark.slow
UPSTREAM = ["resolve", "prepare", "calibrate", "score", "decide", "finetune"]
# threshold 0.5: LoRA-drop shares pairs within groups; compress searches budget and bits (the defaults)
SETTINGS = {"lora_drop.threshold": 0.5, "compress.rank": "output", "compress.budget": "search",
            "compress.bits": "search", "compress.tolerance": 0.5}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = scratch_repo(tmp_path_factory.mktemp("compress") / "repo", SETTINGS, git=False)
    for stage in [*UPSTREAM, "compress", "merge", "evaluate"]:
        run([sys.executable, "-m", f"stages.{stage}"], repo)
    return repo


def _copy(repo: Path, where: Path) -> Path:
    dest = where / "repo"
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def _outputs(repo: Path) -> dict[str, bytes]:
    return {p: (repo / "data/compress" / p).read_bytes() for p in ("adapter.safetensors", "summary.json", "curve.csv")}


def _dev_inputs(repo: Path):
    from transformers import AutoTokenizer

    dev = pd.read_parquet(repo / "data/prepare/dev.parquet")
    tok = AutoTokenizer.from_pretrained(repo / "data/merge/model")
    return tok(list(dev["sentence"])[:32], return_tensors="pt", padding=True, truncation=True, max_length=32)


def _merged_logits(repo: Path, enc) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(repo / "data/merge/model").eval()
    with torch.no_grad():
        return merged(**enc).logits


def test_compressed_and_shared_pairs_trimmed_once(repo):
    summary = json.loads((repo / "data/compress/summary.json").read_text())
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert summary["applied"] and metrics["compressed"]
    assert metrics["stored_bytes"] == summary["stored_bytes"] < metrics["lora_fp32_bytes"]
    assert metrics["stored_params"] == summary["stored_params"]
    assert 0 < metrics["stored_bytes_ratio_to_lora_fp32"] < 1
    # the stored model is what was chosen: evaluate's validation metric is the search's
    assert metrics["validation_accuracy"] == pytest.approx(summary["validation"], abs=1e-9)
    curve = pd.read_csv(repo / "data/compress/curve.csv")
    assert len(curve) == summary["evaluations"] - 1 and curve["chosen"].sum() == 1  # -1: the reference

    from safetensors import safe_open

    with safe_open(str(repo / "data/compress/adapter.safetensors"), framework="pt") as fh:
        layout = json.loads(fh.metadata()["lora_sieve_compressed"])["pairs"]
    plan = json.loads((repo / "data/decide/plan.json").read_text())
    shared_groups = [g for g in plan["groups"].values() if g["shared"]]
    assert shared_groups, "LoRA-drop at threshold 0.5 should share pairs"
    for group in shared_groups:
        holders = [p for p in layout if set(group["shared"]) <= set(p["modules"])]
        assert len(holders) == 1 and sorted(holders[0]["modules"]) == sorted(group["shared"])  # one pair, once
    assert sum(len(p["modules"]) for p in layout) == len(plan["modules"])


def test_compact_file_reloads_to_the_evaluated_logits_bit_for_bit(repo, monkeypatch):
    from lora_ops.targets import unload
    from stages.common.params import load_params
    from stages.common.product import load_product

    monkeypatch.chdir(repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = _dev_inputs(repo)
    expected = _merged_logits(repo, enc)
    compact = repo / "data/merge/adapter/adapter.safetensors"
    assert compact.read_bytes() == (repo / "data/compress/adapter.safetensors").read_bytes()
    params = load_params()
    product = load_product(params, json.loads((repo / "data/decide/plan.json").read_text()), compact)
    layers = [m for m in product.model.modules() if hasattr(m, "lora")]
    assert len({id(m.lora) for m in layers}) < len(layers)  # shared pairs stay shared when reloaded
    model = unload(product.model, merge=True).eval()
    with torch.no_grad():
        got = model(**enc).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("folder", ["peft", "peft_serve"])
def test_peft_reload_of_the_trimmed_quantised_export(repo, folder):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = json.loads((repo / "data/merge" / folder / "adapter_config.json").read_text())
    summary = json.loads((repo / "data/compress/summary.json").read_text())
    if folder == "peft" and len(set(summary["ranks"].values()) - {0}) > 1:
        assert cfg["rank_pattern"]  # heterogeneous trimmed ranks
    enc = _dev_inputs(repo)
    base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, repo / "data/merge" / folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**enc).logits, _merged_logits(repo, enc), rtol=1e-4, atol=1e-4)


def test_rerun_is_byte_identical_and_poisoned_dev_changes_nothing(repo, tmp_path):
    copy = _copy(repo, tmp_path)
    before = _outputs(copy)
    run([sys.executable, "-m", "stages.compress"], copy)
    assert _outputs(copy) == before
    dev_path = copy / "data/prepare/dev.parquet"
    dev = pd.read_parquet(dev_path)
    dev["label"] = 1 - dev["label"]  # every dev label wrong
    dev["sentence"] = dev["sentence"].iloc[::-1].to_numpy()
    dev.to_parquet(dev_path, index=False)
    run([sys.executable, "-m", "stages.compress"], copy)
    assert _outputs(copy) == before
    dev_path.write_bytes(b"not a parquet file")  # a stage that read dev would now fail
    run([sys.executable, "-m", "stages.compress"], copy)
    assert _outputs(copy) == before


def test_off_passes_the_finetuned_adapter_through_byte_for_byte(repo, tmp_path):
    copy = _copy(repo, tmp_path)
    set_params(copy, {"compress.rank": "none", "compress.bits": "none"})
    for stage in ("compress", "merge"):
        run([sys.executable, "-m", f"stages.{stage}"], copy)
    finetuned = (copy / "data/finetune/adapter.safetensors").read_bytes()
    assert (copy / "data/compress/adapter.safetensors").read_bytes() == finetuned
    assert not json.loads((copy / "data/compress/summary.json").read_text())["applied"]
    meta = json.loads((copy / "data/merge/adapter/lora_sieve.json").read_text())
    assert "compressed" not in meta


def test_fixed_setting_without_search(repo, tmp_path):
    copy = _copy(repo, tmp_path)
    set_params(copy, {"compress.rank": "svd", "compress.budget": "energy", "compress.energy": 0.9,
                      "compress.bits": 8})
    run([sys.executable, "-m", "stages.compress"], copy)
    summary = json.loads((copy / "data/compress/summary.json").read_text())
    assert summary["applied"] and summary["bits"] == 8 and summary["evaluations"] == 2  # reference + the setting
    assert len(pd.read_csv(copy / "data/compress/curve.csv")) == 1


@pytest.mark.parametrize("key, value, message", [
    ("compress.tolerance", -1.0, "compress.tolerance"),
    ("compress.bits", 3, "compress.bits: bits must be none, search or one of 4, 8"),
    ("compress.rank", "fisher", "compress.rank: rank must be none or a criterion"),
    ("compress.energy", 0.0, "compress.energy"),
])
def test_bad_settings_are_one_line_exit_2_nothing_written(repo, tmp_path, key, value, message):
    copy = _copy(repo, tmp_path)
    shutil.rmtree(copy / "data/compress")
    set_params(copy, {key: value})
    proc = run([sys.executable, "-m", "stages.compress"], copy, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error [compress]:") and message in lines[0], lines
    assert not (copy / "data/compress").exists()


def test_recovery_is_chosen_on_validation_and_is_what_evaluate_scores(repo, tmp_path):
    from safetensors import safe_open

    copy = _copy(repo, tmp_path)
    set_params(copy, {"compress.budget": "components", "compress.components": 6, "compress.bits": 8,
                      "compress.recovery_steps": 4})
    run([sys.executable, "-m", "stages.compress"], copy)
    summary = json.loads((copy / "data/compress/summary.json").read_text())
    assert summary["recoveries"] == 1 and summary["recovery_steps_run"] == 4
    curve = pd.read_csv(copy / "data/compress/curve.csv")
    assert list(curve["recovered"]) == [False, True] and curve["chosen"].sum() == 1
    judged = curve["metric_bound"].fillna(curve["metric"])
    assert bool(curve.loc[curve["chosen"], "recovered"].iloc[0]) == bool(judged.iloc[1] > judged.iloc[0])
    assert summary["recovered"] == bool(curve.loc[curve["chosen"], "recovered"].iloc[0])
    with safe_open(str(copy / "data/compress/adapter.safetensors"), "pt") as f:
        settings = json.loads(f.metadata()["lora_sieve_compressed"])["settings"]
        head = {k: f.get_tensor(k) for k in f.keys() if k.startswith("head.")}
    assert ("recovery_steps" in settings) == summary["recovered"]
    with safe_open(str(copy / "data/finetune/adapter.safetensors"), "pt") as f:
        trained_head = {f"head.{k}": f.get_tensor(k) for k in f.keys() if k.startswith("classifier.")}
    assert head.keys() == trained_head.keys()
    assert all(torch.equal(head[k], trained_head[k]) for k in head) != summary["recovered"]
    first = _outputs(copy)
    run([sys.executable, "-m", "stages.compress"], copy)
    assert _outputs(copy) == first  # recovery is seeded: a rerun gives the same bytes
    for stage in ("merge", "evaluate"):
        run([sys.executable, "-m", f"stages.{stage}"], copy)
    metrics = json.loads((copy / "data/evaluate/metrics.json").read_text())
    # the stored (recovered or not) adapter is what evaluate scores: its validation is the chosen candidate's
    assert metrics["validation_accuracy"] == pytest.approx(summary["validation"], abs=1e-9)
