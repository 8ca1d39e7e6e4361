"""DVC's side of the registry: the merged model is a declared ``artifacts:`` entry, and the
training-loss and structure plots are data-driven DVC plots that ``dvc plots diff`` draws for two
experiments in one chart (offline: ``--json`` gives the Vega-Lite specs with the data inlined)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from support.helpers import REPO
from support.services import service_env

DVC = str(Path(sys.executable).parent / "dvc")


def test_merged_model_is_a_dvc_model_artifact_labelled_with_task_and_method():
    from dvc.repo import Repo

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with Repo(str(REPO)) as repo:
        artifact = repo.artifacts.read()["dvc.yaml"]["merged-model"]
        merge_outs = {str(o.def_path) for s in repo.index.stages if s.name == "merge" for o in s.outs}
    assert artifact.type == "model" and artifact.path == "data/merge/model"
    assert f"task:{params['task']['name']}" in artifact.labels
    assert f"method:{params['method']['name']}" in artifact.labels
    assert params["method"]["name"] in artifact.desc and "from_pretrained" in artifact.desc
    # the artifact lives inside a stage output, so DVC versions (and can fetch) it
    assert any(artifact.path == o or artifact.path.startswith(o.rstrip("/") + "/") for o in merge_outs)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


def _experiment(repo: Path, loss_scale: float, rows: list[dict]) -> None:
    """Write the evaluate stage's plots exactly as it does (same functions), for one fake run."""
    from stages.common.plots import plot_loss, plot_structure

    plots = repo / "data/evaluate/plots"
    plots.mkdir(parents=True, exist_ok=True)
    history = pd.DataFrame({"step": range(1, 41), "loss": [loss_scale / (1 + 0.1 * i) for i in range(40)]})
    plot_loss(history, plots / "training_loss.png")
    plot_structure(rows, "dora_dr", plots / "structure.png")


def test_dvc_plots_diff_draws_two_experiments_in_one_chart(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    _git(repo, "init", "-q")
    env = service_env()
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True, env=env)
    module = "bert.encoder.layer.{}.attention.self.query"
    _experiment(repo, 1.0, [{"module": module.format(i), "rank": 4 + i} for i in range(3)])
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "dora_dr")
    _experiment(repo, 0.7, [{"module": module.format(i), "rank": 8 - i} for i in range(3)])
    _git(repo, "commit", "-qam", "another experiment")
    proc = subprocess.run([DVC, "plots", "diff", "HEAD~1", "HEAD", "--json"], cwd=repo, capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)["data"]

    [loss] = data["data/evaluate/plots/training_loss.csv"]
    assert loss["type"] == "vega" and sorted(loss["revisions"]) == ["HEAD", "HEAD~1"]
    spec = loss["content"]
    assert spec["encoding"]["x"]["field"] == "step" and spec["title"]["text"] == "training loss"
    values = spec["data"]["values"]
    by_rev = {rev: [float(v["loss"]) for v in values if v["rev"] == rev] for rev in ("HEAD", "HEAD~1")}
    assert len(by_rev["HEAD"]) == len(by_rev["HEAD~1"]) == 40
    assert by_rev["HEAD~1"][0] == pytest.approx(1.0) and by_rev["HEAD"][0] == pytest.approx(0.7)

    [structure] = data["data/evaluate/plots/structure.json"]
    spec = structure["content"]
    assert spec["mark"]["type"] == "bar" and spec["encoding"]["yOffset"]["field"] == "rev"  # grouped per revision
    ranks = {(v["rev"], v["module"]): float(v["rank"]) for v in spec["data"]["values"]}
    assert ranks[("HEAD~1", "00 query")] == 4 and ranks[("HEAD", "00 query")] == 8
    assert ranks[("HEAD", "02 query")] == 6
    # the PNGs stay image plots beside the data
    assert {"data/evaluate/plots/training_loss.png", "data/evaluate/plots/structure.png"} <= set(data)


def test_structure_data_for_a_method_without_learned_structure_is_empty(tmp_path):
    from stages.common.plots import plot_structure

    plot_structure([], "lora", tmp_path / "structure.png")
    assert json.loads((tmp_path / "structure.json").read_text()) == []
    assert (tmp_path / "structure.png").read_bytes()[:4] == b"\x89PNG"
