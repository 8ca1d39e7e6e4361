"""Benchmark helpers: the real MiniLM, a fixed batch, and interleaved timing.

Variants are timed round-robin (one repetition of each per round) and summarised by the
median, so a slow moment of a shared machine hits every variant alike; only ratios measured
in the same run are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def minilm(num_labels: int = 2):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from stages.common.models import resolve_model

    logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm").path,
                                                              num_labels=num_labels).float()


def fixed_batch(batch: int = 32, seq: int = 64, vocab: int = 30522, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def interleaved(variants: dict[str, Callable[[], None]], rounds: int = 10, warmup: int = 2) -> dict[str, float]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
