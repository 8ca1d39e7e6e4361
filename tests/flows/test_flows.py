"""The Prefect flows against real services: one small pipeline run (MiniLM, 480 SST-2 examples)
under Prefect's test harness with a real ``mlflow server`` as tracking store and registry, then
cheap follow-up runs on the same workspace (DVC skips what did not change): a scheduled deployment
on a real ``prefect server``, the comparison table, promotion decisions, and the failure paths
(unknown override key, registry unreachable mid-run, failing stage).

Tests share one workspace and run in file order."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from support.helpers import no_git_identity, run, scratch_repo
from support.services import FlakyProxy, mlflow_server, prefect_server, service_env

from flows.compare import compare
from flows.pipeline import STAGES, pipeline
from stages.common.registry import CHALLENGER, CHAMPION, aliases

pytestmark = pytest.mark.slow
NAME = "sst2-minilm"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    base = tmp_path_factory.mktemp("orch")
    keys = ("MLFLOW_TRACKING_URI", "LORA_SIEVE_PARENT_RUN_ID", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    saved = {k: os.environ.get(k) for k in keys}
    with mlflow_server(base / "mlflow") as url:
        proxy = FlakyProxy(int(url.rsplit(":", 1)[1]))  # passes everything through until told to trip
        os.environ["MLFLOW_TRACKING_URI"] = proxy.url
        os.environ.pop("LORA_SIEVE_PARENT_RUN_ID", None)
        try:
            with prefect_test_harness(server_startup_timeout=None):
                yield SimpleNamespace(url=url, proxy=proxy, base=base)
        finally:
            proxy.close()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def client(services):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=services.url, registry_uri=services.url)  # direct, not via the proxy


@pytest.fixture(scope="module")
def first(services):
    repo = scratch_repo(services.base / "repo")
    t0 = time.monotonic()
    with no_git_identity(services.base / "empty-home"):  # as on a machine where git was never configured
        state = pipeline(overrides={"method.name": "lora_drop"}, repo=str(repo), return_state=True)
    print(f"first flow run: {time.monotonic() - t0:.0f}s")
    return SimpleNamespace(repo=repo, result=state.result(), state=state)


def latest_pipeline_run(client):
    exp = client.get_experiment_by_name("lora-sieve")
    runs = client.search_runs([exp.experiment_id], "tags.pipeline = 'true'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'")
    return runs[0], {c.data.tags["stage"]: c.info.status for c in children}


def leftovers(repo: Path) -> list[str]:
    return [str(p) for p in (repo / "data").rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def flow_logs(state) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs ship in the background

    async def read():
        async with get_client() as c:
            logs = await c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            return "\n".join(log.message for log in logs)

    return asyncio.run(read())


def flow_artifacts(flow_run_id) -> dict[str, SimpleNamespace]:
    """key -> (type, data) of a flow run's Prefect artifacts, read back through Prefect's client."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: SimpleNamespace(type=a.type, data=a.data, description=a.description)
            for a in asyncio.run(read())}


def assert_link_opens_the_run(link: str, client, run_id: str) -> None:
    """A link of a markdown artifact: the MLflow UI answers at its base, and it names the run's experiment."""
    import urllib.request

    base, route = link.split("/#/")
    with urllib.request.urlopen(base + "/", timeout=30) as page:
        assert page.status == 200
    assert route == f"experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}"


def test_flow_run_tracks_registers_and_saves_an_experiment(first, client):
    res, repo = first.result, first.repo
    assert res["stages"] == {s: "ran" for s in STAGES}
    stored = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert {k: v for k, v in res["metrics"].items() if k in stored} == stored  # + timings.json
    # the small budget learns: the first model beats its trivial predictor and takes the title
    assert res["metrics"]["gain_over_trivial"] >= 0.01 and not res["metrics"]["constant_predictions"]
    assert res["model_version"] == {"name": NAME, "version": "1", "promoted": True, "champion": "1"}
    # params.yaml is the user's: the flow put it back exactly
    committed = run(["git", "show", "HEAD:params.yaml"], repo).stdout
    assert (repo / "params.yaml").read_text() == committed
    # the run is a DVC experiment carrying the same metrics
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    exps = {r["name"]: r["data"] for e in shown for x in (e.get("experiments") or []) for r in x["revs"]}
    assert exps[res["experiment"]]["metrics"]["data/evaluate/metrics.json"]["data"]["score"] == res["metrics"]["score"]
    # ... saved although no git identity existed anywhere: lora-sieve's, given to that commit only, and said so
    committers = run(["git", "for-each-ref", "refs/exps", "--format=%(committername) %(committeremail)"],
                     repo).stdout.split("\n")
    assert "lora-sieve <lora-sieve@localhost>" in committers, committers
    assert "experiment commit by lora-sieve <lora-sieve@localhost>: no git identity" in flow_logs(first.state)
    assert run(["git", "config", "--local", "--get-regexp", "^user\\."], repo, check=False).stdout == ""
    # MLflow: the flow's parent run with one finished child per stage
    parent, children = latest_pipeline_run(client)
    assert parent.info.run_id == res["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert children == {s: "FINISHED" for s in STAGES if s != "resolve"}  # resolve logs no run
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.metrics["score"] == res["metrics"]["score"]
    # the registered version, its alias and lineage
    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "1"}
    tags = client.get_model_version(NAME, "1").tags
    adapter = (repo / "data/merge/adapter/adapter.safetensors").read_bytes()
    assert tags["lineage.adapter_sha256"] == hashlib.sha256(adapter).hexdigest()
    assert tags["lineage.plan_sha256"] == hashlib.sha256((repo / "data/decide/plan.json").read_bytes()).hexdigest()
    assert tags["method"] == "lora_drop" and tags["base_model"] == "minilm" and len(tags["git_commit"]) >= 40
    assert tags["dvc_lock_hash"] != "none" and tags["params_hash"] and tags["decision"] == "promoted"
    assert float(tags["metric.score"]) == res["metrics"]["score"]


def test_flow_run_tells_its_story_in_prefect_and_mlflow(first, client, services):
    """A markdown artifact on the flow run and the MLflow parent run's description say the same: the metric
    against the trivial predictor, stored parameters and bytes against LoRA's, the decision, the links."""
    res = first.result
    score, trivial = res["metrics"]["score"], res["metrics"]["trivial_score"]
    artifacts = flow_artifacts(first.state.state_details.flow_run_id)
    assert set(artifacts) == {"lora-sieve-pipeline-local-summary"} and res["summary_artifact"] in artifacts
    summary = artifacts["lora-sieve-pipeline-local-summary"]
    assert summary.type == "markdown" and "promoted to champion" in summary.description
    md = summary.data
    assert "**registered as sst2-minilm v1 and promoted to champion**" in md
    assert f"| dev accuracy | {score:.4f} | {trivial:.4f} (always class" in md
    stored = res["metrics"]["stored_params"]
    assert f"| stored parameters | {stored:,} | {res['metrics']['plain_lora_params']:,} (" in md
    assert res["storage"]["stored_bytes"] > 0 and "| stored bytes" in md
    assert all(f"- {reason}" in md for reason in res["decision"]["reasons"])
    run_link = re.search(r"MLflow run: \[\w+\]\(([^)]+)\)", md).group(1)
    assert run_link.startswith(services.proxy.url)  # the tracking URI the run used
    assert_link_opens_the_run(run_link, client, res["mlflow_run_id"])
    assert f"[sst2-minilm v1]({services.proxy.url}/#/models/sst2-minilm/versions/1)" in md
    # the MLflow parent run's description: the same, in one paragraph
    note = client.get_run(res["mlflow_run_id"]).data.tags["mlflow.note.content"]
    assert note.startswith(f"lora_drop on sst2 (minilm): dev accuracy {score:.4f} vs {trivial:.4f} for the trivial")
    assert f"stores {stored:,} adapter parameters" in note and "against LoRA's" in note
    assert "registered as sst2-minilm v1 and promoted to champion (score gains" in note and "\n" not in note


def test_same_result_as_dvc_repro_with_the_same_params(first):
    """The flow's dvc.lock is what `dvc repro` with these params accepts: nothing reruns, same metrics."""
    before = (first.repo / "data/evaluate/metrics.json").read_text()
    proc = run(["dvc", "repro"], first.repo)
    assert "Running stage" not in proc.stdout + proc.stderr
    assert (first.repo / "data/evaluate/metrics.json").read_text() == before


def test_fresh_dvc_repro_gives_the_same_metrics(first, tmp_path):
    """A separate workspace, plain `dvc repro`, same params: byte-identical adapter and metrics."""
    other = scratch_repo(tmp_path / "repro")
    run(["dvc", "repro"], other)
    for out in ("data/evaluate/metrics.json", "data/finetune/adapter.safetensors", "data/decide/plan.json"):
        assert (other / out).read_bytes() == (first.repo / out).read_bytes(), f"{out} differs"
    theirs = json.loads((other / "data/evaluate/metrics.json").read_text())
    assert {k: v for k, v in first.result["metrics"].items() if k in theirs} == theirs


def test_second_run_skips_every_stage_visibly(first, client):
    versions = len(client.search_model_versions(f"name = '{NAME}'"))
    state = pipeline(repo=str(first.repo), return_state=True)
    res = state.result()
    assert res["stages"] == {s: "skipped" for s in STAGES}
    assert res["model_version"]["version"] == "1" and res["metrics"] == first.result["metrics"]
    assert "stage finetune: skipped (DVC: inputs unchanged)" in flow_logs(state)
    assert len(client.search_model_versions(f"name = '{NAME}'")) == versions


def test_unknown_override_key_fails_before_anything_runs(first, client):
    runs_before = len(client.search_runs([client.get_experiment_by_name("lora-sieve").experiment_id]))
    params_before = (first.repo / "params.yaml").read_text()
    state = pipeline(overrides={"train.lrr": 0.1}, repo=str(first.repo), return_state=True)
    assert state.is_failed()
    assert "train.lrr: Extra inputs are not permitted" in state.message
    assert len(client.search_runs([client.get_experiment_by_name("lora-sieve").experiment_id])) == runs_before
    assert (first.repo / "params.yaml").read_text() == params_before
    cli = subprocess.run([sys.executable, "-m", "flows.pipeline", "--repo", str(first.repo), "-S", "method.name=nope"],
                         capture_output=True, text=True, env=service_env(), cwd=first.repo, timeout=300)
    assert cli.returncode == 2 and "unknown method 'nope'" in cli.stderr


def test_scheduled_deployment_on_a_prefect_server_runs_when_triggered(first, services, tmp_path):
    repo = first.repo
    cron = yaml.safe_load((repo / "params.yaml").read_text())["schedule"]["cron"]
    with prefect_server(tmp_path / "prefect") as (api, penv):
        env = service_env(**penv, MLFLOW_TRACKING_URI=services.proxy.url, PYTHONPATH="")
        log = open(tmp_path / "serve.log", "w")
        serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--repo", str(repo)], cwd=repo, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                insp = subprocess.run(["prefect", "deployment", "inspect", "lora-sieve-pipeline/nightly"],
                                      capture_output=True, text=True, env=env)
                if insp.returncode == 0:
                    break
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(2)
            assert insp.returncode == 0, insp.stdout + insp.stderr
            assert f"'cron': '{cron}'" in insp.stdout and "'timezone': 'UTC'" in insp.stdout
            trig = subprocess.run(["prefect", "deployment", "run", "lora-sieve-pipeline/nightly"],
                                  capture_output=True, text=True, env=env)
            assert trig.returncode == 0, trig.stdout + trig.stderr
            run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", trig.stdout).group(1)
            deadline = time.monotonic() + 300
            state = None
            while time.monotonic() < deadline and state not in ("COMPLETED", "FAILED", "CRASHED"):
                time.sleep(3)
                listed = subprocess.run(["prefect", "flow-run", "ls", "--flow-name", "lora-sieve-pipeline", "-o", "json"],
                                        capture_output=True, text=True, env=env).stdout
                mine = [r for r in json.loads(listed or "[]") if r["id"] == run_id]
                state = mine[0]["state_type"] if mine else None
            assert state == "COMPLETED", f"{state}\n" + (tmp_path / "serve.log").read_text()[-4000:]
            scheduled = [r for r in json.loads(listed) if r["state_type"] == "SCHEDULED"]
            assert scheduled, "the cron schedule should have queued future runs"
            # its summary is under the deployment's key: the Artifacts page shows the history of nightly runs
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: api}):
                artifacts = flow_artifacts(run_id)
            summary = artifacts["lora-sieve-pipeline-nightly-summary"]
            assert summary.type == "markdown" and "promoted to champion" in summary.data
            assert "MLflow run: [" in summary.data and f"{services.proxy.url}/#/experiments/" in summary.data
        finally:
            os.killpg(serve.pid, 2)  # Ctrl-C: the runner pauses the schedule and exits
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, 9)
                serve.wait()
            log.close()


def test_compare_writes_table_csv_plot_and_mlflow_run(first, client):
    state = compare(methods=["lora_drop"], repo=str(first.repo), out_dir="reports", return_state=True)
    res = state.result()
    out = first.repo / "reports"
    md = (out / "compare.md").read_text()
    assert "| sst2 | lora_drop | accuracy |" in md and "trainable params" in md
    csv = (out / "compare.csv").read_text().splitlines()
    assert csv[0].startswith("task,method,seed,metric,score") and len(csv) == 2
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert res["rows"][0]["score"] == first.result["metrics"]["score"]  # same data, budget, params
    arts = {a.path for a in client.list_artifacts(res["mlflow_run_id"], "compare")}
    assert arts == {"compare/compare.md", "compare/compare.csv", "compare/compare.png"}
    note = client.get_run(res["mlflow_run_id"]).data.tags["mlflow.note.content"]
    assert "`compare/compare.md`" in note and "`compare/compare.png`" in note and "lora_drop" in note
    # the flow run's Prefect artifacts: the report with each run's story, and one table row per run
    artifacts = flow_artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {"lora-sieve-compare-local-summary", "lora-sieve-compare-local-runs"}
    report = artifacts["lora-sieve-compare-local-summary"]
    assert report.type == "markdown" and "| sst2 | lora_drop | accuracy |" in report.data
    assert "**lora_drop** on sst2 seed 42: dev accuracy" in report.data and "not registered" in report.data
    run_link = re.search(r"MLflow report run: \[\w+\]\(([^)]+)\)", report.data).group(1)
    assert_link_opens_the_run(run_link, client, res["mlflow_run_id"])
    table = artifacts["lora-sieve-compare-local-runs"]
    [row] = json.loads(table.data)
    assert table.type == "table" and row["method"] == "lora_drop" and row["score"] == res["rows"][0]["score"]
    assert row["decision"] == "not registered" and row["stored_bytes"] > 0 and row["lora_bytes"] > 0
    assert_link_opens_the_run(row["mlflow_run"], client, row["mlflow_run_id"])


def test_study_sweeps_on_validation_and_reruns_from_the_cache(first, client):
    from flows.study import study

    # +compress: the params as the fixture's run had them (a plain row would switch the compress stage off)
    kw = dict(methods=["lora_drop+compress"], seeds=[42, 7], lr_factors=[1.0, 2.0], repo=str(first.repo),
              out_dir="reports")
    state = study(**kw, return_state=True)
    res = state.result()
    rows = res["rows"]
    assert [(r["seed"], r["lr_factor"]) for r in rows] == [(42, 1.0), (42, 2.0), (7, rows[2]["lr_factor"])]
    assert not rows[0]["trained"]  # factor 1 is the fixture's run: DVC's cache, not a second training
    sweep = rows[:2]
    chosen = max(sweep, key=lambda r: r["validation_score"])  # on validation, whatever dev says
    assert [r["selected"] for r in sweep] == [r is chosen for r in sweep] and rows[2]["selected"]
    assert rows[2]["lr_factor"] == chosen["lr_factor"]
    out = first.repo / "reports"
    md = (out / "study.md").read_text()
    assert "| sst2 | lora_drop+compress | accuracy |" in md and "Learning-rate sweep" in md
    assert (out / "study_pareto.png").read_bytes()[:4] == b"\x89PNG"
    arts = {a.path for a in client.list_artifacts(res["mlflow_run_id"], "study")}
    assert arts == {"study/study.md", "study/study.csv", "study/study_pareto.png", "study/predictions.parquet"}
    preds = pd.read_parquet(out / "predictions.parquet")  # every run's per-example dev predictions
    assert sorted(set(zip(preds["seed"], preds["lr_factor"]))) == sorted((r["seed"], r["lr_factor"]) for r in rows)
    assert "## Paired differences" not in md  # lora_drop alone: nothing to pair with
    note = client.get_run(res["mlflow_run_id"]).data.tags["mlflow.note.content"]
    assert "`study/study.md`" in note and "`study/study_pareto.png`" in note
    artifacts = flow_artifacts(state.state_details.flow_run_id)
    table = json.loads(artifacts["lora-sieve-study-local-runs"].data)
    assert [(r["seed"], r["lr_factor"], r["selected"]) for r in table] == [
        (r["seed"], r["lr_factor"], r["selected"]) for r in rows]  # one row per run, sweep included
    assert all(r["mlflow_run"].endswith(f"/runs/{r['mlflow_run_id']}") for r in table)
    assert "Learning-rate sweep" in artifacts["lora-sieve-study-local-summary"].data
    again = study(**kw)["rows"]  # same params, same code: every run comes back from DVC's run cache
    assert not any(r["trained"] for r in again)
    assert [r["score"] for r in again] == [r["score"] for r in rows]

    # the predictions file lost (another machine): --restore-predictions makes the selected runs' again, from
    # reruns that reproduce each row's scores exactly, and keeps every earlier row, sweep included
    from flows.study import restore

    (out / "predictions.parquet").unlink()
    files = restore(str(out / "study.csv"), first.repo, "restored", command="test")
    restored = first.repo / "restored"
    assert not (restored / ".restore").exists() and (restored / "study.md") in files
    assert pd.read_csv(restored / "study.csv")["score"].tolist() == [r["score"] for r in rows]
    kept = pd.read_parquet(restored / "predictions.parquet")
    chosen_runs = preds.merge(kept[["seed", "lr_factor"]].drop_duplicates(), on=["seed", "lr_factor"])
    assert sorted(set(zip(kept["seed"], kept["lr_factor"]))) == sorted(
        (r["seed"], r["lr_factor"]) for r in rows if r["selected"])
    pd.testing.assert_frame_equal(kept.sort_values(["seed", "example"]).reset_index(drop=True),
                                  chosen_runs.sort_values(["seed", "example"]).reset_index(drop=True))
    # in place, in the restored study's own folder (a fresh clone of a committed study): rows kept, predictions back
    rows_before = pd.read_csv(restored / "study.csv")
    (restored / "predictions.parquet").unlink()
    restore(str(restored / "study.csv"), first.repo, "restored", command="test")
    pd.testing.assert_frame_equal(pd.read_csv(restored / "study.csv"), rows_before)
    pd.testing.assert_frame_equal(pd.read_parquet(restored / "predictions.parquet"), kept)


def test_worse_challenger_leaves_the_champion(first, client):
    res = pipeline(overrides={"registry.margin": 0.5}, repo=str(first.repo))
    assert res["stages"]["promote"] == "ran" and res["stages"]["finetune"] == "skipped"
    assert res["model_version"] == {"name": NAME, "version": "2", "promoted": False, "champion": "1"}
    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "2"}
    assert "does not beat champion v1" in res["decision"]["reasons"][-1]


def test_registry_unreachable_mid_run(first, services, client, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    before = aliases(client, NAME)
    versions = len(client.search_model_versions(f"name = '{NAME}'"))
    services.proxy.trip_on(b"registered-models/alias", outage_s=8)  # dies when the first alias would move
    state = pipeline(overrides={"registry.margin": 0.25}, repo=str(first.repo), retries=0, return_state=True)
    assert services.proxy.tripped.is_set()
    assert state.is_failed() and "stage promote failed (exit 1): error [promote]: registry at" in state.message
    assert aliases(client, NAME) == before
    newest = client.get_model_version(NAME, str(versions + 1))  # created before the outage, never aliased
    assert newest.tags["decision"] == "pending"
    # the stage's final status went out while the server was away: it was spooled, and the next
    # contact delivers it (any later stage does that; here the flush a user would run)
    from stages.common.tracking import flush_unlogged, spool_dir

    for uri in {json.loads(line)["uri"] for f in spool_dir(first.repo).glob("*.jsonl")
                for line in f.read_text().splitlines() if line.strip()}:
        flush_unlogged(first.repo, uri)
    parent, children = latest_pipeline_run(client)
    assert parent.info.status == "FAILED" and children["promote"] == "FAILED"
    assert not (first.repo / "data/promote/decision.json").exists() and not leftovers(first.repo)


def test_failing_stage_fails_the_flow_and_the_run_cleanly(first, client):
    cfg = first.repo / "data/merge/model/config.json"
    cfg.unlink()
    try:
        state = pipeline(repo=str(first.repo), stages=["evaluate"], retries=0, return_state=True)
        assert state.is_failed()
        assert "stage evaluate failed (exit 2): error [evaluate]: data/merge/model is missing" in state.message
        parent, children = latest_pipeline_run(client)
        assert parent.info.status == "FAILED" and children == {"evaluate": "FAILED"}
        assert "stage evaluate failed" in parent.data.tags["error"]
        assert not (first.repo / "data/evaluate/metrics.json").exists() and not leftovers(first.repo)
    finally:
        run(["dvc", "checkout", "data/merge"], first.repo, check=False)
