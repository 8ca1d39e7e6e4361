"""Resumable training state without pickle: a nested state splits into tensors + a JSON tree.

:func:`split_state` turns any nesting of dicts, lists, tuples, tensors, numbers, strings, bools
and ``None`` (what the loop's snapshot, AdamW's ``state_dict`` and every controller's state are
made of) into ``(tensors, tree)``: ``tensors`` is a flat ``name -> tensor`` dict for safetensors,
``tree`` a JSON-able structure in which each tensor is a reference to its name. :func:`join_state`
inverts it exactly (dict key types, tuples and float values round-trip; JSON floats are written
with shortest round-trip repr, so no value changes). Loading never executes anything.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_DICT = "__dict__"  # a dict whose keys are not all strings (AdamW's int parameter ids)
_FLOAT = "__float__"  # nan / inf, which strict JSON cannot hold


def split_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, tree)``; raises TypeError on anything that is not plain data."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = obj.detach().cpu().contiguous().clone()
            return {_TENSOR: name}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
        if isinstance(obj, tuple):
            return {_TUPLE: [walk(v) for v in obj]}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__")
                                                                for k in obj):
                return {k: walk(v) for k, v in obj.items()}
            return {_DICT: [[walk(k), walk(v)] for k, v in obj.items()]}
        raise TypeError(f"training state holds a {type(obj).__name__}, which a checkpoint cannot store "
                        "without pickle; keep controller state to tensors, numbers, strings and containers")

    return tensors, walk(state)


def join_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    """Inverse of :func:`split_state`; a reference to a missing tensor raises ValueError."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, dict):
            if _TENSOR in obj:
                name = obj[_TENSOR]
                if name not in tensors:
                    raise ValueError(f"checkpoint refers to tensor {name!r}, which its tensor file lacks")
                return tensors[name]
            if _TUPLE in obj:
                return tuple(walk(v) for v in obj[_TUPLE])
            if _DICT in obj:
                return {_key(walk(k)): walk(v) for k, v in obj[_DICT]}
            if _FLOAT in obj:
                return float(obj[_FLOAT])
            return {k: walk(v) for k, v in obj.items()}
        return obj

    return walk(tree)


def _key(k: Any) -> Any:
    return k if not isinstance(k, list) else tuple(k)
