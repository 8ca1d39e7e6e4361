"""A method defined in this file alone goes through params validation, the shape checks, every stage
and a one-run study: the method interface is complete, nothing outside lora_ops/methods knows method ids."""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import Field
from support.helpers import scratch_repo
from torch import nn

import flows.paired as paired
import flows.study as study_flow
import flows.study_report as study_report
from lora_ops.adapters.base import AdapterLayer
from lora_ops.methods.base import (
    Method,
    MethodContext,
    PaperTarget,
    ShapeMismatch,
    register,
    unregister,
)
from lora_ops.methods.lora import own_lora
from lora_ops.methods.recipe import MethodParams
from lora_ops.targets import Target, inject
from lora_ops.training.controller import Controller
from stages.common.params import ConfigError, load_params
from stages.common.paths import Paths
from stages.common.shapes import check_model_shapes

pytestmark = pytest.mark.slow
STAGES = ["resolve", "prepare", "calibrate", "score", "decide", "finetune", "compress", "merge", "evaluate"]
TINY = {"data.train_size": 48, "data.dev_size": 32, "data.validation_size": 16, "train.batch_size": 16,
        "train.epochs": 1, "evaluate.batch_size": 32, "adapter.targets": ["q", "v"]}


class ToyParams(MethodParams):
    roles: list[str] = Field(default_factory=lambda: ["q"], min_length=1, description="roles that get a LoRA")
    max_rank: int = Field(4, ge=1, description="a limit the toy checks against the model's shapes")


class ToyController(Controller):
    def __init__(self, modules: int) -> None:
        self.modules = modules

    def summary(self) -> dict[str, Any]:
        return {"adapted_modules": self.modules}


class Toy(Method[ToyParams]):
    """LoRA on some roles only."""

    name = "toy"
    description = "test-only: LoRA on the roles its params name"
    params_model = ToyParams
    figure_labels = {"toy_modules": "toy modules"}

    def check_shapes(self, model: nn.Module, targets: list[Target], ctx: MethodContext[ToyParams]) -> None:
        if ctx.adapter.rank > ctx.params.max_rank:
            raise ShapeMismatch("toy.max_rank", f"adapter.rank {ctx.adapter.rank} is above {ctx.params.max_rank}")

    def build(self, model: nn.Module, targets: list[Target], plan: dict[str, Any], ctx: MethodContext[ToyParams]
              ) -> dict[str, AdapterLayer]:
        roles = set(ctx.params.roles)
        return inject(model, targets, lambda t, lin: own_lora(lin, ctx) if t.role in roles else None)

    def controller(self, model: nn.Module, plan: dict[str, Any], ctx: MethodContext[ToyParams]) -> Controller:
        return ToyController(sum(1 for t in plan["modules"].values() if t["role"] in ctx.params.roles))

    def report_figures(self, controller_summary: Mapping[str, Any] | None, params: ToyParams
                       ) -> dict[str, float | None]:
        return {"toy_modules": (controller_summary or {}).get("adapted_modules")}

    def paper_targets(self, task: str, rows: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any]
                      ) -> list[PaperTarget]:
        return [PaperTarget(f"{task}: toy within 50 pt of lora", -50.0, condition="adapts its roles",
                            condition_met=bool(rows[self.name]["toy_modules"] > 0))]


@pytest.fixture
def toy() -> Iterator[type[Toy]]:
    register(Toy)
    try:
        yield Toy
    finally:
        unregister(Toy.name)


def test_toy_method_through_params_shapes_stages_and_a_study(toy, tmp_path, monkeypatch):
    repo = scratch_repo(tmp_path / "repo", {**TINY, "method.name": "toy", "toy": {"roles": ["q"], "max_rank": 8}}, git=False)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    # params validation: the toy's own section, by its own schema
    with pytest.raises(ConfigError, match=r"toy\.roles"):
        load_params(repo / "params.yaml", {"toy.roles": []})
    params = load_params(repo / "params.yaml")
    assert params.method_params().roles == ["q"]

    # shape checks: the toy's own limit, reported on its own key
    assert check_model_shapes(params) == 12  # q and v of MiniLM's 6 layers
    with pytest.raises(ConfigError, match=r"toy\.max_rank: adapter\.rank 8 is above 4"):
        check_model_shapes(load_params(repo / "params.yaml", {"toy.max_rank": 4, "adapter.rank": 8}))

    # the pipeline: every stage, in process
    for stage in STAGES:
        importlib.import_module(f"stages.{stage}").main()
    plan = json.loads(Paths.plan.read_text())
    summary = json.loads(Paths.finetune_summary.read_text())
    metrics = json.loads(Paths.metrics.read_text())
    assert plan["method"] == "toy" and summary["controller"] == {"adapted_modules": 6}
    assert 0.0 <= metrics["score"] <= 1.0 and metrics["trainable_params"] > 0

    # a one-run study: the flow's own code, each run served from the stages above instead of DVC
    def served_run(overrides: dict[str, Any], repo: str, **_: Any) -> dict[str, Any]:
        assert overrides["method.name"] == "toy"
        ft = json.loads((Path(repo) / Paths.finetune_summary).read_text())
        return {"metrics": json.loads((Path(repo) / Paths.metrics).read_text()), "finetune": ft,
                "stages": {"finetune": "ran"}, "experiment": None, "mlflow_run_id": None}

    monkeypatch.setattr(study_flow, "pipeline", served_run)
    monkeypatch.setattr(study_flow, "get_run_logger", lambda: logging.getLogger("study"))
    monkeypatch.setattr(study_flow, "log_report_run", lambda *a, **k: "run-id")
    result = study_flow.study.fn(methods=["toy"], seeds=[params.seed], repo=str(repo), out_dir="reports")
    (row,) = result["rows"]
    assert row["method"] == "toy" and row["toy_modules"] == 6 and row["selected"]
    report = (repo / "reports" / "study.md").read_text()
    assert "| toy modules |" in report and "| sst2 | toy |" in report
    assert (repo / "reports" / "study_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert len(row["params_hash"]) == 12 and "git" in row

    # the sequential protocol's extension: only the new seed runs; the earlier row and predictions stay
    csv = str(repo / "reports" / "study.csv")
    extended = study_flow.study.fn(methods=[], seeds=[], repo=str(repo), out_dir="reports/extended", append=csv,
                                   pairs=[{"task": "sst2", "method": "toy", "seeds": [params.seed + 1],
                                           "lr_factors": [1.0], "extends": True}])
    assert [r["seed"] for r in extended["rows"]] == [params.seed + 1]
    grown = pd.read_csv(repo / "reports" / "extended" / "study.csv")
    assert sorted(grown["seed"]) == [params.seed, params.seed + 1] and grown["selected"].all()
    grown_preds = pd.read_parquet(repo / "reports" / "extended" / "predictions.parquet")
    assert sorted(grown_preds["seed"].unique()) == [params.seed, params.seed + 1]
    assert "toy seeds " + str(params.seed + 1) in (repo / "reports" / "extended" / "study.md").read_text()

    # its per-example predictions, kept by the study, and its paper target as a paired claim against the
    # reference method's predictions (here: the toy's own run relabelled, a difference of exactly 0)
    df = pd.read_csv(repo / "reports" / "study.csv")
    preds = pd.read_parquet(repo / "reports" / "predictions.parquet")
    assert list(preds.columns) == paired.COLUMNS and len(preds) == TINY["data.dev_size"]
    assert set(preds["method"]) == {"toy"}
    lora = df.iloc[0].to_dict() | {"method": "lora", "toy_modules": None}
    both = pd.concat([df, pd.DataFrame([lora])], ignore_index=True)
    both_preds = pd.concat([preds, preds.assign(method="lora")], ignore_index=True)
    (check,) = study_report.targets(study_report.summary(both), paired.selected(both, both_preds), draws=200)
    assert check.target.what == "sst2: toy within 50 pt of lora" and check.against == "lora"
    assert check.difference is not None and check.difference.mean == 0.0 and check.verdict == "met"
