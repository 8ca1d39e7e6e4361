"""Prefect flow: the DVC pipeline for given param overrides, tracked in MLflow, saved as a DVC experiment.

* Overrides (``method.name=lora``, any dotted key) are validated with the params schema before
  anything runs; an unknown key fails the flow at once with the schema's message.
* Each stage is a Prefect task calling ``dvc repro --single-item <stage>``: DVC owns caching, and a
  stage whose inputs did not change is reported as skipped in the Prefect log. Transient failures
  (killed process, DVC lock held) are retried; bad input (stage exit code 2) is not.
* Overrides are written into ``params.yaml`` for the duration of the run (comments kept), the run
  is saved with ``dvc exp save`` (so ``dvc exp show`` lists it and ``dvc exp apply`` restores it),
  and ``params.yaml`` is put back: the flow never changes the user's configuration. The result is
  exactly what ``dvc exp run -S k=v`` in the workspace would compute: the same stage commands on
  the same params, with DVC deciding what reruns.
* The flow opens the MLflow parent run and hands it to the stages (``LORA_SIEVE_PARENT_RUN_ID``);
  a failed flow marks it (and any child left running) FAILED.
* A finished run tells what it produced (:mod:`flows.summary`): the metric against the trivial predictor,
  stored parameters and bytes against LoRA's, the promotion decision and its reasons, MLflow links; as a
  Prefect markdown artifact on the flow run (key ``lora-sieve-pipeline-<deployment>-summary``) and as the
  MLflow parent run's description.

Usage::

    python -m flows.pipeline                                  # params.yaml as it is
    python -m flows.pipeline -S method.name=lora -S train.lr=3e-4
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from flows.artifacts import publish_markdown
from flows.summary import RunStory, adapter_storage
from stages.common.git_identity import commit_identity
from stages.common.params import ConfigError, Params, load_params, set_dotted
from stages.common.paths import Paths, read_output
from stages.common.tracking import (
    experiment_id,
    git_commit,
    log_params,
    params_hash,
    store_lock,
    tracking_uri,
)

STAGES = ["resolve", "prepare", "calibrate", "score", "decide", "finetune", "compress", "merge", "evaluate",
          "promote"]
ROOT = Path(__file__).resolve().parents[1]
EXIT_BAD_INPUT = 2  # stages exit 2 on bad input (stages/common/runtime.py): retrying cannot help
STATE_DIR = ".lora_sieve"
FLOW_BACKUP = "params.yaml.flow-backup"  # params.yaml as configured, while a flow's overrides are applied to it


class StageFailed(RuntimeError):
    """A DVC stage failed; ``message`` is the stage's own last error line."""

    def __init__(self, stage: str, returncode: int, message: str) -> None:
        super().__init__(f"stage {stage} failed (exit {returncode}): {message}")
        self.stage = stage
        self.returncode = returncode

    @property
    def transient(self) -> bool:
        return self.returncode != EXIT_BAD_INPUT


class StageStopped(StageFailed):
    """The flow run was told to stop (SIGTERM) while a stage ran: the stage checkpointed and exited.
    Never retried: the run ends FAILED and the next run resumes from the checkpoint."""

    @property
    def transient(self) -> bool:
        return False


# ----------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` as on ``dvc exp run -S``; the value is YAML (``3e-4`` is a float, ``null`` is None)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. method.name=lora)")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-4 as a string; DVC (YAML 1.2) reads a float
    return key.strip(), value


def configured_params(root: Path, overrides: dict[str, Any] | None = None) -> Params:
    """params.yaml as the user configured it (plus ``overrides``). A flow run writes its overrides into
    params.yaml and keeps the file as it was in the state folder until it ends; one that was killed leaves
    both behind (the next flow run puts the kept file back). Either way the kept file is the configuration:
    a study that read the overridden params.yaml would scale a killed run's learning rate again."""
    backup = root / STATE_DIR / FLOW_BACKUP
    return load_params(backup if backup.is_file() else root / "params.yaml", overrides, root=root)


def validate_overrides(root: Path, overrides: dict[str, Any]) -> Params:
    """The params the run will use; raises :class:`ConfigError` naming the bad key."""
    try:
        return configured_params(root, overrides)
    except ConfigError as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "none"
        raise ConfigError(f"invalid params with overrides ({shown}): {exc}") from None


def _set_overrides(path: Path, overrides: dict[str, Any]) -> None:
    """Write dotted overrides into params.yaml with a round-trip parser: comments, order and
    ``null`` spellings survive, so the saved experiment diffs only in the overridden keys."""
    from ruamel.yaml import YAML

    yml = YAML()
    yml.preserve_quotes = True
    yml.width = 4096
    yml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = yml.load(path.read_text())
    for key, value in overrides.items():
        set_dotted(data, key, value)
    with open(path, "w") as fh:
        yml.dump(data, fh)


@contextlib.contextmanager
def workspace(root: Path, overrides: dict[str, Any]) -> Iterator[None]:
    """Hold the workspace (one flow at a time) with ``overrides`` applied to params.yaml."""
    logger = get_run_logger()
    state = root / STATE_DIR
    state.mkdir(exist_ok=True)
    params_file = root / "params.yaml"
    backup = state / FLOW_BACKUP
    with open(state / "flow.lock", "w") as lock:
        waited = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.info("another flow run holds %s; waiting", root)
                    waited = True
                time.sleep(2)
        if backup.is_file():  # a previous flow died with its overrides applied: undo them first
            logger.warning("restoring params.yaml left modified by an interrupted flow run")
            os.replace(backup, params_file)
        original = params_file.read_bytes()
        if overrides:
            backup.write_bytes(original)
            _set_overrides(params_file, overrides)
        try:
            yield
        finally:
            if overrides:
                params_file.write_bytes(original)
                backup.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- stages

def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # venv's dvc and python
    env.update(extra or {})
    return env


def _retry_transient(task_: Any, task_run: Any, state: Any) -> bool:
    exc = state.data
    return not isinstance(exc, StageFailed) or exc.transient


def _error_line(output: str) -> str:
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", output) if ln.strip()]
    for ln in reversed(lines):  # the stage's own one-line error beats DVC's wrapper message
        if ln.startswith("error ["):
            return ln
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]+(Error|Exception|Failed)\b", ln):
            return ln
    errors = [ln for ln in lines if ln.startswith(("ERROR", "error"))]
    return errors[-1] if errors else (lines[-1] if lines else "no output")


SHELLS = {"sh", "bash", "dash", "zsh", "fish"}
STOP_GRACE_S = 120  # how long a stopped stage may take to write its checkpoint before it is killed


def _stop_stage(proc: subprocess.Popen) -> None:
    """SIGTERM the stage under ``dvc`` (not DVC, not the shell DVC runs it in, so that both wait for the
    stage and DVC records its failure), wait for it to checkpoint and exit, kill whatever is left."""

    import psutil  # a dependency of dvc

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        try:
            if child.name() not in SHELLS:
                child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except BaseException:  # noqa: BLE001 - too slow, or a second SIGTERM: stop everything now
        for p in [*children, proc]:
            with contextlib.suppress(Exception):
                p.kill()
        proc.wait()


def _run_stoppable(cmd: list[str], repo: str, env: dict[str, str], stage: str) -> subprocess.CompletedProcess:
    """``subprocess.run`` that passes a stop of the flow run on to the stage.

    Prefect turns SIGTERM to the flow process into ``TerminationSignal`` (Ctrl-C: KeyboardInterrupt)
    while we wait here; plain ``subprocess.run`` would then SIGKILL dvc and orphan the stage, which
    would run on, unseen. Instead the stage gets SIGTERM (finetune checkpoints at the next step and
    exits 143), DVC records the failure, and the run ends FAILED via :class:`StageStopped`, never
    retried. A cancellation that Prefect's runner announced keeps its own exception (CANCELLED)."""

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=err, text=True)
        try:
            proc.wait()
        except BaseException as exc:
            _stop_stage(proc)
            if _cancel_announced():
                raise
            err.seek(0)
            tail = _error_line(err.read())
            name = "SIGTERM" if type(exc).__name__ == "TerminationSignal" else type(exc).__name__
            raise StageStopped(stage, proc.returncode, f"flow run stopped by {name}; the stage stopped at its "
                                                       f"last checkpoint ({tail}); run again to resume") from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _cancel_announced() -> bool:
    """Whether Prefect's runner announced this SIGTERM as a cancellation (then Prefect marks CANCELLED)."""
    try:
        from prefect._internal import control_listener

        return control_listener.get_intent() is not None
    except Exception:  # noqa: BLE001 - private API: without it, treat the signal as a plain stop
        return False


@task(name="dvc-stage", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_transient,
      task_run_name="{stage}")
def run_stage(stage: str, repo: str, env: dict[str, str] | None = None) -> str:
    """Run one stage through DVC; returns 'ran' or 'skipped'."""
    logger = get_run_logger()
    proc = _run_stoppable(["dvc", "repro", "--single-item", stage], repo, _env(env), stage)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        # DVC exits 255 for a failed command; the stage's own code is in its message
        m = re.search(r"failed to reproduce '.*?': .*?exited with (-?\d+)", output)
        code = int(m.group(1)) if m else proc.returncode
        tail = "\n".join(output.strip().splitlines()[-15:])
        logger.error("stage %s failed; last output:\n%s", stage, tail)
        raise StageFailed(stage, code, _error_line(output))
    if f"Running stage '{stage}'" in output:
        lines = [ln for ln in re.split(r"[\r\n]+", proc.stdout) if ln.startswith(f"{stage}:")]
        logger.info("stage %s: ran%s", stage, f" - {lines[-1]}" if lines else "")
        return "ran"
    logger.info("stage %s: skipped (DVC: inputs unchanged)", stage)
    return "skipped"


@task(name="dvc-exp-save")
def save_experiment(repo: str, name: str) -> str | None:
    """Record the workspace (params, dvc.lock, metrics) as a DVC experiment; None without a git commit."""
    logger = get_run_logger()
    root = Path(repo)
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True)
    if head.returncode != 0:
        logger.warning("no git commit in %s: run not saved as a DVC experiment (git commit once to enable)", root)
        return None
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "data"], cwd=root,
                               capture_output=True, text=True).stdout.split()
    cmd = ["dvc", "exp", "save", "-f", "-n", name]
    for path in untracked:  # metrics.json, decision.json, plots: small uncached outputs
        cmd += ["-I", path]
    identity = commit_identity(root, _env())  # a machine without a git identity still saves the run
    logger.info(identity.describe())
    proc = subprocess.run(cmd, cwd=root, env=_env(identity.env), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp save failed: {_error_line(proc.stdout + proc.stderr)}")
    logger.info("saved as DVC experiment %r (dvc exp show / dvc exp apply %s)", name, name)
    return name


# ----------------------------------------------------------------------------- MLflow parent run

class ParentRun:
    """The MLflow parent run of one flow execution (the stages add their child runs to it)."""

    def __init__(self, root: Path, params: Params, run_name: str, tags: dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        dump = params.model_dump()
        name = params.tracking.experiment
        self.uri = tracking_uri(root)
        with store_lock(self.uri):  # another process may be creating the store right now
            self.client = MlflowClient(self.uri)  # (constructing the client already opens it)
            self.experiment_id = experiment_id(self.client, name, root)
        self.run_id = self.client.create_run(self.experiment_id, tags={
            "mlflow.runName": run_name, "pipeline": "true", "git_commit": git_commit(root),
            "params_hash": params_hash(dump), "method": params.method.name, "task": params.task.name,
            "model": params.model.name, **tags}).info.run_id
        log_params(self.client, self.run_id, dump)

    def finish(self, metrics: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)
        for k, v in (tags or {}).items():
            self.client.set_tag(self.run_id, k, v)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException, attempts: int = 5, delay: float = 3.0) -> bool:
        """Mark the run and any child still RUNNING as FAILED; keeps trying for a while because the
        failure may be the tracking server itself being away. Returns whether it got through."""
        for attempt in range(attempts):
            try:
                self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
                children = self.client.search_runs(
                    [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' "
                                                        "and attributes.status = 'RUNNING'")
                for child in children:
                    self.client.set_terminated(child.info.run_id, "FAILED")
                self.client.set_terminated(self.run_id, "FAILED")
                return True
            except Exception:  # noqa: BLE001 - registry/tracking unreachable: try again shortly
                if attempt + 1 < attempts:
                    time.sleep(delay)
        return False


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    return flow_run.name or time.strftime("%Y%m%d-%H%M%S")


# ----------------------------------------------------------------------------- the flow

@flow(name="lora-sieve-pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, repo: str = str(ROOT), stages: list[str] | None = None,
             experiment_name: str | None = None, save_as_experiment: bool = True,
             retries: int = 2) -> dict[str, Any]:
    """Run the pipeline with dotted param ``overrides``; returns stage statuses, the evaluation
    metrics, the promotion decision (registered model and version), the DVC experiment name, the adapter's
    storage against LoRA's and where the run is tracked (what :meth:`RunStory.from_result` reads)."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    overrides = dict(overrides or {})
    params = validate_overrides(root, overrides)  # before anything runs: a typo costs nothing
    selected = list(stages or STAGES)
    unknown = [s for s in selected if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {STAGES}")
    run_name = _flow_run_name()
    exp_name = experiment_name or re.sub(r"[^A-Za-z0-9_-]+", "-", f"{params.method.name}-{run_name}")
    logger.info("pipeline %s: method=%s task=%s model=%s overrides=%s", root, params.method.name,
                params.task.name, params.model.name, overrides or "none")
    with workspace(root, overrides):
        from prefect.runtime import flow_run

        parent = ParentRun(root, params, f"flow {params.method.name} {params.task.name} {run_name}", {
            "prefect.flow_run_id": str(flow_run.id or ""), "prefect.flow_run_name": run_name,
            "overrides": json.dumps(overrides, default=str)[:5000]})
        env = {"LORA_SIEVE_PARENT_RUN_ID": parent.run_id}
        try:
            statuses: dict[str, str] = {}
            for stage in selected:
                statuses[stage] = run_stage.with_options(retries=retries)(stage, str(root), env)
            metrics = {**read_output(root, Paths.metrics), **read_output(root, Paths.timings)}
            decision = read_output(root, Paths.decision)
            summary = read_output(root, Paths.finetune_summary)
            finetune = {k: summary.get(k) for k in ("steps", "seconds", "peak_rss_mb", "peak_cuda_mb", "controller",
                                                    "parameters", "best")}
            saved = save_experiment(str(root), exp_name) if save_as_experiment else None
            tracking = {"uri": parent.uri, "experiment_id": parent.experiment_id, "method": params.method.name,
                        "task": params.task.name, "model": params.model.name}
            storage = adapter_storage(root, metrics)
            story = RunStory(params.method.name, params.task.name, params.model.name, metrics, storage, decision,
                             parent.uri, parent.experiment_id, parent.run_id, statuses, saved)
            # a skipped evaluate logged its metrics to an earlier parent: give this run its own copy
            parent.finish(metrics if statuses.get("evaluate") != "ran" else None,
                          {"dvc.experiment": saved or "", "stages": json.dumps(statuses),
                           "mlflow.note.content": story.paragraph()})
        except BaseException as exc:
            if not parent.fail(exc):
                logger.error("could not mark MLflow run %s FAILED: tracking server unreachable", parent.run_id)
            raise
    summary_key = publish_markdown(story.markdown(), f"{params.method.name} on {params.task.name}: "
                                  f"{story.score_text()}; {story.decision_text()}")
    model_version = None
    if decision.get("version"):
        model_version = {k: decision.get(k) for k in ("name", "version", "promoted", "champion")}
    print(f"stages: {statuses}")
    if metrics:
        print(f"{metrics.get('main_metric', 'score')} = {metrics.get('score')}")
    return {"stages": statuses, "metrics": metrics, "finetune": finetune, "model_version": model_version,
            "decision": decision,
            "experiment": saved, "mlflow_run_id": parent.run_id, "overrides": overrides,
            "storage": storage.as_dict(), "tracking": tracking, "summary_artifact": summary_key}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the lora-sieve pipeline as a Prefect flow.")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="param override, repeatable (like dvc exp run -S)")
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--stages", nargs="+", help=f"subset of {STAGES} (default: all)")
    ap.add_argument("--name", help="DVC experiment name (default: <method>-<flow run name>)")
    ap.add_argument("--no-exp", action="store_true", help="do not save the run as a DVC experiment")
    ap.add_argument("--retries", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        validate_overrides(Path(args.repo).resolve(), overrides)  # fail fast, before Prefect starts
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        result = pipeline(overrides=overrides, repo=args.repo, stages=args.stages, experiment_name=args.name,
                          save_as_experiment=not args.no_exp, retries=args.retries)
    except StageFailed as exc:  # the flow run is FAILED in Prefect; here one line is enough
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if exc.returncode == EXIT_BAD_INPUT else 1
    print(json.dumps({k: result[k] for k in ("stages", "metrics", "model_version", "experiment")}, indent=2,
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
