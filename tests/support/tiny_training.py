"""Small training runs for unit tests on the tiny random models of conftest: random batches, one
method's adapters on every target, a run interrupted at a step (a simulated kill), and a method's
PEFT export loaded back by PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ops.data import BatchSource
from lora_ops.methods import AdapterConfig, Method, MethodContext, get_method
from lora_ops.targets import find_targets, freeze_all_but
from lora_ops.training import TrainingInterrupted


def random_batch(n: int = 4, seq: int = 12, vocab: int = 120, labels: int = 2, seed: int = 0) -> dict:
    """``n`` random classification examples of length ``seq``; the first row is half padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=gen)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, labels, (n,), generator=gen)}


def adapt(model: nn.Module, method_name: str, rank: int = 2, alpha: float = 8.0, dropout: float = 0.0,
          **params: Any) -> tuple[Method, MethodContext, dict]:
    """``method_name``'s adapters on every target of ``model`` (planned without calibration scores),
    with only the adapters and the classifier head trainable: ``(method, ctx, plan)``."""
    method = get_method(method_name)
    ctx = MethodContext(adapter=AdapterConfig(rank=rank, alpha=alpha, dropout=dropout),
                        params=method.params_model(**params))
    targets = find_targets(model, "all")
    plan = method.decide([], targets, ctx)
    method.build(model, targets, plan, ctx)
    freeze_all_but(model, ["classifier"])
    return method, ctx, plan


def with_lora(model: nn.Module, dropout: float = 0.1) -> nn.Module:
    """``model`` itself with rank-4 LoRA (alpha 8) on every target and only adapters and head trainable."""
    adapt(model, "lora", rank=4, alpha=8, dropout=dropout)
    return model


def train_batches() -> BatchSource:
    """Five shuffled batches of 8 random examples, the same ones every call."""
    return BatchSource(random_batch(n=40, seed=5), batch_size=8, seed=1)


def loss_and_accuracy(model: nn.Module) -> dict[str, float]:
    """An ``evaluate`` callback for ``train``: loss and accuracy on 8 held-out random examples."""
    b = random_batch(n=8, seed=9)
    with torch.no_grad():
        out = model(**b)
    return {"loss": out.loss.item(), "accuracy": (out.logits.argmax(-1) == b["labels"]).float().mean().item()}


class InterruptAtStep:
    """An ``on_checkpoint`` callback that keeps the latest checkpoint state (``.state``) and stops
    the run with ``TrainingInterrupted`` at the first checkpoint at or after ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.state: dict | None = None

    def __call__(self, state: dict) -> None:
        self.state = state
        if state["step"] >= self.step:
            raise TrainingInterrupted("simulated kill")


def reload_with_peft(export: Any, base: nn.Module, folder: Path) -> nn.Module:
    """A method's PEFT export written as a PEFT adapter folder and loaded by PEFT onto ``base``
    (a model holding the base weights), in eval mode."""
    import peft
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(export.config))
    save_file(export.tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return peft.PeftModel.from_pretrained(base.eval(), str(folder)).eval()


def fresh_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new model of ``model``'s class and config holding ``state`` (the weights saved before adapting)."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(state)
    return fresh
