"""DVC's experiment queue: queued experiments run in copies under .dvc/tmp/exps, two at a time."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
from support.helpers import SHARED_DATA, USER_IDENTITY, run, scratch_repo


def _named(tree, names: set[str], found: dict) -> None:
    """Walk ``dvc exp show --json`` and collect the metrics of the named experiments."""
    if isinstance(tree, dict):
        if tree.get("name") in names and isinstance(tree.get("data"), dict):
            found[tree["name"]] = tree["data"].get("metrics", {})
        for v in tree.values():
            _named(v, names, found)
    elif isinstance(tree, list):
        for v in tree:
            _named(v, names, found)


@pytest.mark.slow
def test_queued_experiments_run_two_at_a_time_with_the_relative_mirror(tmp_path: Path):
    # the layout of a clone: ../shared/data beside the repository, referenced relatively as in params.yaml
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    repo = scratch_repo(tmp_path / "repo", {"data.mirror": "../shared/data", "method.name": "lora",
                                           "registry.enabled": False, "data.train_size": 160,
                                           "data.dev_size": 48, "train.epochs": 1})
    names = {"q-seed1", "q-seed2"}
    for name in sorted(names):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"seed={name[-1]}"], repo, extra_env=USER_IDENTITY)
    try:
        run(["dvc", "queue", "start", "-j", "2"], repo, extra_env=USER_IDENTITY)
        deadline, status = time.time() + 1500, ""
        while time.time() < deadline:
            status = run(["dvc", "queue", "status"], repo).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            time.sleep(5)
    finally:
        run(["dvc", "queue", "stop"], repo, check=False)
    logs = {n: run(["dvc", "queue", "logs", n], repo, check=False).stdout[-2500:] for n in names}
    failed = [n for n in sorted(names) if re.search(rf"{n}\s.*Failed", status)]
    logs = {n: logs[n] for n in failed} or logs  # the failed one first: its tail says why
    assert status.count("Success") == 2 and "Failed" not in status, f"{status}\n{logs}"
    found: dict = {}
    _named(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout), names, found)
    assert set(found) == names, found
    scores = [json.dumps(found[n], sort_keys=True) for n in sorted(names)]
    assert all('"score"' in s for s in scores) and scores[0] != scores[1]  # two seeds, two results
    # both logged to the repository's MLflow store, not to their throw-away copies
    con = sqlite3.connect(repo / "mlflow.db")
    seeds = {v for (v,) in con.execute("select value from params where key='seed'")}
    assert {"1", "2"} <= seeds, seeds
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
