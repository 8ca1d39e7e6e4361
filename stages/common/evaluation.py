"""Task evaluation of a model on tokenised features: predictions, task metrics, LM loss, latency."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lora_ops.data import BatchSource
from lora_ops.metrics import compute_metrics
from lora_ops.targets import Target
from stages.common.tasks import Task, is_lm


def eval_batches(features: dict[str, torch.Tensor], batch_size: int, group_by_length: bool = True
                 ) -> BatchSource:
    """Evaluation batches, length-sorted (each padded only to its own longest example)."""
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
def median_forward_seconds(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: str) -> float:
    """Median seconds of one forward over ``batches`` (moved to ``device``); the first is an untimed
    warm-up, and CUDA is synchronised around every timed forward."""
    model.eval()
    times: list[float] = []
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return float(torch.tensor(times).median())


def latency_per_batch(model: nn.Module, features: dict[str, torch.Tensor], batch_size: int, batches: int,
                      device: str) -> float:
    """Median seconds per forward of one evaluation batch (after one warm-up batch)."""
    source = BatchSource({k: v for k, v in features.items() if k != "labels"}, batch_size, shuffle=False)

    def cycled() -> Iterator[dict[str, torch.Tensor]]:  # the data again when it has fewer batches than asked
        while True:
            yield from source.batches()

    return median_forward_seconds(model, itertools.islice(cycled(), batches + 1), device)


def plain_lora_parameters(targets: list[Target], rank: int) -> int:
    """What plain LoRA at the same rank would train on the same targets (the reference for ratios)."""
    return sum(rank * (t.in_features + t.out_features) for t in targets)
