"""Small random models with every method's adapters, for device and precision comparisons.

Imports only ``lora_ops``, torch and transformers (no stages/, DVC, MLflow or Prefect), so the
CUDA tests can run on a machine that has only the library's own dependencies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_ops import available_methods
from lora_ops.adapters.base import adapter_layers
from lora_ops.data import BatchSource
from lora_ops.methods import AdapterConfig, Method, MethodContext, get_method
from lora_ops.targets import find_targets, freeze_all_but

METHODS = available_methods()
# names of the factor tensors that start at zero (B, blocks, gates): they are randomised so the
# adapters' contribution to outputs and gradients is not trivially zero in a comparison
FACTORS = ("A", "B", "E", "block", "gate")
# fast schedules so a few steps exercise every controller's allocation / pruning / gate logic
FAST = {"dora_dr": {"prune_interval": 2}, "adalora": {"delta_t": 2}, "loraprune": {"ratio": 0.5, "prune_every": 2,
                                                                                   "min_score_updates": 2}}


@dataclass
class Case:
    model: nn.Module
    method: Method
    plan: dict[str, Any]
    ctx: MethodContext
    feats: dict[str, torch.Tensor]


def features(n: int = 40, seq: int = 12, vocab: int = 120, labels: int | None = 2, seed: int = 5
             ) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=gen)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::4, seq // 2:] = 0  # some padded rows
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is None:  # causal LM: next-token labels, padding ignored
        out["labels"] = ids.masked_fill(mask == 0, -100)
    else:
        out["labels"] = torch.randint(0, labels, (n,), generator=gen)
    return out


# eager attention: the same arithmetic on every device, and deterministic on CUDA (the fused SDPA
# backward kernels may accumulate with atomics), so resumed runs can be compared step by step
def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(cfg)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def build(method_name: str, model: nn.Module | None = None, feats: dict[str, torch.Tensor] | None = None,
          randomise: bool = True, seed: int = 1) -> Case:
    """``model`` (default: a tiny BERT classifier) with ``method_name``'s adapters on every linear target."""
    model = model if model is not None else tiny_bert()
    causal = not hasattr(model, "classifier")
    feats = feats if feats is not None else features(labels=None if causal else 2)
    method = get_method(method_name)
    params = method.params_model(**{**method.params_model().model_dump(), **FAST.get(method_name, {})})
    ctx = MethodContext(adapter=AdapterConfig(rank=4, alpha=8, dropout=0.0), params=params, seed=0)
    ctx.train.progress = False
    head = [] if causal else ["classifier"]
    targets = find_targets(model, "all")
    freeze_all_but(model, head)
    if method_name == "lora_drop":
        # fixed energies, steep enough (99 % in the last layer) that the first layers share one pair
        total = sum(100.0**i for i in range(max(t.layer for t in targets) + 1))
        scores = [{"module": t.name, "group": t.group, "role": t.role, "layer": t.layer, "energy": 100.0**t.layer,
                   "importance": 100.0**t.layer / total} for t in targets]
    elif method.needs_calibration:
        sample = BatchSource(feats, 8, shuffle=False)
        scores = method.score(method.calibrate(model, targets, sample, ctx), targets, ctx)
    else:
        scores = []
    plan = method.decide(scores, targets, ctx)
    torch.manual_seed(seed)
    method.build(model, targets, plan, ctx)
    freeze_all_but(model, head)
    if randomise:
        randomise_factors(model, seed)
    return Case(model, method, plan, ctx, feats)


@torch.no_grad()
def randomise_factors(model: nn.Module, seed: int = 1) -> None:
    """Give zero-initialised factors small random values (shared tensors once)."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for layer in adapter_layers(model).values():
        for name, p in layer.adapter_parameters():
            if id(p) in seen or name.split(".")[-1] not in FACTORS:
                continue
            seen.add(id(p))
            if name.endswith("gate"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # positive: every component active
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def forward_backward(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device | str,
                     precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Logits, loss and the gradient of every trainable tensor, all as fp32 on the CPU.

    Runs in eval mode: deterministic gates and no dropout, so two devices draw nothing random."""
    from lora_ops.training.precision import autocast

    model.eval()
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast(precision, device):
        out = model(**batch)
    # fp16 gradients underflow without a loss scale (what GradScaler does in training): scale by a
    # fixed power of two, exact to undo
    scale = 2.0**12 if precision == "fp16" else 1.0
    (out.loss * scale).backward()
    if scale != 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(scale)
    res = {"logits": out.logits.detach().float().cpu(), "loss": out.loss.detach().float().cpu()}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, f"{n} is {p.dtype}: adapters must stay fp32"
            if p.grad is None:  # deterministic (eval-mode) gates pass no gradient to their logits
                continue
            assert p.grad.dtype == torch.float32, f"{n}: gradient is {p.grad.dtype}"
            res[f"grad:{n}"] = p.grad.detach().cpu()
    model.zero_grad(set_to_none=True)
    return res


def merged(case: Case, device: torch.device | str) -> nn.Module:
    """The method's own merged export (LoRAPrune: pruned structure removed) of a copy of ``case.model``."""
    model = copy.deepcopy(case.model).to(device)
    return case.method.export_merged(model, case.plan, case.ctx)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ``|a - b| / |b|`` (absolute when ``b`` is zero)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: different tensors"
    errors = {k: rel_err(got[k], want[k]) for k in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{what}: {worst} relative error {errors[worst]:.2e} > {tol:.0e}"
