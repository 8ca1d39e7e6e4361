"""How a run's story is told (flows/summary.py, flows/report.py): the metric against the trivial predictor,
stored parameters and bytes against LoRA's, the decision and its reasons, MLflow links from the tracking URI.
The same code against real Prefect and MLflow servers: tests/flows/test_flows.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from flows.artifacts import json_cell
from flows.report import report_note
from flows.summary import RunStory, Storage, adapter_storage, model_version_url, run_url
from stages.common.paths import Paths

METRICS = {"main_metric": "accuracy", "score": 0.836, "trivial_score": 0.5092, "gain_over_trivial": 0.3268,
           "trivial_predictor": "always class 1 (training majority)", "best_validation": 0.8825,
           "score_split": "dev", "stored_params": 600, "plain_lora_params": 1200}
PROMOTED = {"enabled": True, "name": "sst2-minilm", "version": "3", "promoted": True, "champion": "3",
            "reasons": ["score gains +0.3268 over the trivial predictor (>= 0.01)",
                        "score 0.8360 beats champion v2 (0.8000) by +0.0360 > margin 0"]}


def story(decision: dict, uri: str = "http://127.0.0.1:5000") -> RunStory:
    return RunStory("lora_drop", "sst2", "minilm", METRICS, Storage(600, 1200, 1200, 2400, "f16"), decision, uri,
                    "7", "abc123", {"finetune": "ran", "promote": "ran"}, "lora_drop-run-1")


def test_adapter_storage_counts_tensor_bytes_and_prices_lora_at_the_same_precision(tmp_path):
    path = tmp_path / Paths.compact / "adapter.safetensors"
    path.parent.mkdir(parents=True)
    save_file({"a": torch.zeros(10, 20, dtype=torch.float16), "b": torch.zeros(20, 20, dtype=torch.float16)},
              str(path))
    s = adapter_storage(tmp_path, METRICS)
    assert (s.stored_params, s.lora_params, s.stored_bytes, s.lora_bytes, s.dtype) == (600, 1200, 1200, 2400, "f16")
    assert s.pct_of_lora == 50.0 and s.lora_basis == "plain LoRA at the adapter's precision (f16)"
    measured = adapter_storage(tmp_path, {**METRICS, "stored_bytes": 700, "lora_fp32_bytes": 4800})
    assert (measured.stored_bytes, measured.lora_bytes, measured.dtype) == (700, 4800, "")  # evaluate measured them
    assert measured.lora_basis == "plain LoRA in fp32 (metrics)"
    assert adapter_storage(tmp_path / "none", METRICS).stored_bytes is None


def test_markdown_and_paragraph_tell_metric_size_decision_and_links():
    s = story(PROMOTED)
    md = s.markdown()
    assert "**registered as sst2-minilm v3 and promoted to champion**" in md
    assert "| dev accuracy | 0.8360 | 0.5092 (always class 1 (training majority)) |" in md
    assert "| stored parameters | 600 | 1,200 (50.0% of LoRA) |" in md and "| stored bytes (f16) | 1.20 kB | 2.40 kB |" in md
    assert "- score 0.8360 beats champion v2 (0.8000) by +0.0360 > margin 0" in md
    assert "[abc123](http://127.0.0.1:5000/#/experiments/7/runs/abc123)" in md
    assert "[sst2-minilm v3](http://127.0.0.1:5000/#/models/sst2-minilm/versions/3)" in md
    paragraph = s.paragraph()
    assert "\n" not in paragraph
    assert paragraph.startswith("lora_drop on sst2 (minilm): dev accuracy 0.8360 vs 0.5092 for the trivial predictor")
    assert "stores 600 adapter parameters (50.0% of plain LoRA's 1,200) in 1.20 kB against LoRA's 2.40 kB" in paragraph
    assert "promoted to champion (score gains +0.3268" in paragraph and "lora_drop-run-1" in paragraph


def test_decisions_and_local_store_links():
    challenger = story({**PROMOTED, "promoted": False, "champion": "2"})
    assert challenger.decision_text() == "registered as sst2-minilm v3, a challenger: champion stays v2"
    assert challenger.decision_label == "challenger"
    assert story({"enabled": False, "promoted": False}).decision_label == "not registered"
    assert story({}).version_link is None and "did not run" in story({}).decision_text()
    local = story(PROMOTED, "sqlite:////w/mlflow.db")
    assert local.run_link == "http://127.0.0.1:5000/#/experiments/7/runs/abc123"
    assert "`make ui`" in local.markdown()  # the store is a file: say how to open the links
    assert run_url("https://mlflow.example/", "1", "r") == "https://mlflow.example/#/experiments/1/runs/r"
    assert model_version_url("http://h", "a b", "1") == "http://h/#/models/a%20b/versions/1"


def test_story_from_a_pipeline_result_and_table_fields():
    result = {"metrics": METRICS, "decision": PROMOTED, "mlflow_run_id": "abc123", "experiment": "e1",
              "stages": {"evaluate": "ran"}, "storage": Storage(600, 1200, 1200, 2400, "f16").as_dict(),
              "tracking": {"uri": "http://h:1", "experiment_id": "7", "method": "lora", "task": "rte", "model": "m"}}
    s = RunStory.from_result(result)
    assert (s.method, s.task, s.run_link) == ("lora", "rte", "http://h:1/#/experiments/7/runs/abc123")
    assert s.table_fields() == {"stored_bytes": 1200, "lora_bytes": 2400, "decision": "promoted",
                                "mlflow_run": "http://h:1/#/experiments/7/runs/abc123"}
    assert json_cell(float("nan")) is None and json_cell(pd.Series([3]).iloc[0]) == 3


def test_report_note_points_to_the_report_and_chart():
    df = pd.DataFrame([{"task": "sst2", "method": m, "seed": s, "metric": "accuracy", "score": v, "trivial_score": 0.5}
                       for m, s, v in [("lora", 1, 0.8), ("lora", 2, 0.82), ("lora_drop", 1, 0.84)]])
    files = [Path("reports/study.md"), Path("reports/study.csv"), Path("reports/study_pareto.png")]
    note = report_note("study", files, df)
    assert note.startswith("Study of lora, lora_drop on sst2, seeds 1, 2 (3 runs).")
    assert "sst2: lora_drop 0.8400 accuracy (trivial predictor 0.5000)" in note
    assert "`study/study.md`" in note and "`study/study_pareto.png`" in note and "`study/study.csv`" in note
