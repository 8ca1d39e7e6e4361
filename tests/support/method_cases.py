"""Every method on a tiny random BERT, set up the way the pipeline sets it up (for mechanics tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.targets import find_targets, freeze_all_but
from lora_ops.training.state import join_state, split_state

# small-budget settings so every allocator and pruner acts within a few steps
# (lora_drop at T = 0.4 keeps one module per group and shares one pair among the other two)
FAST = {"dora_dr": {"prune_interval": 2}, "adalora": {"delta_t": 2}, "lora_drop": {"threshold": 0.4},
        "loraprune": {"ratio": 0.5, "prune_every": 2, "min_score_updates": 2}}


def features(n: int = 40, seq: int = 12, seed: int = 5, variable_lengths: bool = True) -> dict[str, torch.Tensor]:
    """Random examples; with ``variable_lengths`` each is right-padded at a random length (2..seq)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, seq), generator=gen)
    mask = torch.ones(n, seq, dtype=torch.long)
    if variable_lengths:
        lengths = torch.randint(2, seq + 1, (n,), generator=gen)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask  # padding id 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=gen)}


def build_case(method_name: str, dropout: float = 0.0, model_seed: int = 0, adapter_seed: int = 1,
               variable_lengths: bool = True, settings: dict[str, Any] | None = None):
    """(model, method, plan, ctx, features): tiny BERT with ``method``'s adapters, head trainable;
    ``settings`` override the method's own params (e.g. ``{"quantize_base": True}`` for blora)."""
    from transformers import BertConfig, BertForSequenceClassification

    from lora_ops.data import BatchSource

    torch.manual_seed(model_seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    method = get_method(method_name)
    params = method.params_model(**{**method.params_model().model_dump(), **FAST.get(method_name, {}),
                                    **(settings or {})})
    ctx = MethodContext(adapter=AdapterConfig(rank=4, alpha=8, dropout=dropout), params=params, seed=0)
    ctx.train.progress = False
    targets = find_targets(model, "all")
    feats = features(variable_lengths=variable_lengths)
    freeze_all_but(model, ["classifier"])
    if method_name == "lora_drop":  # fixed energies: the sharing plan, not the probe, is under test here
        scores = [{"module": t.name, "group": t.group, "role": t.role, "layer": t.layer, "energy": 1.0 + t.layer,
                   "importance": (1.0 + t.layer) / 6.0} for t in targets]
    elif method.needs_calibration:  # structure (loraprune) or quantizer ranges (blora) from the model
        scores = method.score(method.calibrate(model, targets, BatchSource(feats, 8, shuffle=False), ctx),
                              targets, ctx)
    else:
        scores = []
    plan = method.decide(scores, targets, ctx)
    torch.manual_seed(adapter_seed)
    method.build(model, targets, plan, ctx)
    freeze_all_but(model, ["classifier"])
    return model, method, plan, ctx, feats


def save_state(path: str | Path, state: Any) -> None:
    """Tests' own pickle-free persistence: ``<path>.safetensors`` + ``<path>.json``."""
    tensors, tree = split_state(state)
    save_file(tensors, f"{path}.safetensors")
    Path(f"{path}.json").write_text(json.dumps(tree))


def load_state(path: str | Path) -> Any:
    return join_state(load_file(f"{path}.safetensors"), json.loads(Path(f"{path}.json").read_text()))
