"""Params that are valid types but impossible for the chosen model, caught before any training.

The schema (stages/common/params.py) cannot know that ``adapter.rank: 100000`` is absurd for a
384-wide MiniLM: only the model's shapes say so. :func:`check_model_shapes` builds the model's
skeleton from its ``config.json`` on the ``meta`` device (no weights read, no memory, well under a
second), finds the adapter targets and checks every method's structural limits:

* LoRA-family ranks (``lora lora_drop blora loraprune``): ``adapter.rank <= min(in, out)`` of every
  target (a larger rank adds parameters but no expressiveness; PEFT refuses it too);
* rank allocators (``dora_dr adalora``): the *initial* rank ``r0`` must fit, and ``r0 > rank``;
* Bone: ``block_size <= in_features``; Bat: ``block_size`` divides in and out of every target;
* LoRAPrune: the ratio must leave every prunable layer something and remove something (the grid).

prepare calls it (the first stage that resolves the model), and so do calibrate, decide and
finetune, because DVC reruns only the stages downstream of a changed param: a new ``adapter.rank``
first reaches calibrate, which trains a LoRA probe for lora_drop.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from stages.common.params import ConfigError, Params, load_params

RANKED = ("lora", "lora_drop", "blora", "loraprune")
ALLOCATORS = ("dora_dr", "adalora")


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


def _examples(targets: list[Any]) -> str:
    return ", ".join(f"{t.name} ({t.out_features}x{t.in_features})" for t in targets[:2])


def check_model_shapes(params: Params, ref_path: str | None = None) -> int | None:
    """Raise :class:`ConfigError` (one line) when ``params`` cannot work on the model's shapes.

    ``ref_path``: the resolved model folder (prepare passes it); otherwise the model is resolved
    without converting anything. Returns the number of targets checked (None: nothing to check yet)."""
    from lora_ops.methods import get_method
    from lora_ops.rank_allocation import allocation_ranks
    from lora_ops.targets import find_targets
    from stages.common.pipeline import method_context
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
    name = params.method.name
    method = get_method(name)
    p = params.method_params()
    narrowest = min(min(t.in_features, t.out_features) for t in targets)
    tight = [t for t in targets if min(t.in_features, t.out_features) == narrowest]
    rank = params.adapter.rank
    if name in RANKED and rank > narrowest:
        raise _fail("adapter.rank", f"{rank} is above min(in, out) = {narrowest} of {len(tight)} target module(s), "
                                    f"e.g. {_examples(tight)}: choose adapter.rank <= {narrowest}")
    if name in ALLOCATORS:
        try:
            r0, _ = allocation_ranks(rank, p.initial_rank_factor, p.initial_rank)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise _fail(f"adapter.rank / {name}", str(exc)) from None
        if r0 > narrowest:
            raise _fail(f"adapter.rank / {name}.initial_rank",
                        f"the initial rank r0 = {r0} is above min(in, out) = {narrowest} of e.g. {_examples(tight)}: "
                        f"lower adapter.rank or {name}.initial_rank_factor so that r0 <= {narrowest}")
    if name in ("bone", "bat", "loraprune"):
        _, ctx = method_context(params)
        try:
            if name == "loraprune":
                method.plan_model(model, targets, ctx)  # type: ignore[attr-defined]  (structure + ratio grid)
            else:
                method.decide([], targets, ctx)  # the block-size rules live in decide
        except ValueError as exc:
            key = {"bone": "bone.block_size", "bat": "bat.block_size", "loraprune": "loraprune"}[name]
            raise _fail(key, " ".join(str(exc).split())) from None
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
