"""In-memory batches for the training loop: seeded shuffles, no worker processes.

The whole dataset is a uint8 tensor, so a batch is one ``index_select``; for CUDA it is gathered
into a pinned buffer and copied with ``non_blocking=True`` (two buffers alternate, each guarded by
a CUDA event, so a buffer is never overwritten while its copy is still in flight).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from ..seeding import derive_seed

__all__ = ["BatchLoader"]


class BatchLoader:
    """Shuffled uint8 batches on the training device.

    Args:
        images: uint8 ``(N, C, H, W)`` (CPU; a tensor already on ``device`` is indexed in place).
        batch_size: images per global batch (across all ranks).
        labels: int64 ``(N,)`` or None (then batches carry -1 labels).
        shuffle: permute every epoch; the permutation depends only on ``(seed, epoch)``.
        drop_last: drop the last partial batch.
        seed: base seed of the shuffles.
        device: where batches are delivered.
        rank, world_size: under DDP each rank takes the contiguous slice
            ``[rank * b, (rank + 1) * b)`` of every global batch, ``b = batch_size // world_size``.

    Yields ``(images uint8 (b, C, H, W), labels int64 (b,))`` on ``device``.
    """

    def __init__(self, images: Tensor, batch_size: int, *, labels: Tensor | None = None, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                 rank: int = 0, world_size: int = 1) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"BatchLoader: images must be uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        n = images.shape[0]
        if batch_size < 1:
            raise ValueError(f"BatchLoader: batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BatchLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"BatchLoader: batch_size={batch_size} (global) must be divisible by "
                             f"world_size={world_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"BatchLoader: batch_size={batch_size} exceeds the {n} images with drop_last=True; "
                             "lower batch_size")
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"BatchLoader: labels must have shape ({n},), got {tuple(labels.shape)}")
        self.device = torch.device(device)
        self.images = images if images.device == self.device else images.cpu().contiguous()
        self.labels = labels.to(self.device, torch.int64)  # small: keep it on the device once
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.rank, self.world_size = rank, world_size
        self._pinned: list[Tensor | None] = [None, None]
        self._events: list[object | None] = [None, None]
        self._slot = 0

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def permutation(self, epoch: int) -> Tensor:
        """The image order of ``epoch``: int64 ``(N,)``, a function of ``(seed, epoch)`` only."""
        n = self.images.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(n, generator=gen)

    def _rank_slice(self, idx: Tensor) -> Tensor:
        """This rank's contiguous part of one global batch (a partial last batch is split evenly)."""
        if self.world_size == 1:
            return idx
        return torch.tensor_split(idx, self.world_size)[self.rank]

    def _to_device(self, idx: Tensor) -> Tensor:
        if self.images.device == self.device:
            return self.images.index_select(0, idx.to(self.device))
        if self.device.type != "cuda":
            return self.images.index_select(0, idx)
        slot = self._slot
        self._slot ^= 1
        shape = (idx.numel(), *self.images.shape[1:])
        buf = self._pinned[slot]
        if buf is None or buf.shape[0] < shape[0]:
            buf = torch.empty((self.batch_size, *self.images.shape[1:]), dtype=torch.uint8, pin_memory=True)
            self._pinned[slot] = buf
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # the previous copy out of this buffer must have finished
        out_cpu = buf[: shape[0]]
        torch.index_select(self.images, 0, idx, out=out_cpu)
        out = out_cpu.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._events[slot] = event
        return out

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``epoch``, skipping the first ``start`` (exact resume mid-epoch)."""
        if start < 0:
            raise ValueError(f"BatchLoader.epoch: start={start} must be >= 0")
        perm = self.permutation(epoch)
        for b in range(start, len(self)):
            idx = self._rank_slice(perm[b * self.batch_size:(b + 1) * self.batch_size])
            yield self._to_device(idx), self.labels.index_select(0, idx.to(self.device))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.epoch(0)
