"""A pipeline flow run picked up and executed by a real Prefect worker on a process work pool.

The test starts a real ``prefect server`` on 127.0.0.1, creates a ``process`` work pool, deploys
the pipeline to it with ``flows.deploy``, triggers a run and starts ``prefect worker start
--run-once``: the run must complete on the worker (not in the process that scheduled it) and
leave the stage's output in the workspace. Only the ``prepare`` stage runs, to keep it quick.
"""

import json
import re
import subprocess
import sys
import time

import pytest
from support.helpers import scratch_repo
from support.services import prefect_server, service_env

pytestmark = pytest.mark.slow


def test_flow_run_is_executed_by_a_process_worker(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    with prefect_server(tmp_path / "prefect") as (_api, penv):
        env = service_env(**penv, PYTHONPATH="", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")

        def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
            proc = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            return proc

        cli("prefect", "work-pool", "create", "lora-pool", "--type", "process")
        out = cli(sys.executable, "-m", "flows.deploy", "--pool", "lora-pool", "--name", "on-workers",
                  "--repo", str(repo), "--stages", "prepare").stdout
        assert "lora-sieve-pipeline/on-workers" in out
        trig = cli("prefect", "deployment", "run", "lora-sieve-pipeline/on-workers").stdout
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", trig).group(1)
        assert not (repo / "data/prepare/train.parquet").exists()  # nothing ran where it was scheduled
        # the worker polls once, runs what is due (our run) in a subprocess and exits
        worker = cli("prefect", "worker", "start", "--pool", "lora-pool", "--run-once", timeout=600)
        state = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and state not in ("COMPLETED", "FAILED", "CRASHED"):
            listed = cli("prefect", "flow-run", "ls", "--flow-name", "lora-sieve-pipeline", "-o", "json").stdout
            mine = [r for r in json.loads(listed or "[]") if r["id"] == run_id]
            state = mine[0]["state_type"] if mine else None
            if state not in ("COMPLETED", "FAILED", "CRASHED"):
                time.sleep(2)
        assert state == "COMPLETED", f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
        assert (repo / "data/prepare/train.parquet").is_file()
