"""Recovery: a short re-tune of the trimmed factors (and the head) before they are quantised.

Structured pruning follows a cut with a few steps of training so the remaining weights take over what
the removed ones did; here the cut is the trimmed rank. :func:`recover` puts the trimmed float pairs on
a base model as plain LoRA layers at the kept ranks (a pair shared by several modules stays one
parameter, as :func:`lora_ops.compress.adapter.inject_compressed` builds it), trains those factors and
the head for ``cfg.max_steps`` optimizer steps, and hands back the pairs re-decomposed into the
compress stage's canonical form (orthonormal ``B'``, ``A'`` rows carrying the singular values), which
is what the quantiser's per-component scales expect. Whether a recovered candidate is kept is decided
by the caller on validation (stages/compress.py), never here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from lora_ops.compress.adapter import CompressedAdapter, StoredPair, inject_compressed
from lora_ops.compress.trim import decompose_svd
from lora_ops.data import BatchSource
from lora_ops.targets import freeze_all_but
from lora_ops.training import TrainConfig, train


def recover(base_model: nn.Module, adapter: CompressedAdapter, head_prefixes: Sequence[str], data: BatchSource,
            cfg: TrainConfig, device: torch.device | str | None = None) -> CompressedAdapter:
    """``adapter``'s float pairs (and head) after ``cfg.max_steps`` steps on ``data``; ``base_model`` is a base
    model without adapters that this call adapts and trains (pass a copy). Pairs trimmed to rank 0 stay
    rank 0; the settings are kept."""
    if cfg.max_steps is None or cfg.max_steps < 1:
        raise ValueError(f"recovery needs max_steps >= 1, got {cfg.max_steps}")
    if any(p.bits for p in adapter.pairs):
        raise ValueError("recovery re-tunes float factors: quantise after it, not before")
    layers = inject_compressed(base_model, adapter)
    freeze_all_but(base_model, head_prefixes)
    train(base_model, data, cfg, device=device)
    pairs: list[StoredPair] = []
    for stored in adapter.pairs:
        if stored.rank == 0:
            pairs.append(stored)
            continue
        lora = layers[stored.modules[0]].lora
        d = decompose_svd(lora.A.detach(), lora.B.detach(), stored.scale)
        a, b = d.factors(d.max_rank, stored.scale)
        pairs.append(StoredPair(stored.modules, stored.scale, a.float().contiguous(), b.float().contiguous()))
    params = dict(base_model.named_parameters())
    head = {name: params[name].detach().clone().contiguous() for name in adapter.head}
    return CompressedAdapter(pairs=pairs, head=head, settings=dict(adapter.settings))


def steps_config(cfg: TrainConfig, steps: int, steps_per_epoch: int, lr: float | None = None) -> TrainConfig:
    """The finetune config turned into a recovery run of ``steps`` optimizer steps: as many epochs as they
    need, no checkpoints or progress bar, the best state by training loss (no evaluation inside)."""
    epochs = max(1, -(-steps // max(steps_per_epoch, 1)))
    return replace(cfg, epochs=epochs, max_steps=steps, lr=cfg.lr if lr is None else lr, checkpoint_every=0,
                   progress=False, select_metric="loss", progress_label="recovery")
