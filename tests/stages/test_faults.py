"""Faults that lose nothing, each against the real component: a disk that fills while a checkpoint
or the merged model is written, the MLflow server dying in the middle of finetune, SIGTERM to a
Prefect flow run while finetune trains, and two promotions racing into one registered model.

The pipeline is real and small: MiniLM, method lora, 160 SST-2 examples, 3 epochs of 10 steps,
a checkpoint every 2 steps; prepare..decide run once for the module (``dvc repro decide``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from support.helpers import REPO, env, run, scratch_repo
from support.services import RestartableMlflow, mlflow_server, prefect_server

CHECKPOINT = Path(".lora_sieve") / "checkpoints" / "finetune.json"
STEPS = 30


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    repo = scratch_repo(tmp_path_factory.mktemp("faults") / "repo", {
        "method.name": "lora", "data.train_size": 160, "train.epochs": 3, "train.checkpoint_every": 2,
        "adapter.targets": ["q", "v"]})
    run(["dvc", "repro", "decide"], repo)
    return repo


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    repo = _copy(prepared, tmp_path_factory.mktemp("trained"))
    run([sys.executable, "-m", "stages.finetune"], repo)
    run([sys.executable, "-m", "stages.compress"], repo)
    run([sys.executable, "-m", "stages.merge"], repo)
    return repo


def _copy(repo: Path, where: Path) -> Path:
    dest = where / "repo"
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error [")]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _checkpoint_step(repo: Path) -> int:
    from stages.common.checkpoint import load_checkpoint

    state = load_checkpoint(repo / CHECKPOINT)
    assert state is not None
    return int(state["step"])


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- disk full

@pytest.mark.parametrize("nth, resume", [(3, False), (4, True)], ids=["tensor-file", "json-commit"])
def test_disk_full_while_checkpointing_keeps_previous_and_resumes(prepared, tmp_path, nth, resume):
    """Checkpoint 2 (step 4) hits ENOSPC in its tensor file (3rd write) or its JSON commit (4th):
    the step-2 checkpoint stays the valid one, nothing else is left, the next run resumes from it."""
    repo = _copy(prepared, tmp_path)
    proc = run([sys.executable, "tests/support/fault_inject.py", str(CHECKPOINT.parent), str(nth), "-m", "stages.finetune"],
               repo, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    folder = repo / CHECKPOINT.parent
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and "finetune.json" in names and any(n.endswith(".safetensors") for n in names), names
    assert _checkpoint_step(repo) == 2
    assert not (repo / "data" / "finetune" / "adapter.safetensors").exists()
    if resume:
        again = run([sys.executable, "-m", "stages.finetune"], repo)
        assert "resuming from step 2" in again.stdout
        summary = json.loads((repo / "data" / "finetune" / "summary.json").read_text())
        assert summary["resumed_from_step"] == 2 and summary["steps"] == STEPS
        assert not (repo / CHECKPOINT).exists()


def test_disk_full_while_writing_merged_model_keeps_previous(trained, tmp_path):
    repo = _copy(trained, tmp_path)
    merged = repo / "data" / "merge" / "model"
    before = _tree_digest(merged)
    proc = run([sys.executable, "tests/support/fault_inject.py", "data/merge/model", "1", "-m", "stages.merge"], repo,
               check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in proc.stderr
    assert _tree_digest(merged) == before  # the previous merged model, byte for byte
    assert not [p.name for p in merged.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    run([sys.executable, "-m", "stages.merge"], repo)  # with space again, merge completes
    assert (merged / "config.json").is_file()


# ----------------------------------------------------------------------------- damaged artifacts, real stages

@pytest.mark.parametrize("stage, artifact, damage, producer", [
    ("compress", "data/finetune/adapter.safetensors", "truncate", "finetune"),
    ("merge", "data/compress/adapter.safetensors", "truncate", "compress"),
    ("decide", "data/score/importance.parquet", "truncate", "score"),
    ("finetune", "data/decide/plan.json", "foreign", "decide"),
])
def test_damaged_artifact_is_one_line_and_writes_nothing(trained, tmp_path, stage, artifact, damage, producer):
    repo = _copy(trained, tmp_path)
    path = repo / artifact
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        path.write_text(json.dumps([{"method": "lora"}]))  # valid JSON, not a plan
    outputs = repo / "data" / stage
    before = _tree_digest(outputs) if outputs.exists() else {}
    runs_before = _mlflow_runs(repo)
    proc = run([sys.executable, "-m", f"stages.{stage}"], repo, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error [{stage}]: {artifact}"), lines
    assert f"rerun the {producer} stage" in lines[0]
    assert (_tree_digest(outputs) if outputs.exists() else {}) == before  # nothing written
    assert _mlflow_runs(repo) == runs_before  # not even a tracking run


def _mlflow_runs(repo: Path) -> int:
    import sqlite3

    with sqlite3.connect(repo / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


# ----------------------------------------------------------------------------- tracking server down

def test_mlflow_server_dies_mid_finetune(prepared, tmp_path):
    """The server is SIGKILLed while finetune trains: training finishes and its outputs are written,
    the stage says what it could not log, and a flush after the restart delivers all of it."""
    repo = _copy(prepared, tmp_path)
    server = RestartableMlflow(tmp_path / "mlflow")
    url = server.start()
    e = {**env(), "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
         "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "stages.finetune"], cwd=repo, env=e, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: (repo / CHECKPOINT).is_file(), 300, proc, "the first checkpoint")
        server.kill()
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "stopped answering" in err and "not logged to MLflow at" in err, err[-3000:]
        assert "Traceback" not in err
        assert (repo / "data" / "finetune" / "adapter.safetensors").is_file()
        spools = list((repo / ".lora_sieve" / "unlogged").glob("*.jsonl"))
        assert len(spools) == 1
        run_id = spools[0].stem

        server.start()  # same port, same store
        flushed = subprocess.run([sys.executable, "-m", "stages.common.tracking", "flush"], cwd=repo, env=e,
                                 capture_output=True, text=True, timeout=300)
        assert flushed.returncode == 0 and "0 still pending" in flushed.stdout, flushed.stdout + flushed.stderr
        assert not list((repo / ".lora_sieve" / "unlogged").glob("*.jsonl"))

        from mlflow.tracking import MlflowClient

        client = MlflowClient(url)
        info = client.get_run(run_id)
        assert info.info.status == "FINISHED" and info.data.tags["stage"] == "finetune"
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, STEPS + 1))
        assert "summary.json" in [a.path for a in client.list_artifacts(run_id)]
    finally:
        server.stop()


# ----------------------------------------------------------------------------- SIGTERM to a flow run

def _post(api: str, endpoint: str) -> list[dict]:
    req = urllib.request.Request(f"{api}/{endpoint}", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _flow_runs(api: str) -> list[dict]:
    return _post(api, "flow_runs/filter")


def test_sigterm_to_flow_run_stops_at_checkpoint_and_resumes(prepared, tmp_path):
    repo = _copy(prepared, tmp_path)
    with prefect_server(tmp_path / "prefect") as (api, client_env):
        e = {**env(), **client_env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        cmd = [sys.executable, "-m", "flows.pipeline", "--repo", str(repo), "--stages", "finetune", "--no-exp"]
        with open(tmp_path / "flow1.log", "w") as log:
            flow = subprocess.Popen(cmd, cwd=repo, env=e, stdout=log, stderr=subprocess.STDOUT)
            _wait_for(lambda: (repo / CHECKPOINT).is_file(), 600, flow, "finetune's first checkpoint")
            os.kill(flow.pid, signal.SIGTERM)
            code = flow.wait(timeout=300)
        text = (tmp_path / "flow1.log").read_text()
        assert code != 0, text[-4000:]
        assert "stopped by SIGTERM" in text, text[-4000:]
        runs = _flow_runs(api)
        assert len(runs) == 1 and runs[0]["state_type"] in ("FAILED", "CANCELLED"), runs[0]["state_type"]
        step = _checkpoint_step(repo)  # the checkpoint written at the step boundary after the signal
        assert 2 <= step < STEPS
        assert not (repo / "data" / "finetune" / "adapter.safetensors").exists()
        tasks = _post(api, "task_runs/filter")
        assert [t["run_count"] for t in tasks if t["name"].startswith("finetune")] == [1]  # stopped, not retried

        again = subprocess.run(cmd, cwd=repo, env=e, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
        summary = json.loads((repo / "data" / "finetune" / "summary.json").read_text())
        assert summary["resumed_from_step"] == step and summary["steps"] == STEPS
        states = sorted(r["state_type"] for r in _flow_runs(api))
        assert states in (["COMPLETED", "FAILED"], ["CANCELLED", "COMPLETED"]), states


# ----------------------------------------------------------------------------- concurrent promotions

def _race(url: str, name: str, unlocked: bool) -> list[dict]:
    start_at = time.time() + 12  # unused with the barrier below (kept for running the worker by hand)
    barrier = Path(tempfile.mkdtemp(prefix=f"barrier-{name}-"))
    worker_env = {**env(), "PROMOTE_BARRIER": str(barrier), "PROMOTE_WORKERS": "2"}
    procs = [subprocess.Popen([sys.executable, "tests/support/promote_worker.py", url, name, str(score), str(start_at)]
                              + (["--unlocked"] if unlocked else []), cwd=REPO,
                              env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for score in (0.85, 0.90)]
    records = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        records.append(json.loads(out.strip().splitlines()[-1]))
    return records


def test_two_concurrent_promotions(tmp_path):
    from mlflow.tracking import MlflowClient

    sys.path.insert(0, str(REPO))
    from stages.common.registry import CHAMPION, LOCK_SUFFIX, PREVIOUS, Limits, aliases, register_and_decide

    with mlflow_server(tmp_path / "mlflow") as url:
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        exp = client.create_experiment("seed")
        metrics = {"score": 0.80, "gain_over_trivial": 0.3, "trivial_score": 0.5}
        for name in ("race-unlocked", "race"):
            run_id = client.create_run(exp).info.run_id
            client.log_text(run_id, "{}", "model/config.json")
            src = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
            assert register_and_decide(client, name, src, run_id, metrics, {}, Limits())["version"] == "1"

        # the hazard: unserialised, both promoters judge against the old champion v1
        unlocked = _race(url, "race-unlocked", unlocked=True)
        assert [r["previous_champion"] for r in unlocked] == ["1", "1"] and all(r["promoted"] for r in unlocked)

        records = _race(url, "race", unlocked=False)
        by_score = {r["score"]: r for r in records}
        assert sorted(r["version"] for r in records) == ["2", "3"]  # every version registered
        versions = client.search_model_versions("name = 'race'")
        assert sorted(int(v.version) for v in versions) == [1, 2, 3]
        final = aliases(client, "race")
        best = by_score[0.90]["version"]
        assert final[CHAMPION] == best  # champion ends on the better one, whichever came first
        champion_mv = client.get_model_version("race", best)
        assert champion_mv.tags["decision"] == "promoted"
        # previous-champion is the champion that the last promotion replaced
        assert final[PREVIOUS] == champion_mv.tags["previous_champion"] == by_score[0.90]["previous_champion"]
        # serialised: the second promoter saw the first one's result
        first, second = sorted(records, key=lambda r: int(r["version"]))
        assert second["previous_champion"] == (first["version"] if first["promoted"] else "1")
        assert not [m.name for m in client.search_registered_models() if m.name.endswith(LOCK_SUFFIX)]
