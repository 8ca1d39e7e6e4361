"""MLflow tracking: one pipeline execution = one parent run, one child run per stage.

Stages run as separate processes (DVC launches them), so the parent is found through
``LORA_SIEVE_PARENT_RUN_ID`` (set by the Prefect flow) or the small state file
``.lora_sieve/parent_run.json``: a stage joins the open parent unless that parent already
has a child for this stage (a new execution), and ``promote`` (the last stage) closes it. The store is a
local sqlite file inside the repository unless ``MLFLOW_TRACKING_URI`` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

FINAL_STAGE = "promote"  # the last stage in dvc.yaml closes the parent run


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_stage_hashes(root: Path) -> dict[str, str]:
    """Short hash of each stage's entry in dvc.lock (deps, params and outs as DVC recorded them)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: hashlib.sha1(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:12]
            for name, entry in stages.items()}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


class StageRun:
    """Context manager around one stage's MLflow child run."""

    def __init__(self, stage: str, params: dict[str, Any], root: Path | str = ".") -> None:
        self.stage = stage
        self.params = params
        self.root = Path(root).resolve()
        self.state_file = self.root / ".lora_sieve" / "parent_run.json"
        self.run_id: str | None = None
        self.parent_id: str | None = None

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> StageRun:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(self.root)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        name = self.params.get("tracking", {}).get("experiment", "lora-sieve")
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            artifacts = os.environ.get("LORA_SIEVE_ARTIFACTS") or (self.root / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        commit = git_commit(self.root)
        hashes = dvc_stage_hashes(self.root)
        self.parent_id = self._parent(exp_id, commit)
        tags = {"mlflow.parentRunId": self.parent_id, "mlflow.runName": self.stage, "stage": self.stage,
                "git_commit": commit, "method": self.params.get("method", {}).get("name", ""),
                **{f"dvc.stage_hash.{k}": v for k, v in hashes.items()}}
        self.run_id = self.client.create_run(exp_id, tags=tags).info.run_id
        flat = {k: str(v)[:500] for k, v in flatten(self.params).items()}
        self._log_params(self.run_id, flat)
        return self

    def _parent(self, exp_id: str, commit: str) -> str:
        env_parent = os.environ.get("LORA_SIEVE_PARENT_RUN_ID")
        if env_parent:
            return env_parent
        if self.state_file.is_file():
            try:
                state = json.loads(self.state_file.read_text())
                run = self.client.get_run(state["run_id"])
                has_stage = self.client.search_runs(
                    [exp_id], filter_string=f"tags.mlflow.parentRunId = '{state['run_id']}' "
                                            f"and tags.stage = '{self.stage}'", max_results=1)
                if run.info.status == "RUNNING" and not has_stage:
                    return state["run_id"]
            except Exception:  # stale or foreign state file: start a new execution
                pass
        method = self.params.get("method", {}).get("name", "")
        task = self.params.get("task", {}).get("name", "")
        parent = self.client.create_run(exp_id, tags={
            "mlflow.runName": f"pipeline {method} {task} {time.strftime('%Y-%m-%d %H:%M:%S')}",
            "pipeline": "true", "git_commit": commit, "params_hash": params_hash(self.params), "method": method,
            "task": task, "model": self.params.get("model", {}).get("name", "")})
        pid = parent.info.run_id
        self._log_params(pid, {k: str(v)[:500] for k, v in flatten(self.params).items()})
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"run_id": pid}))
        return pid

    def _log_params(self, run_id: str, flat: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    # ---------------------------------------------------------------- logging
    def log_metrics(self, metrics: dict[str, float], step: int | None = None, parent: bool = False) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for rid in [self.run_id] + ([self.parent_id] if parent else []):
            for i in range(0, len(items), 500):
                self.client.log_batch(rid, metrics=items[i:i + 500])

    def log_history(self, rows: list[dict[str, float]], keys: tuple[str, ...] = ("loss", "lr")) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(r[k]), ts, int(r["step"])) for r in rows for k in keys if k in r]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str], parent: bool = False) -> None:
        for rid in [self.run_id] + ([self.parent_id] if parent else []):
            for k, v in tags.items():
                self.client.set_tag(rid, k, str(v))

    # --------------------------------------------------------------- teardown
    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        if exc_type is not None:
            self.client.set_tag(self.run_id, "error", f"{exc_type.__name__}: {exc}"[:5000])
            self.client.set_terminated(self.run_id, "FAILED")
            if self.parent_id and not os.environ.get("LORA_SIEVE_PARENT_RUN_ID"):
                self.client.set_terminated(self.parent_id, "FAILED")
                self.state_file.unlink(missing_ok=True)
            return
        self.client.set_terminated(self.run_id, "FINISHED")
        if self.stage == FINAL_STAGE and not os.environ.get("LORA_SIEVE_PARENT_RUN_ID"):
            self.client.set_terminated(self.parent_id, "FINISHED")
            self.state_file.unlink(missing_ok=True)


class NullRun:
    """Stand-in for :class:`StageRun` on data-parallel ranks other than 0 (only rank 0 logs)."""

    def __enter__(self) -> NullRun:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str):  # every logging call is a no-op
        return lambda *args, **kwargs: None


def stage_run(stage: str, params: dict[str, Any], root: Path | str = ".") -> StageRun | NullRun:
    from lora_ops import distributed

    return StageRun(stage, params, root) if distributed.is_main() else NullRun()
