"""Datasets and loaders from the ``data`` config group (used by training, evaluation and tools).

With ``data.on_error=skip`` an image that cannot be loaded is replaced by the next readable one
in training and dropped from the batch in evaluation (so no image is evaluated twice); the
loader reports the skipped images at the end of every pass (``CocoDetection.report_skipped``).

Training loaders (``shuffle=True``) draw their batches from ``samplers.EpochBatchSampler``: call
``loader.batch_sampler.set_epoch(epoch, skip)`` before each epoch. Evaluation loaders of one of
several ranks read every ``num_replicas``-th image (padded to equal shares: callers drop the repeats).
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import weakref
from collections.abc import Mapping

import torch
from omegaconf import DictConfig

from retinanet.data.coco import CocoDetection
from retinanet.data.collate import Batch, Collate
from retinanet.data.samplers import EpochBatchSampler, SeededSamples, aspect_groups
from retinanet.data.transforms import build_transforms


def eval_resize(data_cfg: Mapping) -> tuple:
    """The evaluation / inference resize ``(min_size, max_size)`` of a data config (or a checkpoint's copy).

    ``eval_min_size`` / ``eval_max_size`` when set, each one otherwise the training value (a list
    ``min_size``, multi-scale training, is evaluated at its largest value by ``build_transforms``).
    """
    def pick(key: str):
        value = data_cfg.get(f"eval_{key}")
        return data_cfg.get(key) if value is None else value

    return pick("min_size"), pick("max_size")


def build_dataset(data_cfg: DictConfig, split: str, train: bool, resize: tuple | None = None,
                  progress: bool = True) -> CocoDetection:
    """The dataset of one split with its transform (augmented for training), its images checked as
    ``data.verify`` says (with ``data.on_error=raise``; ``progress``: a progress bar).

    Training resizes with ``data.min_size`` / ``max_size``, evaluation with ``eval_resize(data_cfg)``
    unless ``resize=(min_size, max_size)`` is given (e.g. a checkpoint's own).
    """
    aug = data_cfg.augment  # a list data.min_size is multi-scale training (evaluation uses its largest value)
    if resize is None:
        resize = (data_cfg.min_size, data_cfg.max_size) if train else eval_resize(data_cfg)
    transform = build_transforms(
        train=train, min_size=resize[0], max_size=resize[1],
        hflip_prob=aug.hflip_prob, scale_range=tuple(aug.scale_range), translate=aug.translate,
        color_jitter=aug.color_jitter, min_visibility=aug.min_visibility,
    )
    return CocoDetection(data_cfg[f"{split}_ann"], data_cfg[f"{split}_images"], transform=transform,
                         on_error=data_cfg.get("on_error", "raise"), skip_policy="replace" if train else "drop",
                         verify=data_cfg.get("verify", True), progress=progress)


def empty_batch(size_divisible: int) -> Batch:
    """A batch of zero images (every sample of the batch was skipped)."""
    return Batch(images=torch.zeros((0, 3, size_divisible, size_divisible), dtype=torch.uint8),
                 gt_boxes=torch.zeros((0, 1, 4)), gt_labels=torch.full((0, 1), -1, dtype=torch.int64),
                 gt_crowd=torch.zeros((0, 1), dtype=torch.bool), image_ids=torch.zeros(0, dtype=torch.int64),
                 image_sizes=torch.zeros((0, 2), dtype=torch.int64), orig_sizes=torch.zeros((0, 2), dtype=torch.int64),
                 scales=torch.zeros((0, 2)))


class SkippingCollate(Collate):
    """``Collate`` that leaves out samples marked ``{"skipped": True}`` (possibly all of them)."""

    def __call__(self, samples: list[dict]) -> Batch:
        kept = [s for s in samples if not s.get("skipped")]
        return super().__call__(kept) if kept else empty_batch(self.size_divisible)


_LOADERS: "weakref.WeakSet[ReportingLoader]" = weakref.WeakSet()


class ReportingLoader(torch.utils.data.DataLoader):
    """A DataLoader that asks its dataset to report skipped images when a pass over it ends, and stops its
    worker processes itself (``shutdown``; at the latest when the interpreter exits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _LOADERS.add(self)

    def __iter__(self):
        yield from super().__iter__()
        report = getattr(self.dataset, "report_skipped", None)
        if report is not None:
            report()

    def shutdown(self) -> None:
        """Stop the (persistent) worker processes: asked to finish through their queue, as torch does at the end
        of an iterator. Workers ignore SIGTERM (``leave_signals_to_the_main_process``), so the SIGTERM that
        multiprocessing sends to daemonic children at exit would not stop them."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._iterator = None


@atexit.register  # registered after multiprocessing's exit hook, so it runs before it
def _shutdown_loaders() -> None:
    """At exit: stop the workers of every loader still alive. A DataLoader worker left over (its iterator outlived
    its loader, e.g. held by a traceback) ignores the SIGTERM with which multiprocessing then stops daemonic
    children, and the exit would wait for it forever: daemonic children still alive get SIGKILL instead."""
    for loader in list(_LOADERS):
        loader.shutdown()
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()
            process.join(timeout=5)


def leave_signals_to_the_main_process(worker_id: int = 0) -> None:
    """DataLoader worker init: ignore SIGTERM and SIGINT. A supervisor (docker stop, Kubernetes, SLURM, systemd)
    or Ctrl-C signals the whole process group; the main process then finishes its step, saves and exits, and
    stops its workers itself. A worker killed first would make the main process fail without saving."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, size_divisible: int,
                 seed: int, pin_memory: bool, *, num_replicas: int = 1, rank: int = 0,
                 aspect_grouping: bool = False, batches_multiple_of: int = 1) -> torch.utils.data.DataLoader:
    """Training (``shuffle=True``: resumable, per-sample seeded batches) or evaluation loader of one rank.

    ``aspect_grouping``: training batches of landscape or of portrait images (less padding).
    ``batches_multiple_of``: the training epoch length is cut to a multiple of it (gradient accumulation).
    """
    generator = torch.Generator().manual_seed(seed)  # worker seeds: keeps the global RNG untouched
    common = dict(num_workers=num_workers, collate_fn=SkippingCollate(size_divisible), generator=generator,
                  pin_memory=pin_memory, persistent_workers=num_workers > 0,
                  worker_init_fn=leave_signals_to_the_main_process if num_workers > 0 else None)
    if shuffle:
        batches = EpochBatchSampler(len(dataset), batch_size, seed, num_replicas, rank,
                                    aspect_groups(dataset) if aspect_grouping else None, batches_multiple_of)
        return ReportingLoader(SeededSamples(dataset), batch_sampler=batches, **common)
    sampler = None
    if num_replicas > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
    return ReportingLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, **common)
