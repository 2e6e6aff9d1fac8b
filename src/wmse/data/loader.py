"""uint8 images as index views, and in-memory batches for the training loop: seeded shuffles, no worker
processes.

An :class:`ImageView` is ``base[index]`` without the copy: a subset (a held-out split, the labelled images,
a kNN subsample) keeps the base uint8 tensor (in memory or a read-only memory map) and an int64 index, and
gathers the pixels of a batch when asked. A batch is one ``index_select`` on the base, at composed indices;
for CUDA it is gathered into a pinned buffer and copied with ``non_blocking=True`` (two buffers alternate,
each guarded by a CUDA event, so a buffer is never overwritten while its copy is still in flight).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageView", "as_view", "BatchLoader"]


class ImageView:
    """The images ``base[index]`` of a uint8 ``(N, C, H, W)`` tensor, without copying their pixels.

    Args:
        base: uint8 ``(N, C, H, W)`` tensor (it is never written; a read-only memory map works), or another
            view (the indices compose, so a view of a view still points into the one base tensor).
        index: int64 ``(M,)`` positions in ``base`` (any order, repeats allowed), or None for all of it.

    It reads like a uint8 tensor of shape ``(M, C, H, W)`` where evaluation and the loader need it:
    ``shape``, ``dtype``, ``device``, ``len()``, and ``view[i:j]`` / ``view[idx]`` / :meth:`gather`, which
    return the pixels as a tensor (a slice of a plain base is a view of it, anything else one gather).
    :meth:`take` gives a smaller view instead.
    """

    def __init__(self, base: Tensor | ImageView, index: Tensor | None = None) -> None:
        if isinstance(base, ImageView):
            index = base.index if index is None else base._base_index(torch.as_tensor(index))
            base = base.base
        if not isinstance(base, Tensor) or base.dtype != torch.uint8 or base.dim() != 4:
            raise ValueError(f"ImageView: base must be a uint8 (N, C, H, W) tensor, got "
                             f"{getattr(base, 'dtype', type(base).__name__)} {tuple(getattr(base, 'shape', ()))}")
        if index is not None:
            index = torch.as_tensor(index).to(base.device, torch.int64)
            if index.dim() != 1:
                raise ValueError(f"ImageView: index must be 1-D, got shape {tuple(index.shape)}")
            if index.numel() and not (0 <= int(index.min()) and int(index.max()) < base.shape[0]):
                raise IndexError(f"ImageView: index out of range for {base.shape[0]} images")
        self.base, self.index = base, index

    @property
    def shape(self) -> torch.Size:
        return self.base.shape if self.index is None else torch.Size((len(self.index), *self.base.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def ndim(self) -> int:
        return 4

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return int(self.shape[0])

    def __repr__(self) -> str:
        kind = "all of" if self.index is None else f"{len(self)} images of"
        return f"ImageView({kind} a uint8 base {tuple(self.base.shape)})"

    def _base_index(self, idx: Tensor) -> Tensor:
        """Positions in ``base`` of this view's images ``idx``."""
        idx = idx.to(self.base.device, torch.int64)
        return idx if self.index is None else self.index.index_select(0, idx)

    def gather(self, idx: Tensor, out: Tensor | None = None) -> Tensor:
        """The pixels of this view's images ``idx``: uint8 ``(len(idx), C, H, W)`` (into ``out`` if given)."""
        return torch.index_select(self.base, 0, self._base_index(idx), out=out)

    def take(self, idx: Tensor) -> ImageView:
        """A view of this view's images ``idx`` (no pixels copied)."""
        return ImageView(self, idx)

    def __getitem__(self, key) -> Tensor:
        if self.index is None:
            return self.base[key]
        if isinstance(key, slice):
            return self.base.index_select(0, self.index[key])
        if isinstance(key, int):
            return self.base[int(self.index[key])]
        return self.gather(torch.as_tensor(key))


def as_view(images: Tensor | ImageView) -> ImageView:
    """``images`` as an :class:`ImageView` (a tensor is wrapped whole, without a copy)."""
    return images if isinstance(images, ImageView) else ImageView(images)


class BatchLoader:
    """Shuffled uint8 batches on the training device.

    Args:
        images: uint8 ``(N, C, H, W)``, a tensor or an :class:`ImageView` of one (CPU; a tensor already on
            ``device`` is indexed in place). Never copied: every batch is gathered from it on demand.
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

    def __init__(self, images: Tensor | ImageView, batch_size: int, *, labels: Tensor | None = None, shuffle: bool = True,
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
        view = as_view(images)
        if view.device != self.device:  # gathered on the CPU (into pinned memory for CUDA); no-ops for a CPU base
            index = None if view.index is None else view.index.cpu()
            view = ImageView(view.base.cpu().contiguous(), index)
        self.images = view
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
        # SeedSequence mixes (seed, epoch) so nearby seeds/epochs give unrelated permutations.
        state = np.random.SeedSequence([int(self.seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2, np.uint64)
        gen = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        return torch.randperm(n, generator=gen)

    def _rank_slice(self, idx: Tensor) -> Tensor:
        """This rank's contiguous part of one global batch (a partial last batch is split evenly)."""
        if self.world_size == 1:
            return idx
        return torch.tensor_split(idx, self.world_size)[self.rank]

    def _to_device(self, idx: Tensor) -> Tensor:
        if self.images.device == self.device:
            return self.images.gather(idx.to(self.device))
        if self.device.type != "cuda":
            return self.images.gather(idx)
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
        self.images.gather(idx, out=out_cpu)
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
