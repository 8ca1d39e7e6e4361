"""The commit every MLflow run is tagged with: ``-dirty`` marks code that differs from it, not the
params.yaml and dvc.lock that the pipeline rewrites on every run (those are logged as the run's params)."""

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
    for name, text in {"params.yaml": "seed: 1\n", "dvc.lock": "stages: {}\n", "stages/train.py": "x = 1\n"}.items():
        (path / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([*GIT, "add", "."], cwd=path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=path, check=True)
    return path


def _head(repo: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_pipeline_written_files_do_not_make_the_commit_dirty(repo: Path):
    (repo / "params.yaml").write_text("seed: 2\n")
    (repo / "dvc.lock").write_text("stages: {train: {}}\n")
    (repo / "notes.txt").write_text("untracked\n")
    assert git_commit(repo) == _head(repo)


@pytest.mark.parametrize("where", [".", "stages"])
def test_a_changed_tracked_source_file_does(repo: Path, where: str):
    (repo / "params.yaml").write_text("seed: 2\n")
    (repo / "stages/train.py").write_text("x = 2\n")
    assert git_commit(repo / where) == _head(repo) + "-dirty"


def test_outside_a_repository_it_says_unknown(tmp_path: Path):
    assert git_commit(tmp_path) == "unknown"


def test_reports_print_twelve_digits_and_keep_dirty(repo: Path):
    head = _head(repo)
    assert short_commit(git_commit(repo)) == head[:12]
    (repo / "stages/train.py").write_text("x = 2\n")
    assert short_commit(git_commit(repo)) == head[:12] + "-dirty"
    assert short_commit("unknown") == "unknown" and short_commit(head[:12] + "-dirty") == head[:12] + "-dirty"
