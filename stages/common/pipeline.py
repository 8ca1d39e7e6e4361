"""Pieces several stages need: output paths, the method context, tokenised features,
the adapted model rebuilt from a plan, and task evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from lora_ops.methods import Method, MethodContext, get_method
from lora_ops.methods.recipe import apply_recipe
from lora_ops.metrics import compute_metrics
from lora_ops.targets import Target, find_targets, freeze_all_but
from lora_ops.training import TrainConfig
from stages.common import runtime
from stages.common.io import read_json
from stages.common.lm import tokenize_lm
from stages.common.models import (
    LoadedModel,
    ModelRef,
    init_head_at_prior,
    load_causal_lm,
    load_for_classification,
)
from stages.common.params import Params
from stages.common.tasks import Task, get_task, is_lm


class Paths:
    """Every stage output, in one place (dvc.yaml mirrors these)."""

    root = Path("data")
    resolve = root / "resolve"  # the selected method's settings per stage (DVC dependencies)
    prepare = root / "prepare"
    train = prepare / "train.parquet"
    dev = prepare / "dev.parquet"
    validation = prepare / "validation.parquet"  # carved from the training split: model selection only
    model_ref = prepare / "model.json"
    calibrate = root / "calibrate"
    measurements = calibrate / "measurements.parquet"
    calibrate_summary = calibrate / "summary.json"
    score = root / "score"
    importance = score / "importance.parquet"
    decide = root / "decide"
    plan = decide / "plan.json"
    finetune = root / "finetune"
    adapter = finetune / "adapter.safetensors"
    finetune_summary = finetune / "summary.json"
    history = finetune / "history.csv"
    # resumable state lives outside DVC's outputs: DVC deletes a stage's outs before rerunning it
    checkpoints = Path(".lora_sieve") / "checkpoints"
    checkpoint = checkpoints / "finetune.json"  # + finetune.<token>.safetensors (stages/common/checkpoint.py)
    merge = root / "merge"
    merged_model = merge / "model"
    compact = merge / "adapter"
    peft = merge / "peft"
    evaluate = root / "evaluate"
    metrics = evaluate / "metrics.json"  # deterministic: quality, sizes, trivial baseline
    timings = evaluate / "timings.json"  # wall time, latency, memory (differ run to run)
    plots = evaluate / "plots"


def method_context(params: Params) -> tuple[Method, MethodContext]:
    method = get_method(params.method.name)
    t = params.train
    settings = params.method_params()
    ctx = MethodContext(
        adapter=params.adapter,
        params=settings,
        # the method's recipe (its learning rates per parameter group, warm-up) over the train section
        train=apply_recipe(TrainConfig(epochs=t.epochs, lr=t.lr, head_lr=t.head_lr, weight_decay=t.weight_decay,
                          warmup_ratio=t.warmup_ratio, grad_clip=t.grad_clip, max_steps=t.max_steps,
                          checkpoint_every=t.checkpoint_every, precision=t.precision,
                          gradient_checkpointing=t.gradient_checkpointing), settings.recipe),
        seed=params.seed,
        device=runtime.device(),
        batch_size=t.batch_size,
    )
    return method, ctx


def task_of(params: Params) -> Task:
    return get_task(params.task.name)


def select_metric(params: Params) -> str:
    """The metric that picks the best epoch: the task's main metric, or dev loss for causal LMs."""
    if params.train.select_metric != "main":
        return params.train.select_metric
    task = task_of(params)
    return "loss" if is_lm(task) else task.main_metric


def tokenize(df: pd.DataFrame, task: Task, tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    if is_lm(task):
        return tokenize_lm(df["text"].tolist(), tokenizer, max_length)
    texts = [df[f].tolist() for f in task.fields]
    enc = tokenizer(*texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    features = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        features["token_type_ids"] = enc["token_type_ids"]
    dtype = torch.float32 if task.is_regression else torch.long
    features["labels"] = torch.tensor(df["label"].to_numpy(), dtype=dtype)
    return features


def read_metrics(root: Path | str = ".") -> dict[str, Any]:
    """metrics.json with timings.json merged in (what promote and the flows report)."""
    root = Path(root)
    metrics = read_json(root / Paths.metrics)
    if (root / Paths.timings).is_file():
        metrics.update(read_json(root / Paths.timings))
    return metrics


def model_ref(params: Params) -> ModelRef:
    info = read_json(Paths.model_ref)
    if info["name"] != params.model.name:
        raise ValueError(f"{Paths.model_ref} is for model {info['name']!r}, params say {params.model.name!r}: "
                         "rerun the prepare stage")
    return ModelRef(info["name"], info["path"], info["source"])


def load_base(params: Params) -> LoadedModel:
    """The base model for the task. A new head is initialised from the run's ``head`` seed stream,
    so every stage that loads the base (calibrate, decide, finetune, evaluate) gets the same head."""
    task = task_of(params)
    runtime.seed_everything(runtime.derive_seed(params.seed, "head"))
    if is_lm(task):
        return load_causal_lm(model_ref(params))
    loaded = load_for_classification(model_ref(params), task.num_labels)
    init_head_at_prior(loaded.model, loaded.head_modules, read_json(Paths.model_ref).get("label_prior"))
    return loaded


@dataclass
class Adapted:
    loaded: LoadedModel
    method: Method
    ctx: MethodContext
    targets: list[Target]
    plan: dict[str, Any]

    @property
    def model(self) -> nn.Module:
        return self.loaded.model


def build_adapted(params: Params, plan: dict[str, Any] | None = None, loaded: LoadedModel | None = None
                  ) -> Adapted:
    """Base model (``loaded``, or loaded here) + the plan's adapters, backbone frozen, head trainable."""
    method, ctx = method_context(params)
    loaded = loaded or load_base(params)
    targets = find_targets(loaded.model, params.adapter.targets)
    if plan is None:
        plan = read_json(Paths.plan)
    if plan.get("method") != method.name:
        raise ValueError(f"plan was made for {plan.get('method')!r}, params select {method.name!r}: rerun decide")
    runtime.seed_everything(runtime.derive_seed(params.seed, "adapter"))  # adapter initialisation
    method.build(loaded.model, targets, plan, ctx)
    freeze_all_but(loaded.model, loaded.head_modules)
    loaded.model.to(ctx.device)
    return Adapted(loaded, method, ctx, targets, plan)


def eval_batches(features: dict[str, torch.Tensor], batch_size: int, group_by_length: bool = True):
    """Evaluation batches, length-sorted (each padded only to its own longest example)."""
    from lora_ops.data import BatchSource

    return BatchSource(features, batch_size, shuffle=False, group_by_length=group_by_length)


@torch.no_grad()
def predict(model: nn.Module, features: dict[str, torch.Tensor], batch_size: int, device: str,
            group_by_length: bool = True) -> torch.Tensor:
    """Logits for every example, in the order of ``features`` (batches run length-sorted)."""
    model.eval()
    source = eval_batches({k: v for k, v in features.items() if k != "labels"}, batch_size, group_by_length)
    outs, rows = [], []
    for idx in source.batch_indices():
        batch = source.collate(idx)
        outs.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
        rows.append(idx)
    if not outs:
        raise ValueError("nothing to predict: the evaluation set is empty")
    logits = torch.cat(outs)
    ordered = torch.empty_like(logits)
    ordered[torch.cat(rows)] = logits
    return ordered


def task_metrics(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
    return compute_metrics(list(task.metrics), pred, labels)


@torch.no_grad()
def lm_loss(model: nn.Module, features: dict[str, torch.Tensor], batch_size: int, device: str) -> dict[str, float]:
    """Token-weighted mean NLL and perplexity on held-out instruction data."""
    import math

    from lora_ops.data import BatchSource

    model.eval()
    nll, tokens = 0.0, 0
    for batch in BatchSource(features, batch_size, shuffle=False, group_by_length=True).batches():
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        nll += model(**batch).loss.item() * n
        tokens += n
    loss = nll / max(1, tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


def evaluate_features(model: nn.Module, features: dict[str, torch.Tensor], task: Task, batch_size: int,
                      device: str) -> dict[str, float]:
    if is_lm(task):
        return lm_loss(model, features, batch_size, device)
    logits = predict(model, features, batch_size, device)
    metrics = task_metrics(task, logits, features["labels"])
    if task.is_regression:
        metrics["loss"] = torch.nn.functional.mse_loss(logits.squeeze(-1), features["labels"]).item()
    else:
        metrics["loss"] = torch.nn.functional.cross_entropy(logits, features["labels"]).item()
    return metrics


@torch.no_grad()
def latency_per_batch(model: nn.Module, features: dict[str, torch.Tensor], batch_size: int, batches: int,
                      device: str) -> float:
    """Median seconds per forward of one batch (after one warm-up batch)."""
    from lora_ops.data import BatchSource

    model.eval()
    source = BatchSource({k: v for k, v in features.items() if k != "labels"}, batch_size, shuffle=False)
    times: list[float] = []
    first = True
    while len(times) < batches:  # cycle over the data when it has fewer batches than requested
        for batch in source.batches():
            batch = {k: v.to(device) for k, v in batch.items()}
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**batch)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if not first:
                times.append(time.perf_counter() - start)
            first = False
            if len(times) >= batches:
                break
    return float(torch.tensor(times).median())


def plain_lora_parameters(targets: list[Target], rank: int) -> int:
    """What plain LoRA at the same rank would train on the same targets (the reference for ratios)."""
    return sum(rank * (t.in_features + t.out_features) for t in targets)
