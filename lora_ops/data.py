"""Deterministic, resumable, shardable batching of pre-tokenised tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def stratified_indices(labels: torch.Tensor, size: float | int, seed: int) -> torch.Tensor:
    """Indices of a stratified sample: ``size`` <= 1 is a ratio, > 1 a count. Label shares are kept.

    Regression labels (floats) are stratified by quintile so the sample spans the range.
    """
    n = len(labels)
    count = round(size * n) if isinstance(size, float) and size <= 1.0 else int(size)
    count = max(1, min(n, count))
    if labels.is_floating_point():
        edges = torch.quantile(labels.float(), torch.tensor([0.2, 0.4, 0.6, 0.8]))
        strata = torch.bucketize(labels.float(), edges)
    else:
        strata = labels
    gen = torch.Generator().manual_seed(seed)
    chosen: list[torch.Tensor] = []
    classes = torch.unique(strata)
    quotas = {int(c): (strata == c).sum().item() * count / n for c in classes}
    # largest-remainder rounding so the quotas add up to exactly `count`
    floors = {c: math.floor(q) for c, q in quotas.items()}
    short = count - sum(floors.values())
    for c in sorted(quotas, key=lambda c: quotas[c] - floors[c], reverse=True)[:short]:
        floors[c] += 1
    for c in sorted(floors):
        members = torch.nonzero(strata == c).flatten()
        perm = members[torch.randperm(len(members), generator=gen)]
        chosen.append(perm[: floors[c]])
    return torch.sort(torch.cat(chosen)).values


class BatchSource:
    """Batches of a dict of equal-length tensors, reshuffled per epoch from ``seed + epoch``.

    * resumable: ``batches(epoch, start=k)`` skips the first ``k`` batches exactly;
    * shardable: with ``world_size > 1`` each rank gets a contiguous slice of every global
      batch, so N processes see the same global batch as one process would;
    * dynamic padding: columns past the longest sequence of the batch are dropped.
    """

    def __init__(
        self,
        features: dict[str, torch.Tensor],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        lengths = {len(v) for v in features.values()}
        if len(lengths) != 1:
            raise ValueError(f"feature tensors differ in length: {lengths}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.features = features
        self.n = lengths.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = self.order(epoch)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.world_size > 1:
                idx = idx.tensor_split(self.world_size)[self.rank]
            yield self.collate(idx)

    def collate(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {k: v[idx] for k, v in self.features.items()}
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2 and len(idx) > 0:
            width = int(mask.sum(dim=1).max().item())
            for k, v in batch.items():
                if v.dim() == 2 and v.shape[1] == mask.shape[1]:
                    batch[k] = v[:, :width]
        return batch
