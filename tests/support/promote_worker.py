"""One promoter process for the concurrent-promotion test:
``python tests/support/promote_worker.py URL NAME SCORE START_AT [--unlocked]``.

It logs a tiny model folder as a run artifact, waits until wall-clock START_AT (so that two workers
enter promotion together) and promotes it into NAME through a client that pauses 3 s after every
champion read: without serialisation both workers are then sure to compare against the same
champion. Prints the decision record as JSON."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, os.getcwd())
from stages.common import registry  # noqa: E402


class SlowReader(MlflowClient):
    def __init__(self, uri: str, name: str) -> None:
        super().__init__(tracking_uri=uri, registry_uri=uri)
        self.name = name

    def get_registered_model(self, name: str):  # the champion read inside a promotion
        model = super().get_registered_model(name)
        if name == self.name:
            time.sleep(3.0)
        return model


def main() -> None:
    url, name, score, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    client = SlowReader(url, name)
    exp_id = client.get_experiment_by_name("promote-race")
    if exp_id is None:
        try:
            exp_id = client.create_experiment(f"promote-race-{score}")
        except Exception:  # noqa: BLE001 - the other worker created it first
            exp_id = client.get_experiment_by_name(f"promote-race-{score}")
        exp_id = exp_id if isinstance(exp_id, str) else exp_id.experiment_id
    else:
        exp_id = exp_id.experiment_id
    run_id = client.create_run(exp_id).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({"model_type": "bert", "score": score}))
        client.log_artifacts(run_id, tmp, "model")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
    metrics = {"score": score, "gain_over_trivial": score - 0.5, "trivial_score": 0.5}
    promote = registry.register_unlocked if "--unlocked" in sys.argv else registry.register_and_decide
    # barrier: wait until every worker has imported and logged its model (a fixed start time is
    # missed on a loaded machine), then all enter promotion within one poll interval
    barrier = Path(os.environ["PROMOTE_BARRIER"]) if os.environ.get("PROMOTE_BARRIER") else None
    if barrier is not None:
        (barrier / f"{score}.ready").write_text("")
        deadline = time.monotonic() + 240  # monotonic: immune to wall-clock steps
        while len(list(barrier.glob("*.ready"))) < int(os.environ.get("PROMOTE_WORKERS", "2")):
            if time.monotonic() > deadline:
                sys.exit("promote_worker: the other worker never became ready")
            time.sleep(0.02)
    else:
        time.sleep(max(0.0, start_at - time.time()))
    record = promote(client, name, source, run_id, metrics, {"method": "fake"}, registry.Limits())
    print(json.dumps(record))


if __name__ == "__main__":
    main()
