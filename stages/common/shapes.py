"""Params that are valid types but impossible for the chosen model, caught before any training.

The schema (stages/common/params.py) cannot know that ``adapter.rank: 100000`` is absurd for a
384-wide MiniLM: only the model's shapes say so. :func:`check_model_shapes` builds the model's
skeleton from its ``config.json`` on the ``meta`` device (no weights read, no memory, well under a
second), finds the adapter targets and lets the selected method check its own structural limits
(:meth:`lora_ops.methods.base.Method.check_shapes`: LoRA-family ranks within ``min(in, out)``, an
allocator's initial rank, Bone/Bat block sizes, LoRAPrune's ratio grid...).

prepare calls it (the first stage that resolves the model), and so do calibrate, decide and
finetune, because DVC reruns only the stages downstream of a changed param: a new ``adapter.rank``
first reaches calibrate, which trains a LoRA probe for lora_drop.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from lora_ops.methods.base import ShapeMismatch
from stages.common.params import ConfigError, Params, load_params


@functools.lru_cache(maxsize=8)
def _skeleton(path: str, causal: bool, num_labels: int) -> Any:
    """The model built from its config on the meta device (shapes only; cached per process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)  # never trust_remote_code: unknown types fail here
    if not causal:
        config.num_labels = num_labels
    with torch.device("meta"):
        cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        return cls.from_config(config)


def _model_path(params: Params, ref_path: str | None) -> str | None:
    if ref_path is not None:
        return ref_path
    from stages.common.models import ModelUnavailable, resolve_model

    try:
        ref = resolve_model(params.model.name, convert=False)
    except ModelUnavailable as exc:
        raise ConfigError(f"model.name: {exc}") from None
    if ref.source != "hub" and not (Path(ref.path) / "config.json").is_file():
        return None  # not converted yet (smollm2): prepare checks once it exists
    return ref.path


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"params.yaml: {key}: {message}")


def check_model_shapes(params: Params, ref_path: str | None = None) -> int | None:
    """Raise :class:`ConfigError` (one line) when ``params`` cannot work on the model's shapes.

    ``ref_path``: the resolved model folder (prepare passes it); otherwise the model is resolved
    without converting anything. Returns the number of targets checked (None: nothing to check yet)."""
    from lora_ops.targets import find_targets
    from stages.common.context import method_context
    from stages.common.tasks import get_task, is_lm

    path = _model_path(params, ref_path)
    if path is None:
        return None
    task = get_task(params.task.name)
    try:
        model = _skeleton(path, is_lm(task), max(1, int(task.num_labels or 1)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model.name: cannot build {params.model.name!r} from its config.json "
                          f"({' '.join(str(exc).split())[:200]})") from None
    try:
        targets = find_targets(model, params.adapter.targets)
    except ValueError as exc:
        raise _fail("adapter.targets", str(exc)) from None
    method, ctx = method_context(params)
    try:
        method.check_shapes(model, targets, ctx)
    except ShapeMismatch as exc:
        raise _fail(exc.key, exc.message) from None
    return len(targets)


def validate(path: str | Path = "params.yaml") -> Params:
    """Everything checkable before a stage runs: the schema, then the model's shapes."""
    params = load_params(path)
    check_model_shapes(params)
    return params


def main(argv: list[str] | None = None) -> None:
    """``python -m stages.common.shapes [params.yaml]``: validate, one line on error, exit 2."""
    from stages.common import runtime

    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "params.yaml"

    def _run() -> None:
        params = validate(path)
        print(f"{path}: valid for {params.method.name} on {params.model.name}")

    runtime.run_stage(_run, "validate")


if __name__ == "__main__":
    main()
