"""Who the commits lora-sieve makes on the user's behalf are made by.

``dvc exp save`` (the pipeline, compare and study flows save every run as a DVC experiment) writes a
git commit, and DVC refuses to commit without an identity ("Git user name and email must be
configured"). A new machine, a container or CI often has none. Rather than fail after training, or
write the user's git configuration, the flows give the one git/DVC subprocess an identity through
git's own environment variables (``GIT_AUTHOR_NAME`` ...), and only for the parts that are missing:
an identity the user configured (any git config scope, or those variables already set) is theirs
and is used unchanged.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

FALLBACK_NAME = "lora-sieve"
FALLBACK_EMAIL = "lora-sieve@localhost"


@dataclass(frozen=True)
class CommitIdentity:
    """The identity a commit will carry, and the environment entries that give it to a subprocess."""

    name: str
    email: str
    env: dict[str, str] = field(default_factory=dict)  # empty when the user's own identity applies

    @property
    def is_fallback(self) -> bool:
        return bool(self.env)

    def describe(self) -> str:
        """One log line: which identity, and where it came from."""
        if not self.is_fallback:
            return f"experiment commit by {self.name} <{self.email}> (your git identity)"
        return (f"experiment commit by {self.name} <{self.email}>: no git identity is configured here, so it was "
                "given to this commit only (your git config is untouched; set user.name/user.email to use yours)")


def _git_config(repo: Path, key: str, env: Mapping[str, str]) -> str:
    try:
        proc = subprocess.run(["git", "config", "--get", key], cwd=repo, capture_output=True, text=True,
                              env=dict(env))
    except OSError:  # no git at all: the commit step fails later with its own message
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def commit_identity(repo: Path | str, env: Mapping[str, str] | None = None) -> CommitIdentity:
    """The identity git would commit with in ``repo``, completed with lora-sieve's where a part is missing.

    Each of author and committer, name and email, is taken from its ``GIT_*`` variable if set, else from
    git config (``user.name`` / ``user.email``, all scopes as git itself reads them), else the fallback;
    only fallback parts appear in ``env``.
    """
    env = dict(os.environ if env is None else env)
    configured = {"NAME": _git_config(Path(repo), "user.name", env),
                  "EMAIL": _git_config(Path(repo), "user.email", env)}
    fallback = {"NAME": FALLBACK_NAME, "EMAIL": FALLBACK_EMAIL}
    extra: dict[str, str] = {}
    chosen: dict[str, str] = {}
    for role in ("COMMITTER", "AUTHOR"):  # the committer is what `git log` and DVC's exp show report
        for part in ("NAME", "EMAIL"):
            var = f"GIT_{role}_{part}"
            value = env.get(var) or configured[part]
            if not value:
                value = extra[var] = fallback[part]
            chosen.setdefault(part, value)
    return CommitIdentity(name=chosen["NAME"], email=chosen["EMAIL"], env=extra)
