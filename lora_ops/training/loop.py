"""The fine-tuning loop: AdamW, warm-up + linear decay, per-epoch evaluation, best state kept,
progress bar, and exact resume from a checkpoint state.

The loop does no file I/O: ``on_checkpoint(state)`` hands a complete, resumable state dict
to the caller (the finetune stage writes it atomically), and ``resume`` takes it back.
Data-parallel runs: wrap nothing here; the loop all-reduces adapter gradients itself
(see :mod:`lora_ops.distributed`) so controllers see identical gradients on every rank.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lora_ops import distributed as dist
from lora_ops.adapters.base import AdapterLayer, drop_lowp_copies
from lora_ops.data import BatchSource
from lora_ops.schedules import warmup_linear_decay
from lora_ops.training import precision as amp
from lora_ops.training.cls_only import cls_only_last_layer
from lora_ops.training.controller import Controller
from lora_ops.training.lm_loss import causal_lm_loss, chunked_loss_unsupported


@dataclass
class TrainConfig:
    """The loop's settings. Its defaults are the project's training defaults: the ``train`` section's schema
    (stages/common/params.py) takes its defaults from here, and params.yaml states the same values."""

    epochs: int = 4
    lr: float = 1e-3
    head_lr: float | None = None
    #: learning rate per named parameter group (``adapter``, ``head``, ``gates``, ``ranges``...); a group
    #: not listed trains at ``lr`` (the head at ``head_lr`` when set). Groups come from the adapter layers.
    group_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float | None = 1.0
    max_steps: int | None = None
    checkpoint_every: int = 50  # optimizer steps between checkpoints (with on_checkpoint); 0: only at epoch ends
    select_metric: str = "loss"  # metric for "best"; "loss" is minimised, any other maximised
    progress: bool = True
    progress_label: str = "finetune"
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto: autocast; parameters and optimizer state stay fp32
    gradient_checkpointing: bool = False  # recompute block activations in backward (HF models)
    #: AdamW's fused kernel (one multi-tensor kernel instead of a per-parameter loop) where torch has it for
    #: the device. Off by default for now: its rounding differs from the loop's in the last bit, so turning it
    #: on changes a run's bytes (not their reproducibility); see benchmarks/bench_optimizer.py
    fused_adamw: bool = False
    #: a BERT-style classifier's last layer computes the [CLS] row only (lora_ops/training/cls_only.py): the
    #: same loss and gradients to float rounding, ~14 % fewer linear FLOPs on MiniLM. Off by default for now:
    #: like fused_adamw it changes a run's bytes in the last bits; other models ignore it
    cls_only_last_layer: bool = False
    #: > 0: a causal LM's loss from the decoder's hidden states, output projection and cross-entropy this many
    #: target rows at a time (lora_ops/training/lm_loss.py): no full logits tensor, no logits for padding;
    #: the same loss and gradients to float rounding. 0: the model's own ``.loss``
    lm_loss_chunk: int = 0


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    precision: str = ""  # the precision the run trained in (``auto`` resolved)


log = logging.getLogger(__name__)


def fused_adamw_supported(device: torch.device | str) -> bool:
    """Whether this torch has AdamW's fused kernel for ``device``'s type (CPU since torch 2.4)."""
    import torch.utils._foreach_utils as foreach_utils

    supported = getattr(foreach_utils, "_get_fused_kernels_supported_devices", None)
    return supported is not None and torch.device(device).type in supported()


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused when asked for and supported on ``device`` (else the plain loop)."""
    if cfg.fused_adamw and fused_adamw_supported(device):
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class TrainingInterrupted(RuntimeError):
    """Raised by a checkpoint callback to stop training (used to test kill + resume)."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of all trainable parameters and adapter buffers (shared tensors once)."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for lname, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):
            for bname, buf in layer.named_buffers():
                if not bname.startswith("base."):
                    state[f"{lname}.{bname}"] = buf.detach().clone()
    return state


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[:3]}")
    for name, value in state.items():
        target = params.get(name, buffers.get(name))
        if target is None:
            raise ValueError(f"checkpoint tensor {name!r} does not exist in this model (wrong plan or method?)")
        if target.shape != value.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
        target.copy_(value)


HEAD_GROUP = "head"  # every trainable parameter outside the adapter layers (task head, unfrozen norms)


def parameter_group_names(model: nn.Module) -> dict[str, str]:
    """Trainable parameter name -> optimiser group name (``head`` outside adapter layers).

    Adapter layers name their groups (:meth:`AdapterLayer.parameter_group`); a tensor shared by
    several layers (LoRA-drop's shared pair) appears once, under its first name."""
    of_param: dict[int, str] = {}
    for layer in model.modules():
        if isinstance(layer, AdapterLayer):
            for pname, p in layer.adapter_parameters():
                of_param.setdefault(id(p), layer.parameter_group(pname))
    return {name: of_param.get(id(p), HEAD_GROUP) for name, p in model.named_parameters() if p.requires_grad}


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups keyed by (named group, decay); each carries its ``name`` (kept in checkpoints)."""
    no_decay_ids: set[int] = set()
    for layer in model.modules():
        if isinstance(layer, AdapterLayer):
            skip = layer.no_decay_parameter_names()
            no_decay_ids.update(id(p) for pname, p in layer.adapter_parameters() if pname in skip)
    names = parameter_group_names(model)
    unknown = sorted(set(cfg.group_lr) - set(names.values()))
    if unknown:
        raise ValueError(f"learning rate set for parameter group(s) {unknown}, which this model does not have; "
                         f"its groups are {sorted(set(names.values()))}")
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = names[name]
        is_head = group == HEAD_GROUP
        decay = id(p) not in no_decay_ids and not (is_head and (p.dim() < 2 or "norm" in name.lower()))
        groups.setdefault((group, decay), []).append(p)
    out = []
    for (group, decay), params in groups.items():
        default = cfg.head_lr if group == HEAD_GROUP and cfg.head_lr is not None else cfg.lr
        out.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                    "lr": cfg.group_lr.get(group, default), "name": group if decay else f"{group}.no_decay"})
    return out


def train(
    model: nn.Module,
    data: BatchSource,
    cfg: TrainConfig,
    controller: Controller | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Fine-tune the trainable parameters of ``model`` and leave the best state loaded."""
    controller = controller or Controller()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cfg.lm_loss_chunk:
        if loss_fn is not None:
            raise ValueError("lm_loss_chunk replaces the model's own loss: it cannot be combined with a loss_fn")
        why = chunked_loss_unsupported(model)
        if why:
            raise ValueError(f"lm_loss_chunk: {why}; set it to 0")
        loss_fn = functools.partial(causal_lm_loss, chunk=cfg.lm_loss_chunk)
    loss_fn = loss_fn or (lambda m, batch: m(**batch).loss)
    amp.check_precision(cfg.precision, device)  # before any work: bf16 on a GPU without it fails here
    precision = amp.resolve_precision(cfg.precision, device)
    if cfg.precision == "auto":
        log.info("precision auto -> %s on %s", precision, device)
    if cfg.gradient_checkpointing:
        amp.enable_gradient_checkpointing(model)
    scaler = amp.grad_scaler(precision, device)  # fp16 only
    steps_per_epoch = len(data)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if total < 1:
        raise ValueError("training has no steps: the data set is smaller than one batch or max_steps is 0")
    controller.bind(total)

    groups = _param_groups(model, cfg)
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    trainable = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, cfg, device)
    warmup = int(round(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_linear_decay(s, warmup, total))

    step, epoch, batch_in_epoch = 0, 0, 0
    result = TrainResult(steps=total, precision=precision)
    maximise = cfg.select_metric != "loss"
    if resume is not None:
        load_trainable_state(model, resume["trainable"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        controller.load_state_dict(resume["controller"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step, epoch, batch_in_epoch = resume["step"], resume["epoch"], resume["batch_in_epoch"]
        result.history, result.evals, result.best = resume["history"], resume["evals"], resume["best"]
        torch.set_rng_state(resume["rng"]["cpu"])
        if torch.cuda.is_available() and resume["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        # a field added since the checkpoint was written counts as its default
        if resume.get("config") and {**asdict(TrainConfig()), **resume["config"]} != asdict(cfg):
            raise ValueError("checkpoint was written with a different training config; delete it to start over")

    def snapshot() -> dict[str, Any]:
        return {
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "controller": controller.state_dict(),
            "history": list(result.history), "evals": list(result.evals), "best": dict(result.best),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": asdict(cfg),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    show = cfg.progress and dist.is_main()
    if show and cfg.precision == "auto":
        tqdm.write(f"{cfg.progress_label}: precision auto -> {precision}")
    bar = tqdm(total=total, initial=step, disable=not show, desc=cfg.progress_label, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    started = time.perf_counter()
    with cls_only_last_layer(model, cfg.cls_only_last_layer) as cls_only:
        if cfg.cls_only_last_layer:
            log.info("[CLS]-only last layer: %s", "on" if cls_only else "not applicable to this model")
        model.train()
        while step < total and epoch < cfg.epochs:
            for batch in data.batches(epoch, start=batch_in_epoch):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with amp.autocast(precision, device):
                    loss = loss_fn(model, batch)
                if dist.world_size() > 1:
                    # ranks may hold unequal shares of the global batch (the last batch of an epoch):
                    # weight each rank's mean loss so the averaged gradient is the global-batch mean
                    local = next(iter(batch.values())).shape[0]
                    loss = loss * (local * dist.world_size() / dist.sum_scalar(local))
                reg = controller.regularizer(step)
                total_loss = loss if reg is None else loss + reg
                if not torch.isfinite(total_loss):
                    raise FloatingPointError(f"loss became {total_loss.item()} at step {step}: lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                (total_loss if scaler is None else scaler.scale(total_loss)).backward()
                dist.all_reduce_gradients(trainable)
                if scaler is not None:
                    # after the all-reduce, so an overflow on one rank is seen (and skipped) by all; before the
                    # controller and clipping, which need true gradients (LoRAPrune's scores mix G and G^2 terms)
                    scaler.unscale_(optimizer)
                if scaler is None or amp.grads_finite(trainable):
                    controller.on_after_backward(step + 1)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                    scaler.update()
                scheduler.step()
                step += 1
                batch_in_epoch += 1
                controller.on_step_end(step)
                record = {"step": step, "epoch": epoch + batch_in_epoch / steps_per_epoch,
                          "loss": dist.mean_scalar(loss.item()), "lr": scheduler.get_last_lr()[0]}
                if reg is not None:
                    record["regularizer"] = float(reg.detach())
                result.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                bar.update(1)
                end_of_epoch = batch_in_epoch >= steps_per_epoch
                if step >= total or end_of_epoch:
                    break
                if on_checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    on_checkpoint(snapshot())
            # epoch finished (or budget reached): evaluate, keep the best state
            if evaluate is not None:
                model.eval()
                metrics = evaluate(model)
                model.train()
                metrics = {"step": step, "epoch": epoch + 1, **metrics}
                result.evals.append(metrics)
                value = metrics.get(cfg.select_metric)
                if value is None:
                    raise KeyError(f"select_metric {cfg.select_metric!r} not among evaluation metrics {sorted(metrics)}")
                improved = not result.best or (value > result.best["value"] if maximise else value < result.best["value"])
                better = controller.allows_best(step) and improved
                if better:
                    result.best = {"value": value, "step": step, "epoch": epoch + 1, "trainable": trainable_state(model),
                                   "controller": controller.state_dict()}
                if show:
                    tqdm.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                                 if isinstance(v, float)))
            epoch += 1
            batch_in_epoch = 0
            if on_checkpoint is not None and step < total:
                on_checkpoint(snapshot())
        bar.close()
    controller.on_train_end()
    if result.best:
        load_trainable_state(model, result.best["trainable"])
        controller.load_state_dict(result.best["controller"])
        controller.on_train_end()
    result.seconds = time.perf_counter() - started
    drop_lowp_copies(model)  # the low-precision copies of frozen weights are a training cache only
    model.eval()
    return result
