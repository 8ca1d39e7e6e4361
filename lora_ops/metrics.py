"""Task metrics (GLUE's official ones), computed from plain tensors."""

from __future__ import annotations

import math

import torch


def accuracy(pred: torch.Tensor, label: torch.Tensor) -> float:
    return (pred == label).float().mean().item()


def f1_binary(pred: torch.Tensor, label: torch.Tensor, positive: int = 1) -> float:
    tp = ((pred == positive) & (label == positive)).sum().item()
    fp = ((pred == positive) & (label != positive)).sum().item()
    fn = ((pred != positive) & (label == positive)).sum().item()
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(pred: torch.Tensor, label: torch.Tensor) -> float:
    tp = ((pred == 1) & (label == 1)).sum().item()
    tn = ((pred == 0) & (label == 0)).sum().item()
    fp = ((pred == 1) & (label == 0)).sum().item()
    fn = ((pred == 0) & (label == 1)).sum().item()
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double() - x.double().mean()
    y = y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return 0.0 if denom == 0 else (x @ y / denom).item()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), as Spearman's definition needs."""
    x = x.double()
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(_ranks(x), _ranks(y))


METRIC_FUNCTIONS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(names: list[str], pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    return {name: METRIC_FUNCTIONS[name](pred, label) for name in names}
