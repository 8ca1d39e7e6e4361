"""Utilities for tests that run the real pipeline in a scratch copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("LORA_SIEVE_DATA", REPO.parent / "shared" / "data")).resolve()
SKIP = {".venv", ".git", "mlflow.db", "mlartifacts", "mlruns", ".lora_sieve", ".pytest_cache", ".ruff_cache",
        "__pycache__", ".dvc/cache", ".dvc/tmp", "dvc.lock", "node_modules", "build", "dvc_plots"}
SMALL = {
    "data.mirror": str(SHARED_DATA), "data.train_size": 480, "data.dev_size": 96, "data.validation_size": 64,
    "model.max_length": 32, "train.epochs": 2, "train.batch_size": 16, "train.checkpoint_every": 0,
    "calibrate.ratio": 0.25, "lora_drop.probe_epochs": 1, "evaluate.latency_batches": 1,
    "evaluate.batch_size": 48,
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true",
             MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH="")
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("LORA_SIEVE_PARENT_RUN_ID", None)
    return e


def scratch_repo(dest: Path, overrides: dict | None = None, git: bool = True) -> Path:
    """Copy the project (code and config, no outputs) into ``dest`` and apply dotted param overrides."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in REPO.iterdir():
        if item.name in SKIP:
            continue
        target = dest / item.name
        if item.is_dir():
            shutil.copytree(item, target, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp", "prepare",
                                                                         "calibrate", "score", "decide",
                                                                         "finetune", "checkpoints", "merge",
                                                                         "evaluate"))
        else:
            shutil.copy2(item, target)
    set_params(dest, {**SMALL, **(overrides or {})})
    if git:
        run(["git", "init", "-q"], dest)
        run(["git", "add", "-A"], dest)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "scratch"], dest)
    return dest


def set_params(repo: Path, overrides: dict) -> None:
    path = repo / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


# for the commands a test runs as a user with a git identity would (a queued `dvc exp run` commits)
USER_IDENTITY = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"}


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 1200,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


IDENTITY_VARS = ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL")


@contextmanager
def no_git_identity(home: Path) -> Iterator[None]:
    """This process and its children see a machine where git was never configured: an empty HOME and
    XDG config folder, global and system git config ignored, no identity variables."""
    home.mkdir(parents=True, exist_ok=True)
    (home / ".config").mkdir(exist_ok=True)
    changes = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "GIT_CONFIG_GLOBAL": os.devnull,
               "GIT_CONFIG_NOSYSTEM": "1", **{k: None for k in IDENTITY_VARS}}
    saved = {k: os.environ.get(k) for k in changes}
    try:
        for k, v in changes.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
