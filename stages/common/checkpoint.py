"""Resumable checkpoints on disk without pickle: safetensors for tensors, JSON for the rest.

A checkpoint is two files: ``<name>.<token>.safetensors`` (every tensor of the state) and
``<name>.json`` (step, RNG states, optimizer and controller structure, fingerprint; tensors by
reference, plus the tensor file's name and SHA-256). The JSON is written last, atomically: it is
the commit point, so a write that fails half-way (disk full, kill) leaves the previous checkpoint
readable, and a truncated or planted tensor file is detected by its digest. Loading never
unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from lora_ops.training.state import join_state, split_state
from stages.common.io import atomic_path

FORMAT = "lora-sieve-checkpoint/1"


class CheckpointUnreadable(ValueError):
    """The checkpoint on disk cannot be used (truncated, foreign, other format)."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as ``path`` (JSON) + a tensor file beside it; replaces the previous one."""
    tensors, tree = split_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor_path = path.with_name(f"{path.stem}.{secrets.token_hex(4)}.safetensors")
    with atomic_path(tensor_path) as tmp:
        save_file(tensors, str(tmp))
    previous = _tensor_file(path)
    record = {"format": FORMAT, "tensors": tensor_path.name, "sha256": _digest(tensor_path), "state": tree}
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, allow_nan=False))
    except BaseException:
        tensor_path.unlink(missing_ok=True)  # the previous checkpoint stays the valid one
        raise
    if previous is not None and previous != tensor_path:
        previous.unlink(missing_ok=True)


def _tensor_file(path: Path) -> Path | None:
    try:
        return path.with_name(json.loads(path.read_text())["tensors"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state saved at ``path``, None when there is none; CheckpointUnreadable when it is damaged."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointUnreadable(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointUnreadable(f"{path} is not a {FORMAT} checkpoint")
    tensor_path = path.with_name(str(record.get("tensors")))
    if tensor_path.parent != path.parent or not tensor_path.is_file():
        raise CheckpointUnreadable(f"{path} refers to tensor file {tensor_path.name}, which is missing")
    if _digest(tensor_path) != record.get("sha256"):
        raise CheckpointUnreadable(f"{tensor_path} does not match its checkpoint (truncated or replaced)")
    try:
        tensors = load_file(str(tensor_path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        raise CheckpointUnreadable(f"{tensor_path} is unreadable ({type(exc).__name__})") from None
    return join_state(tensors, record["state"])


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint (JSON and every tensor file it may have left)."""
    for f in path.parent.glob(f"{path.stem}.*.safetensors"):
        f.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
