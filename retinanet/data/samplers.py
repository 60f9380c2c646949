"""Training batches that are a pure function of (seed, epoch, rank): resumable at any batch, same on any machine.

``EpochBatchSampler`` shuffles with ``DistributedSampler`` (permutation from ``seed + epoch``;
rank ``r`` of ``W`` takes every W-th index, padded to equal shares), optionally groups images of
like aspect ratio, cuts the share into batches and can skip the batches a resumed run has already
trained on. It yields ``(index, augmentation seed)`` pairs; ``SeededSamples`` sets the dataset
transform's random state from that seed before loading the sample, so an image's augmentation
depends only on ``(seed, epoch, index)``: not on the worker that loads it, the number of workers,
the number of ranks, or whether the run was interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch`` (a well-mixed 32-bit number)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


def aspect_groups(dataset) -> list[int]:
    """0 for landscape or square images, 1 for portrait ones (``dataset.image_size(i) -> (h, w)``)."""
    groups = []
    for i in range(len(dataset)):
        h, w = dataset.image_size(i)
        groups.append(0 if w >= h else 1)
    return groups


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's training batches of one epoch, as lists of ``(index, seed)``; see the module docstring.

    Every rank yields the same number of batches (``len(self)``): ``share // batch_size`` (at
    least 1), rounded down to a multiple of ``multiple_of`` (gradient accumulation). With
    ``group_ids`` a batch holds one group's images while it can; the leftovers of the groups
    are batched together at the end, so grouping never changes the number of batches.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0,
                 group_ids: Sequence[int] | None = None, multiple_of: int = 1):
        if dataset_len < 1:
            raise ValueError("EpochBatchSampler: the dataset is empty")
        self.sampler = DistributedSampler(range(dataset_len), num_replicas=num_replicas, rank=rank, shuffle=True,
                                          seed=int(seed), drop_last=False)
        self.batch_size, self.seed, self.multiple_of = int(batch_size), int(seed), max(1, int(multiple_of))
        self.group_ids = None if group_ids is None else list(group_ids)
        self.epoch, self.skip = 0, 0
        share = self.sampler.num_samples
        self.full_batches = max(1, share // self.batch_size)
        self.num_batches = self.full_batches // self.multiple_of * self.multiple_of

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Batches of ``epoch`` from now on, leaving out its first ``skip`` (already trained on)."""
        self.epoch, self.skip = int(epoch), int(skip)

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self) -> list[list[int]]:
        """All ``len(self)`` batches of the current epoch as dataset indices (skipped ones included)."""
        self.sampler.set_epoch(self.epoch)
        indices = list(self.sampler)
        batches = _chunks(indices, self.batch_size) if self.group_ids is None else self._grouped(indices)
        return batches[:self.num_batches]

    def _grouped(self, indices: list[int]) -> list[list[int]]:
        buffers: dict[int, list[int]] = {}
        batches = []
        for i in indices:
            buf = buffers.setdefault(self.group_ids[i], [])
            buf.append(i)
            if len(buf) == self.batch_size:
                batches.append(buf[:])
                buf.clear()
        leftovers = [i for g in sorted(buffers) for i in buffers[g]]
        return batches + _chunks(leftovers, self.batch_size, keep_partial=not batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.epoch_batches()[self.skip:]:
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch]


def _chunks(items: list[int], size: int, keep_partial: bool = True) -> list[list[int]]:
    """Consecutive chunks of ``size``; a short last chunk only if it is the only one and ``keep_partial``."""
    chunks = [items[k:k + size] for k in range(0, len(items) - size + 1, size)]
    if not chunks and items and keep_partial:
        chunks = [items]
    return chunks


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[(index, seed)]``: ``dataset[index]`` with its transform's random state set from ``seed``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        reseed = getattr(getattr(self.dataset, "transform", None), "reseed", None)
        if reseed is not None:
            reseed(seed)
        return self.dataset[index]

    def report_skipped(self) -> list:
        report = getattr(self.dataset, "report_skipped", None)
        return report() if report is not None else []
