"""Where the project lives when DVC runs an experiment somewhere else.

``dvc exp run --queue`` / ``dvc queue start`` (and ``--temp``) execute each experiment in a copy of
the repository under ``<repo>/.dvc/tmp/exps/<name>/``. Paths meant relative to the repository —
the data mirror beside it (``../shared/data``), the MLflow store (``mlflow.db``, ``mlartifacts``) —
would point into (or next to) that throw-away copy. :func:`origin_root` gives the repository
the experiment belongs to, so queued and parallel runs read the same data and log to the same
store as a run in the workspace.
"""

from __future__ import annotations

from pathlib import Path

_EXPS = (".dvc", "tmp", "exps")


def origin_root(root: Path | str = ".") -> Path:
    """The repository ``root`` belongs to: itself, or the one whose DVC experiment copy it is."""
    resolved = Path(root).resolve()
    parts = resolved.parts
    for i in range(len(parts) - len(_EXPS), 0, -1):  # innermost match: a repository may sit in another's tmp
        if parts[i:i + len(_EXPS)] == _EXPS:
            return Path(*parts[:i])
    return resolved


def in_experiment_copy(root: Path | str = ".") -> bool:
    return origin_root(root) != Path(root).resolve()
