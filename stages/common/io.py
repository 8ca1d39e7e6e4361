"""Atomic outputs and safe inputs.

Outputs: a killed stage (or a full disk) leaves either the previous output or nothing, never
half a file. Inputs: every artifact a stage reads goes through a reader here, which turns a
missing, truncated or foreign file into one :class:`BadArtifact` line that names the file and
the stage that rebuilds it; no reader ever unpickles anything.
"""

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

# weight files that from_pretrained would unpickle (torch.load) rather than map
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
STAGES = ("prepare", "calibrate", "score", "decide", "finetune", "compress", "merge", "evaluate", "promote")


class BadArtifact(ValueError):
    """An input artifact is unreadable, truncated or not what its name says; the message says which
    file and which stage to rerun. A ValueError, so every stage's error boundary reports it in one line."""


def producer(path: str | Path) -> str | None:
    """The stage whose output ``path`` is (``data/<stage>/...``), or None for other files."""
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "data" and parts[i + 1] in STAGES:
            return parts[i + 1]
    if ".lora_sieve" in parts and "checkpoints" in parts:
        return "finetune"
    return None


def rerun_hint(path: str | Path) -> str:
    stage = producer(path)
    if stage is None:
        return "replace it with a good copy, or rerun the stage that produces it (dvc repro)"
    return f"rerun the {stage} stage (dvc repro -f -s {stage}, or dvc repro)"


def _bad(path: Path, what: str) -> BadArtifact:
    # one line whatever the underlying library printed (safetensors and pyarrow messages span lines)
    what = " ".join(str(what).split())[:300]
    return BadArtifact(f"{path} {what}: {rerun_hint(path)}")


def _require(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {rerun_hint(path)}")
    if not path.is_file():
        raise _bad(path, "is not a file")


# ----------------------------------------------------------------------------- outputs

@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``path`` (file or folder) in one rename.

    On any failure inside the block (ENOSPC half-way through a write included) the temporary is
    removed and ``path`` keeps its previous content."""
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


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


# ----------------------------------------------------------------------------- inputs

# Top-level keys (and their types) a pipeline JSON artifact must have, by file name: a valid JSON
# file of the wrong kind (a list, another stage's file) is caught here, not as a KeyError later.
_JSON_SHAPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "plan.json": {"method": str, "modules": dict},
    "model.json": {"name": str, "path": str, "source": str},
    "metrics.json": {},
    "summary.json": {},
    "lora_sieve.json": {},
}


def read_json(path: str | Path) -> Any:
    """A JSON artifact; pipeline artifacts (plan, model reference, metrics...) must be JSON objects
    with the keys their readers use."""
    path = Path(path)
    _require(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"is not valid JSON (truncated or foreign: {exc})") from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror or exc})") from None
    shape = _JSON_SHAPES.get(path.name) if producer(path) else None
    if shape is not None:
        if not isinstance(data, dict):
            raise _bad(path, f"holds a JSON {type(data).__name__}, not the object its stage writes")
        for key, kind in shape.items():
            if not isinstance(data.get(key), kind):
                raise _bad(path, f"is not a {path.stem} file (key {key!r} missing or of the wrong type)")
        if path.name == "plan.json" and not all(isinstance(v, dict) for v in data["modules"].values()):
            raise _bad(path, "is not a plan file (module entries must be objects)")
    return data


def read_plan(path: str | Path) -> dict[str, Any]:
    """The decide stage's plan (a JSON object with ``method`` and ``modules``)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("method"), str) or not isinstance(
            data.get("modules"), dict):
        raise _bad(path, "is not a plan file (no 'method' and 'modules')")
    return data


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A Parquet artifact; ``columns``: names that must be present."""
    import pyarrow

    path = Path(path)
    _require(path)
    try:
        df = pd.read_parquet(path)
    except (pyarrow.ArrowException, OSError, ValueError, TypeError) as exc:
        raise _bad(path, f"is not a readable Parquet file (truncated or foreign: {exc})") from None
    missing = [c for c in columns or [] if c not in df.columns]
    if missing:
        raise _bad(path, f"lacks column(s) {missing} (has {list(df.columns)[:8]})")
    return df


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """Tensors from a safetensors file (never pickle): truncated or foreign files are a BadArtifact."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    _require(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _bad(path, f"is not a readable safetensors file (truncated or foreign: {exc})") from None
    if not tensors:
        raise _bad(path, "holds no tensors")
    return tensors


def check_safetensors_header(path: Path) -> None:
    """Cheap integrity check: the header parses and the file is as long as the header says."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _bad(path, f"is not a readable safetensors file (truncated or foreign: {exc})") from None


def check_model_folder(path: str | Path, allow_pickle: bool = False) -> Path:
    """A Hugging Face model folder that is safe to hand to ``from_pretrained(use_safetensors=True)``:
    a readable ``config.json`` and safetensors weights whose headers parse. A folder with only
    pickle weights (``pytorch_model.bin`` ...) is refused: loading those runs arbitrary code."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} is missing: {rerun_hint(path)}")
    config = path / "config.json"
    if not config.is_file():
        raise _bad(path, "has no config.json: is it a Hugging Face model folder?")
    cfg = read_json(config)
    if not isinstance(cfg, dict):
        raise _bad(config, "is not a model config (not a JSON object)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles and not allow_pickle:
            raise _bad(path, f"holds only pickle weights ({', '.join(pickles[:3])}), which can run code when "
                             "loaded; convert them to safetensors (transformers: save_pretrained(..., "
                             "safe_serialization=True) on a trusted machine)")
        if not pickles:
            raise _bad(path, "holds no model weights (*.safetensors)")
    for w in weights:
        check_safetensors_header(w)
    return path


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
    path = Path(path)
    rows = []
    for row in read_parquet(path).to_dict("records"):
        decoded = {}
        for k, v in row.items():
            if not isinstance(k, str):
                raise _bad(path, f"has a non-text column name {k!r}")
            if k.endswith(JSON_SUFFIX):
                try:
                    decoded[k.removesuffix(JSON_SUFFIX)] = json.loads(v) if isinstance(v, str) else v
                except json.JSONDecodeError as exc:
                    raise _bad(path, f"column {k} holds invalid JSON ({exc})") from None
            else:
                decoded[k] = v.item() if hasattr(v, "item") else v
        rows.append(decoded)
    return rows
