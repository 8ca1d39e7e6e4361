"""Utilities for tests that run the real pipeline in a scratch copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LORA_SIEVE_DATA", REPO.parent / "shared" / "data")).resolve()
SKIP = {".venv", ".git", "mlflow.db", "mlartifacts", "mlruns", ".lora_sieve", ".pytest_cache", ".ruff_cache",
        "__pycache__", ".dvc/cache", ".dvc/tmp", "dvc.lock"}
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


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc
