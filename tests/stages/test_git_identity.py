"""The identity of the commits the flows make for the user (``dvc exp save``): theirs when configured,
lora-sieve's otherwise, given to that one subprocess through git's environment variables."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.helpers import IDENTITY_VARS

from stages.common.git_identity import FALLBACK_EMAIL, FALLBACK_NAME, commit_identity


def _bare_env(home: Path) -> dict[str, str]:
    """A machine where git was never configured."""
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in IDENTITY_VARS}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), GIT_CONFIG_GLOBAL=os.devnull,
               GIT_CONFIG_NOSYSTEM="1")
    return env


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


def _commit(repo: Path, env: dict[str, str]) -> str:
    (repo / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=repo, check=True, env=env)
    proc = subprocess.run(["git", "commit", "-qm", "m"], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return subprocess.run(["git", "log", "-1", "--format=%an <%ae> / %cn <%ce>"], cwd=repo, env=env,
                          capture_output=True, text=True).stdout.strip()


def test_no_identity_anywhere_gets_the_fallback_for_that_commit_only(repo: Path, tmp_path: Path):
    env = _bare_env(tmp_path / "home")
    assert subprocess.run(["git", "config", "--get", "user.name"], cwd=repo, env=env).returncode != 0
    identity = commit_identity(repo, env)
    assert identity.is_fallback and (identity.name, identity.email) == (FALLBACK_NAME, FALLBACK_EMAIL)
    assert "no git identity is configured" in identity.describe()
    who = _commit(repo, {**env, **identity.env})
    assert who == f"{FALLBACK_NAME} <{FALLBACK_EMAIL}> / {FALLBACK_NAME} <{FALLBACK_EMAIL}>"
    # nothing was written to any git config
    assert not (tmp_path / "home" / ".gitconfig").exists()
    assert subprocess.run(["git", "config", "--get", "user.name"], cwd=repo, env=env).returncode != 0


def test_the_users_configured_identity_is_used_unchanged(repo: Path, tmp_path: Path):
    env = _bare_env(tmp_path / "home")
    subprocess.run(["git", "config", "user.name", "Ada"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "config", "user.email", "ada@example.org"], cwd=repo, check=True, env=env)
    identity = commit_identity(repo, env)
    assert identity.env == {} and not identity.is_fallback
    assert identity.describe() == "experiment commit by Ada <ada@example.org> (your git identity)"
    assert _commit(repo, {**env, **identity.env}) == "Ada <ada@example.org> / Ada <ada@example.org>"


def test_identity_variables_count_as_configured_and_only_missing_parts_are_filled(repo: Path, tmp_path: Path):
    env = {**_bare_env(tmp_path / "home"), "GIT_AUTHOR_NAME": "Bo", "GIT_COMMITTER_NAME": "Bo"}
    identity = commit_identity(repo, env)
    assert identity.env == {"GIT_COMMITTER_EMAIL": FALLBACK_EMAIL, "GIT_AUTHOR_EMAIL": FALLBACK_EMAIL}
    assert (identity.name, identity.email) == ("Bo", FALLBACK_EMAIL)
    assert _commit(repo, {**env, **identity.env}) == f"Bo <{FALLBACK_EMAIL}> / Bo <{FALLBACK_EMAIL}>"
