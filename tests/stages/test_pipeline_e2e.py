"""`dvc repro` end to end on the real MiniLM and a small SST-2 subset from ../shared/data."""

import json
import sqlite3

import pytest
import torch
import yaml
from support.helpers import REPO, run, scratch_repo, set_params

pytestmark = pytest.mark.slow


def _ran(proc) -> list[str]:
    text = proc.stdout + proc.stderr
    return [ln.split("'")[1] for ln in text.splitlines() if ln.startswith("Running stage")]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = scratch_repo(tmp_path_factory.mktemp("e2e") / "repo")
    first = run(["dvc", "repro"], repo)
    ran = _ran(first)
    assert sorted(ran) == sorted(["resolve", "prepare", "calibrate", "score", "decide", "finetune", "compress", "merge",
                                  "evaluate", "promote"])
    assert ran.index("resolve") < ran.index("calibrate") and ran[-1] == "promote"
    return repo


def test_metrics_and_artifacts(repo):
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["dev_accuracy"] <= 1.0 and 0.0 <= metrics["validation_accuracy"] <= 1.0
    assert metrics["score"] == metrics["dev_accuracy"] and metrics["score_split"] == "dev"
    assert metrics["trivial_score"] == pytest.approx(max(metrics["trivial_accuracy"], 0.0))
    # validation is carved from the training split and disjoint from the rows trained on
    import pandas as pd

    train = pd.read_parquet(repo / "data/prepare/train.parquet")
    validation = pd.read_parquet(repo / "data/prepare/validation.parquet")
    assert len(validation) == 64 and len(train) == 480
    timings = json.loads((repo / "data/evaluate/timings.json").read_text())
    assert timings["latency_merged_ms"] > 0 and "latency_merged_ms" not in metrics
    assert metrics["max_abs_diff_unmerged_vs_merged"] < 1e-4
    assert 0 < metrics["trainable_ratio_to_lora"] <= 1.0
    plan = json.loads((repo / "data/decide/plan.json").read_text())
    assert plan["method"] == "lora_drop" and len(plan["groups"]) == 6
    for png in ("training_loss.png", "importance.png"):
        assert (repo / "data/evaluate/plots" / png).read_bytes()[:4] == b"\x89PNG"


def test_merged_folder_and_peft_export_load_without_lora_sieve(repo):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(repo / "data/merge/model").eval()
    cfg = json.loads((repo / "data/merge/peft/adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, repo / "data/merge/peft").eval()
    tok = AutoTokenizer.from_pretrained(repo / "data/merge/model")
    enc = tok(["a gorgeous , witty film", "dull and lifeless"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**enc).logits, merged(**enc).logits, rtol=1e-4, atol=1e-4)


def test_second_repro_does_nothing_and_eval_param_reruns_only_evaluate(repo):
    import time

    start = time.perf_counter()
    assert _ran(run(["dvc", "repro"], repo)) == []
    print(f"no-op dvc repro: {time.perf_counter() - start:.2f}s")
    set_params(repo, {"evaluate.latency_batches": 2})
    assert _ran(run(["dvc", "repro"], repo)) == ["evaluate", "promote"]  # new metrics: a new registry version


def test_mlflow_parent_run_with_a_child_per_stage(repo):
    con = sqlite3.connect(repo / "mlflow.db")
    parents = con.execute("select t.run_uuid from tags t join runs r on r.run_uuid = t.run_uuid "
                          "where t.key='pipeline' and t.value='true' order by r.start_time").fetchall()
    assert parents
    first = parents[0][0]
    children = con.execute("select r.run_uuid, r.status from runs r join tags t on r.run_uuid=t.run_uuid "
                           "where t.key='mlflow.parentRunId' and t.value=?", (first,)).fetchall()
    assert all(s == "FINISHED" for _, s in children)
    stages = {v for (v,) in con.execute("select t.value from tags t join tags p on t.run_uuid = p.run_uuid where "
                                        "t.key='stage' and p.key='mlflow.parentRunId' and p.value=?", (first,))}
    declared = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert len(children) == len(stages) and stages == declared - {"resolve"}  # resolve logs no run
    commit = con.execute("select value from tags where run_uuid=? and key='git_commit'", (children[0][0],)).fetchone()
    # the run rewrote tracked outputs (data/resolve, data/compress/curve.csv, ...) and dvc.lock: no code changed
    assert commit and len(commit[0]) >= 40 and not commit[0].endswith("-dirty")
    hashes = con.execute("select count(*) from tags where key like 'dvc.stage_hash.%'").fetchone()[0]
    assert hashes > 0


def test_only_the_selected_method_settings_are_dependencies(repo):
    # an unselected method's section: nothing is stale
    set_params(repo, {"bone.block_size": 8, "dora_dr.t_end": 0.6})
    status = run(["dvc", "status"], repo).stdout
    assert "up to date" in status, status
    assert _ran(run(["dvc", "repro"], repo)) == []
    # the selected method's decision key: the plan is remade, the calibration probe is not rerun
    set_params(repo, {"lora_drop.threshold": 0.5})
    ran = _ran(run(["dvc", "repro"], repo))
    assert "resolve" in ran and "decide" in ran and "calibrate" not in ran, ran
    # a calibration key reruns calibrate
    set_params(repo, {"lora_drop.probe_lr": 5e-4})
    assert "calibrate" in _ran(run(["dvc", "repro"], repo))
