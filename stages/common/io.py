"""Atomic outputs: a killed stage leaves either the previous output or nothing, never half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``path`` (file or folder) in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to {target}")
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the stage that produces it (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is corrupt ({exc}); delete it and rerun its stage") from exc


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_parquet(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the stage that produces it (dvc repro)")
    return pd.read_parquet(path)


JSON_SUFFIX = "__json"


def write_records(path: str | Path, rows: list[dict[str, Any]], empty_columns: list[str] | None = None) -> None:
    """Rows as Parquet; nested values (dicts, lists) become JSON text in ``<key>__json`` columns."""
    encoded = []
    for row in rows:
        out = {}
        for k, v in row.items():
            if isinstance(v, (dict, list, tuple)):
                out[k + JSON_SUFFIX] = json.dumps(v, sort_keys=True, default=float)
            else:
                out[k] = v
        encoded.append(out)
    df = pd.DataFrame(encoded) if encoded else pd.DataFrame(columns=empty_columns or [])
    write_parquet(path, df)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for row in read_parquet(path).to_dict("records"):
        decoded = {}
        for k, v in row.items():
            if k.endswith(JSON_SUFFIX):
                decoded[k.removesuffix(JSON_SUFFIX)] = json.loads(v) if isinstance(v, str) else v
            else:
                decoded[k] = v.item() if hasattr(v, "item") else v
        rows.append(decoded)
    return rows
