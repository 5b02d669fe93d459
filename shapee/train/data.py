"""Endless, sharded, resumable batches for the training loop.

Every process draws from a ``DistributedSampler`` (also with world size 1, so there is one code path): one shuffled
permutation per epoch, seeded by ``(seed, epoch)``, dealt out to the ranks. The position in the stream is
``(epoch, batches consumed in that epoch)``; restoring it replays exactly the batches a run without interruption
would have seen (assuming the dataset's own item loading is deterministic per index).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ResumableSampler(Sampler[int]):
    """A ``DistributedSampler`` epoch that can start ``skip`` samples in (resuming mid-epoch)."""

    def __init__(self, base: DistributedSampler) -> None:
        self.base = base
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.base.set_epoch(epoch)  # the epoch seeds the shuffle: same epoch, same order
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


class DataStream:
    """Batches over epochs without end; ``state_dict()``/``load_state_dict()`` save and restore the position.

    Args:
        dataset: map-style dataset.
        batch_size: samples per batch on this rank (incomplete last batches of an epoch are dropped).
        num_workers, collate_fn, pin_memory: as for ``DataLoader``.
        seed: shuffle seed (the same on every rank: the ranks share one permutation per epoch).
        rank, world_size: this process's shard.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        pin_memory: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sampler = ResumableSampler(
            DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        )
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=True,
            persistent_workers=num_workers > 0,
            # A private generator: creating a DataLoader iterator would otherwise draw from the global torch RNG,
            # making the model's randomness depend on epoch boundaries and breaking bitwise resume.
            generator=torch.Generator(),
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"train_set has {len(dataset)} samples: fewer than batch_size × world_size = "
                f"{batch_size} × {world_size}, so an epoch has no batch"
            )
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.batch_in_epoch = 0, 0
        self._it = None

    def next(self) -> Any:
        """The next batch (starting a new epoch when the current one is exhausted)."""
        while True:
            if self._it is None:
                self.sampler.set_position(self.epoch, self.batch_in_epoch * self.batch_size)
                # Worker seeds derive from this generator: fixed per (seed, epoch, rank).
                worker_seed = (self.seed * 1_000_003 + self.epoch) * self.world_size + self.rank
                self.loader.generator.manual_seed(worker_seed)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.batch_in_epoch, self._it = self.epoch + 1, 0, None
                continue
            self.batch_in_epoch += 1
            return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.batch_in_epoch, self._it = int(state["epoch"]), int(state["batch_in_epoch"]), None


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) dict/list/tuple batch to ``device``; other leaves are kept as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
