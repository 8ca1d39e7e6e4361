"""MLflow tracking: one pipeline execution = one parent run, one child run per stage.

Stages run as separate processes (DVC launches them), so the parent is found through
``LORA_SIEVE_PARENT_RUN_ID`` (set by the Prefect flow) or the small state file
``.lora_sieve/parent_run.json``: a stage joins the open parent unless that parent already
has a child for this stage (a new execution), and ``promote`` (the last stage) closes it. The store is a
local sqlite file inside the repository unless ``MLFLOW_TRACKING_URI`` says otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from stages.common.workspace import origin_root

FINAL_STAGE = "promote"  # the last stage in dvc.yaml closes the parent run


def tracking_uri(root: Path) -> str:
    # the repository's store, also for an experiment DVC runs in a copy under .dvc/tmp/exps
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{origin_root(root) / 'mlflow.db'}"


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a sqlite MLflow store across processes.

    Two queued DVC experiments (``dvc queue start -j 2``) start at the same moment: both would
    create the database (MLflow runs its schema migrations on first contact) and the experiment,
    and the loser fails. Held only around that first contact; later writes are sqlite's business.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: what a run executes, relative to the repository's top: the code and the stage and dependency definitions.
#: params.yaml is left out (a run logs its params; `dvc exp run -S` edits it), and so are the files runs and
#: studies write (stage outputs under data/, dvc.lock, reports/), docs and tests: a change there is no change
#: to what ran.
RUN_CODE = ("lora_ops", "stages", "flows", "dvc.yaml", "pyproject.toml")


def git_commit(root: Path) -> str:
    """HEAD's sha, with ``-dirty`` when the tracked files of :data:`RUN_CODE` differ from it."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()

        sha = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *(f":(top){p}" for p in RUN_CODE))
        return sha + ("-dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def short_commit(commit: str) -> str:
    """A commit as reports print it: 12 hex digits, keeping ``-dirty``."""
    sha, dirty, _ = commit.partition("-dirty")
    return sha[:12] + dirty


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


def experiment_id(client: Any, name: str, root: Path) -> str:
    """The id of MLflow experiment ``name``, created when missing: its artifacts go to ``LORA_SIEVE_ARTIFACTS``
    or the origin repository's ``mlartifacts`` (one rule for stages, flows and reports, so they agree)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = os.environ.get("LORA_SIEVE_ARTIFACTS") or (origin_root(root) / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """``params`` flattened (dotted keys, values cut to MLflow's 500 characters), 100 per call (its limit)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:500]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


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
        self.spool: list[dict[str, Any]] = []  # calls the server did not take (see _send)
        self.offline = False

    # ------------------------------------------------------------------ setup
    def __enter__(self) -> StageRun:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = self.uri = tracking_uri(self.root)
        # parallel queued experiments: one process creates the store (schema migrations) and the experiment
        with store_lock(uri):
            mlflow.set_tracking_uri(uri)
            self.client = MlflowClient(uri)
            if any(spool_dir(self.root).glob("*.jsonl")):  # an earlier stage lost the server: deliver first
                delivered, pending = flush_unlogged(self.root, uri)
                if delivered or pending:
                    print(f"{self.stage}: delivered {delivered} tracking call(s) an earlier stage could not log"
                          + (f"; {pending} still pending" if pending else ""), file=sys.stderr)
            exp_id = experiment_id(self.client, self.params.get("tracking", {}).get("experiment", "lora-sieve"),
                                   self.root)
        self.experiment_id = exp_id
        commit = git_commit(self.root)
        hashes = dvc_stage_hashes(self.root)
        self.parent_id = self._parent(exp_id, commit)
        tags = {"mlflow.parentRunId": self.parent_id, "mlflow.runName": self.stage, "stage": self.stage,
                "git_commit": commit, "method": self.params.get("method", {}).get("name", ""),
                **{f"dvc.stage_hash.{k}": v for k, v in hashes.items()}}
        self.run_id = self.client.create_run(exp_id, tags=tags).info.run_id
        log_params(self.client, self.run_id, self.params)
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
        log_params(self.client, pid, self.params)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps({"run_id": pid}))
        return pid

    # ---------------------------------------------------------------- logging
    # Every call after the run exists goes through _send: when the tracking server stops answering
    # in the middle of a stage, the stage's work is not lost to a tracking error. The first failure
    # switches the run to "offline": that call and every later one are kept in a spool file
    # (.lora_sieve/unlogged/), the stage finishes, and says what was not logged. The next StageRun
    # (any stage) or `python -m stages.common.tracking flush` delivers the spool once the server is back.
    def _send(self, op: str, run_id: str, **payload: Any) -> None:
        if not getattr(self, "offline", False):
            try:
                _apply(self.client, op, run_id, payload)
                return
            except Exception as exc:  # noqa: BLE001 - any transport or server error: keep it for later
                self.offline = True
                self.offline_reason = " ".join(str(exc).split())[:200]
                print(f"{self.stage}: MLflow tracking at {self.uri} stopped answering ({self.offline_reason}); "
                      "the stage goes on and keeps what it could not log", file=sys.stderr)
        if op == "log_artifact":  # the file may change before delivery: keep a copy of what it was
            payload = {**payload, "local_path": self._keep(Path(payload["local_path"]))}
        self.spool.append({"op": op, "run_id": run_id, "uri": self.uri, **payload})

    def _keep(self, path: Path) -> str:
        dest = spool_dir(self.root) / f"{self.run_id}.files" / str(len(self.spool)) / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(path, dest)
        return str(dest)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, parent: bool = False) -> None:
        ts = int(time.time() * 1000)
        items = [[k, float(v), ts, step or 0] for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for rid in [self.run_id] + ([self.parent_id] if parent else []):
            for i in range(0, len(items), 500):
                self._send("log_batch", rid, metrics=items[i:i + 500])

    def log_history(self, rows: list[dict[str, float]], keys: tuple[str, ...] = ("loss", "lr")) -> None:
        ts = int(time.time() * 1000)
        items = [[k, float(r[k]), ts, int(r["step"])] for r in rows for k in keys if k in r]
        for i in range(0, len(items), 500):
            self._send("log_batch", self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.exists():
            self._send("log_artifact", self.run_id, local_path=str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str], parent: bool = False) -> None:
        for rid in [self.run_id] + ([self.parent_id] if parent else []):
            for k, v in tags.items():
                self._send("set_tag", rid, key=k, value=str(v))

    # --------------------------------------------------------------- teardown
    def _terminate(self, run_id: str, status: str) -> None:
        self._send("set_terminated", run_id, status=status, end_time=int(time.time() * 1000))

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        own_parent = self.parent_id and not os.environ.get("LORA_SIEVE_PARENT_RUN_ID")
        if exc_type is not None:
            from stages.common.stop import StopRequested

            self._send("set_tag", self.run_id, key="error", value=f"{exc_type.__name__}: {exc}"[:5000])
            status = "KILLED" if isinstance(exc, StopRequested) else "FAILED"
            self._terminate(self.run_id, status)
            if own_parent:
                self._terminate(self.parent_id, status)
                self.state_file.unlink(missing_ok=True)
        else:
            self._terminate(self.run_id, "FINISHED")
            if self.stage == FINAL_STAGE and own_parent:
                self._terminate(self.parent_id, "FINISHED")
                self.state_file.unlink(missing_ok=True)
        self._save_spool()

    def _save_spool(self) -> None:
        if not self.spool:
            return
        path = spool_dir(self.root) / f"{self.run_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            for entry in self.spool:
                fh.write(json.dumps(entry) + "\n")
        print(f"{self.stage}: not logged to MLflow at {self.uri}: {describe(self.spool)}; kept in {path}, "
              "delivered by the next stage that reaches the server, or by `python -m stages.common.tracking flush`",
              file=sys.stderr)


def spool_dir(root: Path) -> Path:
    return Path(root) / ".lora_sieve" / "unlogged"


def describe(entries: list[dict[str, Any]]) -> str:
    """'120 metric values, 1 artifact (summary.json), 2 tags, run status FINISHED'."""
    metrics = sum(len(e.get("metrics", [])) for e in entries if e["op"] == "log_batch")
    params = sum(len(e.get("params", [])) for e in entries if e["op"] == "log_batch")
    files = [Path(e["local_path"]).name for e in entries if e["op"] == "log_artifact"]
    tags = sum(e["op"] == "set_tag" for e in entries)
    status = [e["status"] for e in entries if e["op"] == "set_terminated"]
    parts = [f"{metrics} metric values" if metrics else "", f"{params} params" if params else "",
             f"{len(files)} artifact(s) ({', '.join(files[:4])})" if files else "", f"{tags} tag(s)" if tags else "",
             f"run status {'/'.join(status)}" if status else ""]
    return ", ".join(p for p in parts if p)


def _apply(client: Any, op: str, run_id: str, payload: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param

    if op == "log_batch":
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in payload.get("metrics", [])],
                         params=[Param(k, v) for k, v in payload.get("params", [])])
    elif op == "log_artifact":
        local = Path(payload["local_path"])
        if local.is_dir():
            client.log_artifacts(run_id, str(local), payload.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(local), payload.get("artifact_path"))
    elif op == "set_tag":
        client.set_tag(run_id, payload["key"], payload["value"])
    elif op == "set_terminated":
        client.set_terminated(run_id, payload["status"], payload.get("end_time"))
    else:
        raise ValueError(f"unknown spooled operation {op!r}")


def flush_unlogged(root: Path | str = ".", uri: str | None = None) -> tuple[int, int]:
    """Deliver spooled tracking calls for ``uri`` (default: this repository's store), in order.
    Returns (delivered, still pending); stops at the first failure (the server is still away)."""
    from mlflow.tracking import MlflowClient

    root = Path(root).resolve()
    uri = uri or tracking_uri(root)
    delivered = pending = 0
    for path in sorted(spool_dir(root).glob("*.jsonl")):
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        mine = [e for e in entries if e.get("uri") == uri]
        if not mine:
            continue
        client = MlflowClient(uri)
        done = 0
        try:
            for entry in mine:
                _apply(client, entry["op"], entry["run_id"], entry)
                done += 1
        except Exception:  # noqa: BLE001 - still unreachable: keep the rest for the next try
            pass
        delivered += done
        rest = [e for e in entries if e.get("uri") != uri] + mine[done:]
        pending += len(mine) - done
        if rest:
            path.write_text("".join(json.dumps(e) + "\n" for e in rest))
        else:
            path.unlink()
            shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
    return delivered, pending


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


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.common.tracking flush``: deliver what a stage could not log."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["flush"]:
        print("usage: python -m stages.common.tracking flush", file=sys.stderr)
        return 2
    delivered, pending = flush_unlogged(Path("."))
    print(f"tracking: delivered {delivered} spooled call(s) to {tracking_uri(Path('.'))}; {pending} still pending")
    return 1 if pending else 0


if __name__ == "__main__":
    sys.exit(main())
