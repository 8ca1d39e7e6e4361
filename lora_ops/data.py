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


def sequence_lengths(features: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Real tokens per example (from ``attention_mask``), or None for features without one."""
    mask = features.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return None
    return mask.sum(dim=1)


class BatchSource:
    """Batches of a dict of equal-length tensors, reshuffled per epoch from ``seed + epoch``.

    * resumable: ``batches(epoch, start=k)`` skips the first ``k`` batches exactly (the batch
      sequence of an epoch is a pure function of ``seed`` and ``epoch``);
    * shardable: with ``world_size > 1`` each rank gets a contiguous slice of every global
      batch, so N processes see the same global batch as one process would;
    * dynamic padding: columns past the longest sequence of the batch are dropped (rounded up to
      ``pad_to_multiple_of`` when set), so a batch costs what its longest example costs;
    * length grouping (``group_by_length``): the epoch's seeded permutation is cut into
      mega-batches of ``bucket_batches`` batches, each sorted by length (longest first), cut into
      batches, and the batches are shuffled (seeded) so short and long batches alternate across
      the epoch — like ``transformers.Trainer``'s length-grouped sampler. Every example is still
      seen exactly once per epoch. Without shuffling, grouping orders the whole set by length
      (evaluation): :meth:`batch_indices` says where each output row belongs.
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
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = None,
        bucket_batches: int = 50,
        dynamic_padding: bool = True,
    ) -> None:
        lengths = {len(v) for v in features.values()}
        if len(lengths) != 1:
            raise ValueError(f"feature tensors differ in length: {lengths}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be >= 1")
        if bucket_batches < 1:
            raise ValueError("bucket_batches must be >= 1")
        self.features = features
        self.n = lengths.pop()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.lengths = sequence_lengths(features) if group_by_length else None
        self.group_by_length = self.lengths is not None
        self.pad_to_multiple_of = pad_to_multiple_of
        self.bucket_batches = bucket_batches
        self.dynamic_padding = dynamic_padding  # False: every batch keeps the stored (max_length) width

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's example order (batches are consecutive slices of it)."""
        return torch.cat(self._global_batches(epoch)) if self.n else torch.arange(0)

    def _global_batches(self, epoch: int) -> list[torch.Tensor]:
        bs = self.batch_size
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        if self.group_by_length:
            assert self.lengths is not None
            if self.shuffle:
                mega = bs * self.bucket_batches
                chunks = [perm[i:i + mega] for i in range(0, self.n, mega)]
            else:
                chunks = [perm]
            # stable sort, longest first: ties keep the permutation's order (deterministic)
            perm = torch.cat([c[torch.sort(self.lengths[c], descending=True, stable=True).indices]
                              for c in chunks])
        batches = [perm[b * bs:(b + 1) * bs] for b in range(len(self))]
        if self.group_by_length and self.shuffle and len(batches) > 1:
            # keep the epoch's longest batch first (a memory peak shows at once, as Trainer does),
            # shuffle the rest with the same seeded generator
            rest = torch.randperm(len(batches) - 1, generator=gen) + 1
            batches = [batches[0]] + [batches[i] for i in rest.tolist()]
        return batches

    def batch_indices(self, epoch: int = 0) -> list[torch.Tensor]:
        """This rank's example indices of every batch of ``epoch``, in order."""
        out = self._global_batches(epoch)
        if self.world_size > 1:
            out = [idx.tensor_split(self.world_size)[self.rank] for idx in out]
        return out

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        for idx in self.batch_indices(epoch)[start:]:
            yield self.collate(idx)

    def collate(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {k: v[idx] for k, v in self.features.items()}
        mask = batch.get("attention_mask")
        if self.dynamic_padding and mask is not None and mask.dim() == 2 and len(idx) > 0:
            full = mask.shape[1]
            width = int(mask.sum(dim=1).max().item())
            if self.pad_to_multiple_of:
                width = min(full, -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of)
            for k, v in batch.items():
                if v.dim() == 2 and v.shape[1] == full:
                    batch[k] = v[:, :width]
        return batch
