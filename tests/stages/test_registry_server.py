"""Champion/challenger promotion and rollback against a real ``mlflow server`` (sqlite backend)
started here on 127.0.0.1, with tiny fake "models" (a config and one weights file each)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.services import FlakyProxy, mlflow_server, service_env

from stages.common.registry import CHALLENGER, CHAMPION, PREVIOUS, Limits, aliases, register_and_decide

NAME = "sst2-fake"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server, registry_uri=server)


@pytest.fixture(scope="module")
def experiment(client):
    return client.create_experiment("registry-test")


def register(client, experiment, tmp_path, score, stored=1000, limits=None, marker=None, registry=None):
    """Log a fake model folder as a run artifact and register it through ``registry`` (a client)."""
    model = tmp_path / f"model-{score}-{stored}"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "marker": marker or str(score)}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(model), "model")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
    metrics = {"score": score, "accuracy": score, "stored_params": stored, "latency_merged_ms": 5.0,
               "trivial_score": 0.5, "gain_over_trivial": score - 0.5, "constant_predictions": False}
    return register_and_decide(registry or client, NAME, source, run_id, metrics,
                               {"method": "fake", "base_model": "none"}, limits or Limits())


def test_first_then_worse_then_better_then_rollback(client, experiment, server, tmp_path):
    first = register(client, experiment, tmp_path, 0.80, marker="first")
    assert first["promoted"] and first["version"] == "1"
    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "1"}

    worse = register(client, experiment, tmp_path, 0.75)
    assert not worse["promoted"] and "does not beat champion v1" in worse["reasons"][-1]
    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "2"}
    assert client.get_model_version(NAME, "2").tags["decision"] == "rejected"

    too_big = register(client, experiment, tmp_path, 0.95, stored=10**6, limits=Limits(max_adapter_params=10**5))
    assert not too_big["promoted"] and aliases(client, NAME)[CHAMPION] == "1"

    better = register(client, experiment, tmp_path, 0.85, limits=Limits(margin=0.01, max_adapter_params=10**5))
    assert better["promoted"] and better["previous_champion"] == "1"
    assert aliases(client, NAME) == {CHAMPION: "4", CHALLENGER: "4", PREVIOUS: "1"}
    v4 = client.get_model_version(NAME, "4")
    assert v4.tags["decision"] == "promoted" and float(v4.tags["metric.score"]) == 0.85
    assert v4.tags["method"] == "fake" and json.loads(v4.tags["decision.reasons"])

    # the champion is loadable by alias
    import mlflow

    mlflow.set_tracking_uri(server)
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}@{CHAMPION}", dst_path=str(tmp_path / "dl"))
    assert json.loads(open(f"{path}/config.json").read())["marker"] == "0.85"

    cli = [sys.executable, "-m", "flows.registry", "--name", NAME, "--tracking-uri", server]
    out = subprocess.run(cli[:3] + ["rollback"] + cli[3:], capture_output=True, text=True, env=service_env())
    assert out.returncode == 0, out.stderr
    assert "champion is now v1 (was v4)" in out.stdout
    assert aliases(client, NAME) == {CHAMPION: "1", CHALLENGER: "4"}  # v1 had no predecessor
    assert client.get_model_version(NAME, "4").tags["decision"] == "rolled back to v1"
    again = subprocess.run(cli[:3] + ["rollback"] + cli[3:], capture_output=True, text=True, env=service_env())
    assert again.returncode == 2 and "nothing to roll back to" in again.stderr
    status = subprocess.run(cli[:3] + ["status", "--json"] + cli[3:], capture_output=True, text=True,
                            env=service_env())
    info = json.loads(status.stdout)
    assert info["aliases"][CHAMPION] == "1" and [v["version"] for v in info["versions"]] == ["4", "3", "2", "1"]


def test_registry_unreachable_at_the_alias_call_moves_no_alias(client, experiment, server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries would ride out the outage
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    before = aliases(client, NAME)
    port = int(server.rsplit(":", 1)[1])
    proxy = FlakyProxy(port)
    try:
        flaky = MlflowClient(tracking_uri=proxy.url, registry_uri=proxy.url)
        proxy.trip_on(b"registered-models/alias", outage_s=5)
        with pytest.raises(MlflowException, match="alias"):
            register(client, experiment, tmp_path, 0.99, registry=flaky)  # would be promoted
        assert proxy.tripped.is_set()
    finally:
        proxy.close()
    assert aliases(client, NAME) == before  # champion, challenger, previous-champion all where they were
    newest = max(client.search_model_versions(f"name = '{NAME}'"), key=lambda m: int(m.version))
    assert newest.tags["decision"] in ("pending", "failed") and newest.version not in before.values()


def test_rollback_chain_on_the_local_sqlite_store(tmp_path):
    """The default store (no server): aliases come back as ints there; two rollbacks walk the chain."""
    from mlflow.tracking import MlflowClient

    from stages.common.registry import rollback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = local.create_experiment("local", artifact_location=(tmp_path / "art").as_uri())
    for score in (0.70, 0.80, 0.90):
        assert register(local, exp, tmp_path, score)["promoted"]
    assert aliases(local, NAME) == {CHAMPION: "3", CHALLENGER: "3", PREVIOUS: "2"}
    assert rollback(local, NAME)["champion"] == "2"
    assert aliases(local, NAME) == {CHAMPION: "2", CHALLENGER: "3", PREVIOUS: "1"}
    assert rollback(local, NAME)["champion"] == "1"
    assert aliases(local, NAME) == {CHAMPION: "1", CHALLENGER: "3"}
