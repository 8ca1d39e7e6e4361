"""The commit every MLflow run and study row is tagged with: ``-dirty`` marks code that differs from it, not
the files runs and studies rewrite (params.yaml, dvc.lock, tracked stage outputs, reports)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stages.common.tracking import git_commit, short_commit

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    (path / "stages").mkdir(parents=True)
    (path / "data/evaluate").mkdir(parents=True)
    (path / "reports").mkdir()
    for name, text in {"params.yaml": "seed: 1\n", "dvc.lock": "stages: {}\n", "stages/train.py": "x = 1\n",
                       "dvc.yaml": "stages: {}\n", "data/evaluate/metrics.json": "{}\n",
                       "reports/study.csv": "task\n"}.items():
        (path / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([*GIT, "add", "."], cwd=path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=path, check=True)
    return path


def _head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_files_runs_write_do_not_make_the_commit_dirty(repo: Path):
    (repo / "params.yaml").write_text("seed: 2\n")
    (repo / "dvc.lock").write_text("stages: {train: {}}\n")
    (repo / "data/evaluate/metrics.json").write_text('{"score": 1}\n')  # a tracked stage output
    (repo / "reports/study.csv").write_text("task\nsst2\n")  # a study appending to its csv
    (repo / "notes.txt").write_text("untracked\n")
    assert git_commit(repo) == _head(repo)


@pytest.mark.parametrize(("changed", "where"), [("stages/train.py", "."), ("stages/train.py", "data/evaluate"),
                                                ("dvc.yaml", ".")])
def test_a_changed_code_or_stage_definition_does(repo: Path, changed: str, where: str):
    (repo / "params.yaml").write_text("seed: 2\n")
    (repo / changed).write_text("changed: true\n")
    assert git_commit(repo / where) == _head(repo) + "-dirty"


def test_outside_a_repository_it_says_unknown(tmp_path: Path):
    assert git_commit(tmp_path) == "unknown"


def test_reports_print_twelve_digits_and_keep_dirty(repo: Path):
    head = _head(repo)
    assert short_commit(git_commit(repo)) == head[:12]
    (repo / "stages/train.py").write_text("x = 2\n")
    assert short_commit(git_commit(repo)) == head[:12] + "-dirty"
    assert short_commit("unknown") == "unknown" and short_commit(head[:12] + "-dirty") == head[:12] + "-dirty"
